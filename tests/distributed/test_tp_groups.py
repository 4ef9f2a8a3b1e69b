"""Tensor parallelism on models with sliding windows (gloo, CPU): a tiny Gemma 3 with local and
global layers (several KV groups, every group's page tables sent to the ranks) and a tiny Mistral
with its window (one windowed group), on the TorchExecutor (float32) and decode.c (int4). TP=2
gives TP=1's greedy tokens through chunked prompts longer than the window, while the windowed
groups give pages back (-1 in their tables), and each rank holds half of the KV cache."""
import random

import pytest

from kvserve.config import CacheConfig, EngineConfig, SchedulerConfig
from kvserve.engine.engine import Engine
from kvserve.engine.executors import NativeExecutor, TorchExecutor
from kvserve.engine.request import SamplingParams
from kvserve.model.random_weights import token_tokenizer
from model.grouped_forward import PAGE, W, make_grouped_gemma3
from tiny_models import make_family_model, save_hf_dir

rng = random.Random(3)
# longer than the window W = 8, chunked by 16-token steps, beside short ones
PROMPTS = [rng.choices(range(3, 256), k=n) for n in (37, 5, 21)]
GREEDY = SamplingParams(temperature=0, max_tokens=14, ignore_eos=True)
MODELS = {"gemma3": make_grouped_gemma3, "mistral": lambda: make_family_model("mistral", sliding_window=W)}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    made = {}

    def get(name):
        if name not in made:
            made[name] = save_hf_dir(MODELS[name](), tmp_path_factory.mktemp(name))
        return made[name]
    return get


def run(path, tp, quantization):
    """(each prompt's tokens, whether a windowed table gave a page back, KV bytes of rank 0, executor)"""
    engine = Engine(EngineConfig(model=str(path), dtype="float32", quantization=quantization, tensor_parallel_size=tp,
                                 cache=CacheConfig(page_size=PAGE, num_pages=160, enable_prefix_caching=False),
                                 scheduler=SchedulerConfig(max_num_batched_tokens=16, max_num_seqs=4)),
                    tokenizer=token_tokenizer(256))
    try:
        ids = [engine.add_request(p, GREEDY) for p in PROMPTS]
        done, released = {}, False
        while engine.has_unfinished():
            done |= {o.request_id: o.outputs[0].token_ids for o in engine.step() if o.finished}
            released |= any(-1 in t for seq in engine.scheduler.running for t in seq.tables)
        executor = getattr(engine.runner.executor, "inner", engine.runner.executor)
        return [done[i] for i in ids], released, engine.pool.k.nbytes + engine.pool.v.nbytes, type(executor), \
            len(engine.kv_groups)
    finally:
        engine.close()


@pytest.mark.parametrize("name", ["gemma3", "mistral"])
@pytest.mark.parametrize("quantization,executor", [("none", TorchExecutor), ("int4", NativeExecutor)])
def test_tp2_gives_tp1_tokens_with_windows(model_dir, name, quantization, executor):
    tokens1, released1, kv1, executor1, groups = run(model_dir(name), 1, quantization)
    if executor is NativeExecutor and executor1 is not NativeExecutor:
        pytest.skip("no native decode kernel here (no C compiler or no AVX2)")
    assert groups == (4 if name == "gemma3" else 1)  # 3 local groups (one short) and the global one
    tokens2, released2, kv2, executor2, _ = run(model_dir(name), 2, quantization)
    assert executor1 is executor2 is executor
    assert released1 and released2
    assert tokens2 == tokens1
    assert kv2 * 2 == kv1
