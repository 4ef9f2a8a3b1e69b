"""A model whose every layer has a sliding window gives back the pages behind it as it generates:
a request holds about window / page_size pages however long it runs, its greedy tokens are those
of the same windowed model keeping every page, and the page accounting balances."""
import pytest
import torch
import torch.nn.functional as F

from kvserve.config import CacheConfig, EngineConfig, SchedulerConfig
from kvserve.engine.engine import Engine
from kvserve.engine.request import SamplingParams
from kvserve.kv.groups import KVGroups
from kvserve.kv.windows import kv_windows
from kvserve.model.llama import LlamaForCausalLM
from kvserve.model.loader import hf_config
from kvserve.model.random_weights import token_tokenizer
from tiny_models import make_hf_model

W, PAGE = 12, 4


class WindowedAttention:
    """Dense attention in PyTorch that reads only each query's window, through the page table:
    a page it reads that was given back (-1) fails the test."""

    def __init__(self, pool, windows):
        self.pool, self.windows = pool, windows

    def plan(self, meta):
        self.meta = meta
        self.q_lens, self.kv_lens = meta.q_lens().tolist(), meta.kv_lens().tolist()

    def _slots(self, i, start, end):
        page = self.pool.page_size
        pages = self.meta.kv_indices[self.meta.kv_indptr[i]:self.meta.kv_indptr[i + 1]]
        pos = torch.arange(start, end)
        held = pages[pos // page]
        assert bool((held >= 0).all()), "read a page that was given back"
        return held.long() * page + pos % page

    def run(self, layer, q, k, v):
        k_cache, v_cache, window = self.pool.k[layer], self.pool.v[layer], self.windows[layer]
        out, row = torch.empty_like(q), 0
        for i, (q_len, kv_len) in enumerate(zip(self.q_lens, self.kv_lens)):
            new = self._slots(i, kv_len - q_len, kv_len)
            k_cache[:, new], v_cache[:, new] = k[row:row + q_len].transpose(0, 1), v[row:row + q_len].transpose(0, 1)
            start = max(0, kv_len - q_len - window + 1)  # the first row's window
            slots = self._slots(i, start, kv_len)
            pos = torch.arange(kv_len - q_len, kv_len)[:, None]
            keys = torch.arange(start, kv_len)[None, :]
            mask = (keys <= pos) & (keys > pos - window)
            o = F.scaled_dot_product_attention(q[row:row + q_len].transpose(0, 1)[None], k_cache[:, slots][None],
                                               v_cache[:, slots][None], attn_mask=mask, enable_gqa=True)
            out[row:row + q_len] = o[0].transpose(0, 1)
            row += q_len
        return out


@pytest.fixture(scope="module")
def model():
    hf = make_hf_model("llama", vocab_size=256, max_position_embeddings=1024)
    config = hf.config.to_dict() | {"architectures": ["LlamaForCausalLM"]}
    return LlamaForCausalLM.from_weights(hf_config(config), hf.state_dict())


def windowed_engine(model, release: bool, num_pages=256, prefix=False, max_tokens_per_step=512):
    """The model with window W on every layer; release=False: the windows are applied but the
    engine is not told (it keeps every page)."""
    model.config.sliding_window = W if release else None  # every layer slides (layer_types None)
    try:
        engine = Engine(EngineConfig(cache=CacheConfig(PAGE, num_pages, None, prefix),
                                     scheduler=SchedulerConfig(max_tokens_per_step, 8)),
                        model=model, tokenizer=token_tokenizer(256))
    finally:
        model.config.sliding_window = None
    engine.runner.executor.attention = WindowedAttention(engine.pool, [W] * model.config.num_layers)
    return engine


def generate(engine, prompts, max_tokens, watch=None):
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    ids = [engine.add_request(p, params) for p in prompts]
    done = {}
    while engine.has_unfinished():
        done |= {o.request_id: o.outputs[0].token_ids for o in engine.step() if o.finished}
        if watch:
            watch(engine)
    return [done[i] for i in ids]


def live(engine):
    return [s for s in engine.scheduler.running + list(engine.scheduler.waiting)]


def test_kv_windows_reads_layer_windows_tolerantly():
    class Cfg:
        num_layers = 3
    cfg = Cfg()
    assert kv_windows(cfg) == [None] * 3 and KVGroups.from_windows(kv_windows(cfg)).windows == [None]
    cfg.layer_windows = [4096, 4096, 4096]
    assert KVGroups.from_windows(kv_windows(cfg)).windows == [4096]
    cfg.layer_windows = lambda: [1024, None, 1024]  # a method: Gemma 3's local and global layers
    assert kv_windows(cfg) == [1024, None, 1024] and KVGroups.from_windows(kv_windows(cfg)).windows == [1024, 1024, None]


def pages_in_use(engine):
    return engine.pool.num_pages - engine.pool.num_free - len(engine.pool.reserved)


def test_long_generation_holds_a_window_of_pages(model):
    prompt = list(range(3, 10))
    expected = generate(windowed_engine(model, release=False), [prompt], 64)[0]
    engine = windowed_engine(model, release=True)
    assert engine.kv_groups.windows == [W]  # one group, every layer windowed: its pages go back
    held = []

    def watch(e):
        held.append(pages_in_use(e))
        e.kv.check_integrity(live(e))
    assert generate(engine, [prompt], 64, watch) == [expected]
    # after each step: the pages of the window (W positions from the next one, over page
    # boundaries) and the next token's page
    assert max(held[:-1]) <= -(-W // PAGE) + 1, held
    assert held[-1] == 0  # the finished request gave back the rest
    engine.kv.check_integrity([])


def test_chunked_prompts_longer_than_the_window_with_prefix_hits(model):
    """Prompt chunks give pages back too (a chunk reads its own window only); a shared prompt
    served from the prefix cache, and n=2 forks of a parent that already gave pages back."""
    system = list(range(40, 80))  # 40 tokens: past the window before the prompt is in
    prompts = [system + [5, 6, 7], system + [9, 8], list(range(100, 130))]
    ref = windowed_engine(model, release=False, prefix=True, max_tokens_per_step=16)
    expected = generate(ref, prompts, 30)
    engine = windowed_engine(model, release=True, prefix=True, max_tokens_per_step=16)
    assert generate(engine, prompts, 30, lambda e: e.kv.check_integrity(live(e))) == expected
    assert engine.kv.prefix.pages  # pages given back by a request stay cached for the next
    engine.kv.check_integrity([])
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, n=2, seed=0)
    rid = engine.add_request(system + [1, 2], params)
    ref.add_request(system + [1, 2], params, request_id=rid)
    outs = {}
    for e in (engine, ref):
        while e.has_unfinished():
            for o in e.step():
                if o.finished:
                    outs.setdefault(id(e), o)
            e.kv.check_integrity(live(e))
    assert [c.token_ids for c in outs[id(engine)].outputs] == [c.token_ids for c in outs[id(ref)].outputs]
    engine.kv.check_integrity([])


def test_preempted_requests_recompute_within_the_window(model):
    """A pool too small for every request's window at once: some are preempted and recomputed
    (their whole sequence again, in windowed chunks); tokens and accounting are unchanged."""
    prompts = [[3 + i, 50 + i, 7, 9 + i] * (2 + i) for i in range(5)]  # 8 to 24 tokens
    expected = generate(windowed_engine(model, release=False), prompts, 30)
    engine = windowed_engine(model, release=True, num_pages=10, max_tokens_per_step=24)
    preempted = []
    preempt = engine.scheduler.preempt
    engine.scheduler.preempt = lambda seq: preempted.append(seq.request_id) or preempt(seq)
    assert generate(engine, prompts, 30, lambda e: e.kv.check_integrity(live(e))) == expected
    assert preempted  # the pool was too small: the test exercised recompute
    engine.kv.check_integrity([])


def test_static_decode_steps_with_released_pages(model):
    """Decode-only steps on the static buffers (the CUDA graph path; its PyTorch reference here):
    pages given back are -1 in the tables it copies, and its windows keep it off them."""
    from kvserve.engine.static_executor import StaticDecodeExecutor
    prompts = [list(range(3, 10)), list(range(20, 45))]
    expected = generate(windowed_engine(model, release=False), prompts, 40)
    engine = windowed_engine(model, release=True)
    executor = StaticDecodeExecutor(engine.model, engine.pool, engine.runner.executor, 4, engine.max_model_len,
                                    attention_kwargs=dict(windows=[W] * model.config.num_layers))
    took = []
    takes = executor.takes
    executor.takes = lambda batch: took.append(takes(batch)) or took[-1]
    engine.runner.executor = executor
    assert generate(engine, prompts, 40, lambda e: e.kv.check_integrity(live(e))) == expected
    assert took.count(True) > 30
    engine.kv.check_integrity([])
