"""The engine on a model with local and global layers (a tiny Gemma 3): each KV group has its own
page tables in one pool, the local groups give back the pages behind their window as requests
run. Greedy tokens equal transformers' greedy continuation, the pages in use (counted from the
pool) stay within what the windows need, and the page accounting balances after every step,
through chunked prompts, prefix hits, n=2 forks and preemption with recompute."""
import random

import pytest
import torch

from kvserve.config import CacheConfig, EngineConfig, SchedulerConfig
from kvserve.engine.engine import Engine
from kvserve.engine.request import SamplingParams
from kvserve.model.random_weights import token_tokenizer
from model.grouped_forward import PAGE, make_grouped_gemma3, window_bound
from model.test_families import load
from tiny_models import save_hf_dir


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory):
    hf = make_grouped_gemma3()
    return hf, load(save_hf_dir(hf, tmp_path_factory.mktemp("gemma3-engine")))


def hf_greedy(hf, prompt, max_tokens):
    """transformers' argmax continuation, the whole sequence recomputed each token (no cache)."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(max_tokens):
            ids.append(int(hf(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


def engine_for(model, num_pages=400, prefix=False, max_tokens_per_step=512, max_seqs=8):
    return Engine(EngineConfig(cache=CacheConfig(PAGE, num_pages, None, prefix),
                               scheduler=SchedulerConfig(max_tokens_per_step, max_seqs)),
                  model=model, tokenizer=token_tokenizer(256))


def live(engine):
    return engine.scheduler.running + list(engine.scheduler.waiting)


def run(engine, requests, watch=None):
    """requests: (prompt, SamplingParams); returns each request's choices' token ids."""
    ids = [engine.add_request(p, params) for p, params in requests]
    done = {}
    while engine.has_unfinished():
        done |= {o.request_id: [c.token_ids for c in o.outputs] for o in engine.step() if o.finished}
        engine.kv.check_integrity(live(engine))
        if watch:
            watch(engine)
    engine.kv.check_integrity([])
    assert engine.pool.num_free + len(engine.kv.prefix or ()) + len(engine.pool.reserved) == engine.pool.num_pages
    return [done[i] for i in ids]


def greedy(max_tokens, n=1):
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, n=n, seed=0 if n > 1 else None)


def test_long_chat_holds_its_windows_and_global_pages_only(gemma3):
    """A 30-token prompt in chunks of 7, then 50 tokens: the local groups hold about W / PAGE pages,
    and the tokens are transformers'."""
    hf, model = gemma3
    engine = engine_for(model, max_tokens_per_step=7)
    groups = engine.kv_groups
    assert len(groups) == 4 and groups.slots == 2 and engine.pool.k.shape[0] == 2
    prompt = random.Random(0).choices(range(3, 256), k=30)
    in_use = []

    def watch(e):
        for seq in e.scheduler.running:
            pages = e.pool.num_pages - e.pool.num_free  # one request, no prefix cache: all its pages
            assert pages == e.kv.pages_held(seq) <= window_bound(groups, seq.num_computed_tokens + 1, PAGE)
            in_use.append((seq.num_computed_tokens, pages))
    assert run(engine, [(prompt, greedy(50))], watch) == [[hf_greedy(hf, prompt, 50)]]
    kv_len, pages = in_use[-1]
    # 78 tokens computed (the last step finishes the request): 20 pages for the global group, 3 for
    # each local one (positions 71..78 over pages 17-19)
    assert kv_len == 78 and pages == 20 + 3 * 3
    assert pages < len(groups) * 20  # what keeping every page would hold


def test_prefix_hits_and_forks_with_pages_given_back(gemma3):
    """A shared 24-token system prompt (past the window): the second request hits it in the prefix
    cache (local groups only need their window's pages to be cached); n=2 forks share the parent's
    pages, the given-back ones staying -1."""
    hf, model = gemma3
    system = list(range(40, 64))
    prompts = [system + [5, 6, 7], system + [9, 8], system + [1, 2, 3, 4, 5]]
    expected = [hf_greedy(hf, p, 12) for p in prompts]
    engine = engine_for(model, prefix=True, max_tokens_per_step=16)
    out = run(engine, [(prompts[0], greedy(12))])
    out += run(engine, [(prompts[1], greedy(12)), (prompts[2], greedy(12, n=2))])
    assert out == [[expected[0]], [expected[1]], [expected[2]] * 2]
    assert engine.kv.prefix.hit_tokens >= 2 * 24


