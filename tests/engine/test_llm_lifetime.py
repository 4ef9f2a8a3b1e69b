"""The offline LLM object shared by threads, and freed when dropped."""
import gc
import threading
import weakref

import pytest

from kvserve.engine.request import SamplingParams
from kvserve.llm import LLM

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def test_generate_from_two_threads_gives_each_its_own_outputs(make_engine):
    """Each generate steps the engine for every request in it: two at once took each other's
    outputs (or, on the C step, corrupted the heap); they now take turns."""
    llm = LLM(engine=make_engine())
    prompts = {k: [[100 + k + i, 200, 300 + i] for i in range(4)] for k in range(4)}
    alone = {k: [o.outputs[0].token_ids for o in llm.generate(p, GREEDY, use_tqdm=False)] for k, p in prompts.items()}
    got, errors = {}, []

    def work(k):
        try:
            got[k] = [o.outputs[0].token_ids for o in llm.generate(prompts[k], GREEDY, use_tqdm=False)]
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)
    threads = [threading.Thread(target=work, args=(k,)) for k in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and got == alone


def test_a_dropped_llm_frees_its_model_on_the_c_step(smollm2_path):
    """The packaged SmolLM2 decodes on the C step, whose callbacks held the decoder (and the model
    and KV pool) for good: ~120 MiB per LLM() a process made."""
    from kvserve.engine.executors import NativeExecutor
    llm = LLM(smollm2_path)
    if not isinstance(llm.engine.runner.executor, NativeExecutor):
        pytest.skip("no C step here (no C compiler or no AVX2)")
    llm.generate(["Hi"], GREEDY, use_tqdm=False)
    model = weakref.ref(llm.engine.model)
    del llm
    gc.collect()
    assert model() is None
