"""The static-buffer decode path (what CUDA graphs replay) against the dynamic path, on the CPU."""
import importlib.util

import pytest
import torch

from kvserve.engine.request import SamplingParams
from kvserve.engine.static_executor import StaticDecodeExecutor, bucket_sizes


def run(engine, prompts, params):
    ids = [engine.add_request(p, params) for p in prompts]
    done = {}
    while engine.has_unfinished():
        done |= {o.request_id: o.outputs[0].token_ids for o in engine.step() if o.finished}
    return [done[i] for i in ids]


def static(engine, max_batch, kernel="torch"):
    from kvserve.attention.static_decode import StaticDecodeAttention
    if kernel == "triton":
        from kvserve.attention.triton.static import TritonStaticDecode as attention_cls
    else:
        attention_cls = StaticDecodeAttention
    executor = StaticDecodeExecutor(engine.model, engine.pool, engine.runner.executor, max_batch,
                                    engine.max_model_len, attention_cls=attention_cls)
    calls = []
    take = executor.takes
    executor.takes = lambda batch: calls.append(take(batch)) or calls[-1]
    engine.runner.executor = executor
    return calls


def test_bucket_sizes():
    assert bucket_sizes(1) == [1]
    assert bucket_sizes(48) == [1, 2, 4, 8, 16, 32, 48]
    assert bucket_sizes(64) == [1, 2, 4, 8, 16, 32, 64]


# the Triton kernel on the CPU under the interpreter; on a GPU host test_cuda_graphs_* covers it
KERNELS = [("torch", 1), ("torch", 16)] + (
    [("triton", 16)] if importlib.util.find_spec("triton") and not torch.cuda.is_available() else [])


@pytest.mark.parametrize("kernel,page_size", KERNELS)
def test_static_decodes_give_the_dynamic_tokens(make_engine, kernel, page_size):
    """Ragged lengths (pages partly filled), batches padded to buckets of 4 and 8 and one past
    the largest bucket (run by the fallback), and sequences that finish while others go on."""
    prompts = [[100 + 7 * i + j for j in range(3 + 5 * i)] for i in range(11)]
    params = [SamplingParams(temperature=0, max_tokens=6 + i % 4, ignore_eos=True) for i in range(11)]
    expected = [run(make_engine(page_size=page_size, num_pages=512), [p], q)[0] for p, q in zip(prompts, params)]

    engine = make_engine(page_size=page_size, num_pages=512)
    calls = static(engine, max_batch=8, kernel=kernel)
    ids = [engine.add_request(p, q) for p, q in zip(prompts, params)]
    done = {}
    while engine.has_unfinished():
        done |= {o.request_id: o.outputs[0].token_ids for o in engine.step() if o.finished}
    assert [done[i] for i in ids] == expected
    assert True in calls and False in calls  # both the static path and the fallback ran
    engine.kv.check_integrity([])


def test_padding_rows_touch_no_request_page(make_engine):
    """A batch of 3 padded to 4: the padding row writes only the reserved scratch page."""
    engine = make_engine(num_pages=64)
    static(engine, max_batch=4)
    run(engine, [[101, 102, 103], [104, 105], [106]], SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
    scratch = engine.runner.executor.scratch_page
    assert engine.pool.reserved == [scratch]
    before = engine.pool.k.clone()
    for p in ([201, 202], [203, 204, 205], [206]):
        engine.add_request(p, SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    owned = set()
    while engine.has_unfinished():
        owned |= {p for seq in engine.scheduler.running for p in seq.pages}
        engine.step()
    page = engine.pool.page_size
    changed = {s // page for s in torch.nonzero((engine.pool.k != before).any(-1).any(0)).flatten().tolist()}
    assert changed <= owned | {scratch} and scratch in changed


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_graphs_give_the_eager_tokens():
    from kvserve.config import EngineConfig, SchedulerConfig
    from kvserve.engine.engine import Engine
    prompts = [[5 + i + j for j in range(4 + 9 * i)] for i in range(5)]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    outs = []
    for eager in (True, False):
        engine = Engine(EngineConfig(random_weights="tiny", dtype="float32", device="cuda", enforce_eager=eager,
                                     scheduler=SchedulerConfig(max_num_seqs=8)))
        assert isinstance(engine.runner.executor, StaticDecodeExecutor) != eager
        outs.append(run(engine, prompts, params))
    assert outs[0] == outs[1]


def test_an_unknown_attention_backend_is_refused(monkeypatch):
    from kvserve.config import EngineConfig
    from kvserve.engine.engine import Engine
    monkeypatch.setenv("KVSERVE_ATTENTION_BACKEND", "flash")
    with pytest.raises(ValueError, match="KVSERVE_ATTENTION_BACKEND must be 'triton' or 'torch', got 'flash'"):
        Engine(EngineConfig(random_weights="tiny", device="cpu"))
    monkeypatch.setenv("KVSERVE_ATTENTION_BACKEND", "torch")
    assert Engine(EngineConfig(random_weights="tiny", device="cpu")).runner.executor is not None