def test_random_workload_with_preemption_balances_and_matches_transformers(gemma3):
    """A pool too small for all requests at once: preemption and recompute, chunk sizes that
    cut windows and pages, prefix hits and forks; tokens and the accounting stay right."""
    hf, model = gemma3
    rng = random.Random(3)
    shared = rng.choices(range(3, 256), k=14)
    requests = []
    for i in range(7):
        prompt = (shared if i % 2 else []) + rng.choices(range(3, 256), k=rng.randint(3, 20))
        requests.append((prompt, greedy(rng.randint(5, 25), n=2 if i == 3 else 1)))
    expected = [[hf_greedy(hf, p, params.max_tokens)] * params.n for p, params in requests]
    engine = engine_for(model, num_pages=48, prefix=True, max_tokens_per_step=9, max_seqs=6)
    preempted = []
    preempt = engine.scheduler.preempt
    engine.scheduler.preempt = lambda seq: preempted.append(seq.request_id) or preempt(seq)
    assert run(engine, requests) == expected
    assert preempted  # the pool was too small: the test exercised recompute


def test_requests_a_grouped_model_cannot_run_are_refused(gemma3):
    _, model = gemma3
    engine = engine_for(model)
    with pytest.raises(ValueError, match="offload"):  # MagicPIG offload: see test_group_policies.py
        engine.add_request([5, 6, 7], SamplingParams(attention="magicpig:offload=true"))
    with pytest.raises(ValueError, match="what the KV cache holds"):  # one 494-token chunk: 4 groups x 124 pages > 400
        engine.add_request(list(range(3, 250)) * 2, SamplingParams(max_tokens=1))


def test_a_prompt_fits_in_chunks_where_every_layer_keeping_it_would_not(gemma3):
    """300 tokens in chunks of 8: 75 pages for the global group and 5 for each local group at most,
    in a pool of 120 (4 groups keeping every page would need 300)."""
    hf, model = gemma3
    engine = engine_for(model, num_pages=120, max_tokens_per_step=8)
    prompt = random.Random(5).choices(range(3, 256), k=300)
    assert run(engine, [(prompt, greedy(4))]) == [[hf_greedy(hf, prompt, 4)]]


def test_ngram_speculation_trims_every_group(gemma3):
    """Rejected draft tokens' K/V is trimmed from every group's table; tokens stay transformers'."""
    hf, model = gemma3
    engine = Engine(EngineConfig(cache=CacheConfig(PAGE, 400, None, True), scheduler=SchedulerConfig(64, 4),
                                 speculative="ngram", num_speculative_tokens=3),
                    model=model, tokenizer=token_tokenizer(256))
    prompt = [7, 8, 9, 10, 11] * 6  # repeats: the n-gram proposer drafts
    assert run(engine, [(prompt, greedy(30))]) == [[hf_greedy(hf, prompt, 30)]]


def test_native_step_reads_each_groups_tables(gemma3, tmp_path):
    """int4 weights put the engine on decode.c's single C step, which reads each layer's K/V at its
    group's slot through its group's tables: greedy tokens equal the same C step's over one plain
    page table with nothing released (paged_logits), and the local groups still give pages back."""
    from kvserve.engine.executors import NativeExecutor
    from kvserve.model.families import model_class
    from kvserve.model.loader import load_checkpoint
    from kvserve.native.decode import NativeDecoder
    from model.paged_forward import paged_logits
    hf, _ = gemma3
    cfg, weights = load_checkpoint(str(save_hf_dir(hf, tmp_path)), "int4")
    model = model_class(cfg).from_weights(cfg, weights, torch.float32)
    if not NativeDecoder.supports(model):
        pytest.skip("no native decode kernel here (no C compiler or no AVX2)")
    engine = engine_for(model)
    assert isinstance(engine.runner.executor, NativeExecutor) and len(engine.kv_groups) == 4
    prompt = random.Random(1).choices(range(3, 256), k=21)
    held = []
    [[tokens]] = run(engine, [(prompt, greedy(40))], lambda e: held.append(e.pool.num_pages - e.pool.num_free))
    logits = paged_logits(model, prompt + tokens, page_size=PAGE, chunk=[len(prompt)], native_decode=True)
    assert logits[len(prompt) - 1:-1].argmax(-1).tolist() == tokens
    kv_len = len(prompt) + len(tokens)
    assert max(held) <= window_bound(engine.kv_groups, kv_len, PAGE) < len(engine.kv_groups) * -(-kv_len // PAGE)
