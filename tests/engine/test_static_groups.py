"""The static-buffer decode (what CUDA graphs replay; eagerly here) on models with sliding windows:
a tiny Gemma 3 (local and global layers: several KV groups, one block table each) and a tiny
Mistral with its window, through sequences several windows long whose windowed groups give pages
back. The same greedy tokens as the dynamic path (TorchExecutor + GroupedAttention), with the
PyTorch reference and the Triton kernel (under the interpreter without a GPU, float32)."""
import importlib.util
import random

import pytest
import torch


from kvserve.config import CacheConfig, EngineConfig, SchedulerConfig  # noqa: E402
from kvserve.engine.engine import Engine  # noqa: E402
from kvserve.engine.executors import TorchExecutor, attention_kwargs  # noqa: E402
from kvserve.engine.request import SamplingParams  # noqa: E402
from kvserve.engine.static_executor import StaticDecodeExecutor  # noqa: E402
from kvserve.model.random_weights import token_tokenizer  # noqa: E402
from model.grouped_forward import PAGE, W, make_grouped_gemma3  # noqa: E402
from model.test_families import load  # noqa: E402
from tiny_models import make_family_model, save_hf_dir  # noqa: E402

rng = random.Random(5)
PROMPTS = [rng.choices(range(3, 256), k=n) for n in (23, 4, 13)]
PARAMS = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (10, 14, 8)]  # all past W
MODELS = {"gemma3": make_grouped_gemma3, "mistral": lambda: make_family_model("mistral", sliding_window=W)}
KERNELS = ["torch"] + (["triton"] if importlib.util.find_spec("triton") and not torch.cuda.is_available() else [])


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """name -> (kvserve's model, the dynamic path's tokens)"""
    made = {}

    def get(name):
        if name not in made:
            model = load(save_hf_dir(MODELS[name](), tmp_path_factory.mktemp(name)))
            dynamic = engine_for(model)
            assert type(dynamic.runner.executor) is TorchExecutor
            made[name] = model, run(dynamic)
        return made[name]
    return get


def engine_for(model):
    return Engine(EngineConfig(cache=CacheConfig(PAGE, 128, None, False), scheduler=SchedulerConfig(512, 4)),
                  model=model, tokenizer=token_tokenizer(256))


def run(engine, watch=None):
    ids = [engine.add_request(p, q) for p, q in zip(PROMPTS, PARAMS)]
    done = {}
    while engine.has_unfinished():
        done |= {o.request_id: o.outputs[0].token_ids for o in engine.step() if o.finished}
        engine.kv.check_integrity(engine.scheduler.running + list(engine.scheduler.waiting))
        if watch:
            watch(engine)
    return [done[i] for i in ids]


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("name", ["gemma3", "mistral"])
def test_static_decodes_on_groups_give_the_dynamic_tokens(models, name, kernel):
    model, expected = models(name)
    engine = engine_for(model)
    if kernel == "triton":
        from kvserve.attention.triton.static import TritonStaticDecode as attention_cls
    else:
        from kvserve.attention.static_decode import StaticDecodeAttention as attention_cls
    executor = StaticDecodeExecutor(model, engine.pool, engine.runner.executor, 4, engine.max_model_len,
                                    attention_cls=attention_cls, attention_kwargs=attention_kwargs(model.config),
                                    groups=engine.kv_groups)
    assert executor.attention.block_table.shape[0] == len(engine.kv_groups) == (4 if name == "gemma3" else 1)
    took, released = [], []
    takes = executor.takes
    executor.takes = lambda batch: took.append(takes(batch)) or took[-1]
    engine.runner.executor = executor
    # a static step over a table with pages given back (-1: the scratch page in the buffers)
    watch = lambda e: released.append(took and took[-1] and any(-1 in t for s in e.scheduler.running  # noqa: E731
                                                                   for t in s.tables))
    assert run(engine, watch) == expected
    assert took.count(True) >= 8 and any(released)
    engine.kv.check_integrity([])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("name", ["gemma3", "mistral"])
def test_cuda_graphs_on_groups_give_the_eager_tokens(tmp_path, name):
    """select_executor picks the CUDA graphs for a grouped model; they give the eager steps' tokens."""
    path = save_hf_dir(MODELS[name](), tmp_path)
    outs = []
    for eager in (True, False):
        engine = Engine(EngineConfig(model=str(path), dtype="float32", device="cuda", enforce_eager=eager,
                                     cache=CacheConfig(PAGE, 128, None, False), scheduler=SchedulerConfig(512, 4)),
                        tokenizer=token_tokenizer(256))
        assert isinstance(engine.runner.executor, StaticDecodeExecutor) != eager
        outs.append(run(engine))
    assert outs[0] == outs[1]
