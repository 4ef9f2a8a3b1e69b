"""Speculative decoding: outputs equal (greedy) or equally distributed (sampling) with and without
it, for each proposer; stops and max_tokens inside an accepted run; every page comes back."""
import random
from collections import Counter
from types import SimpleNamespace

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from scipy.stats import chi2_contingency

from kvserve.config import CacheConfig, EngineConfig, SchedulerConfig
from kvserve.engine.engine import Engine
from kvserve.engine.request import SamplingParams
from kvserve.engine.sampler import SamplingRow, process, truncated
from kvserve.engine.spec.ngram import NgramIndex
from kvserve.engine.spec.verify import verify
from kvserve.model.random_weights import token_tokenizer

VOCAB = 32


@pytest.fixture(scope="module")
def small_model():
    """A random 2-layer Llama over 32 tokens: a sampled next token has real spread."""
    from kvserve.model.llama import LlamaForCausalLM
    from kvserve.model.loader import hf_config
    from tiny_models import make_hf_model
    hf = make_hf_model("llama", vocab_size=VOCAB, max_position_embeddings=1024)
    return LlamaForCausalLM.from_weights(hf_config(hf.config.to_dict() | {"architectures": ["LlamaForCausalLM"]}),
                                         hf.state_dict())


@pytest.fixture(scope="module")
def draft_model():
    """The small model with noise on its weights: it agrees with it often, not always."""
    from kvserve.model.llama import LlamaForCausalLM
    from kvserve.model.loader import hf_config
    from tiny_models import make_hf_model
    hf = make_hf_model("llama", vocab_size=VOCAB, max_position_embeddings=1024)
    torch.manual_seed(5)
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return LlamaForCausalLM.from_weights(hf_config(hf.config.to_dict() | {"architectures": ["LlamaForCausalLM"]}),
                                         hf.state_dict())


@pytest.fixture
def make(small_model, draft_model):
    def make(spec=None, num_pages=512, page_size=16, budget=512, max_seqs=64, k=4, max_batch=None):
        # self: a window short enough that the draft passes read a part of the context
        cfg = EngineConfig(speculative=spec, num_speculative_tokens=k, speculative_window=2,
                           cache=CacheConfig(page_size, num_pages, None, True),
                           scheduler=SchedulerConfig(budget, max_seqs))
        engine = Engine(cfg, model=small_model, tokenizer=token_tokenizer(VOCAB),
                        draft_model=draft_model if spec == "draft" else None)
        if spec and max_batch is not None:
            engine.speculator.max_batch = max_batch
        return engine
    return make


def run(engine, prompts, params):
    ids = [engine.add_request(p, params if isinstance(params, SamplingParams) else params[i])
           for i, p in enumerate(prompts)]
    done = {}
    while engine.has_unfinished():
        for out in engine.step():
            assert out.error is None, out.error
            if out.finished:
                done[out.request_id] = out
    return [done[i] for i in ids]


def prompts(n, seed=0):
    rng = random.Random(seed)
    out = [[rng.randrange(3, VOCAB) for _ in range(rng.randint(4, 40))] for _ in range(n)]
    return out + [[5, 6, 7, 8, 9, 10] * 6, [rng.randrange(3, VOCAB) for _ in range(7)] * 5]


def balanced(engine):
    engine.kv.check_integrity([])
    return engine.pool.num_free + (len(engine.kv.prefix) if engine.kv.prefix else 0) == engine.pool.num_pages


GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


# ---- the ngram index ---------------------------------------------------------------------------

def test_ngram_index_finds_the_latest_earlier_occurrence_incrementally():
    index = NgramIndex(2, 4)
    tokens = [1, 2, 3, 4, 9, 1, 2, 3, 5, 7, 1, 2]
    assert index.propose(tokens, 3) == [3, 5, 7]  # (1, 2) last seen before [3, 5, 7], not [3, 4, 9]
    tokens += [3]
    assert index.propose(tokens, 2) == [5, 7]  # (1, 2, 3) -> its latest continuation
    assert index.propose([1, 2, 3, 8, 8], 3) == []  # (8, 8) and (3, 8, 8)... never seen before
    periodic = NgramIndex(2, 4)
    assert periodic.propose([4, 4, 4, 4], 3) == [4, 4, 4]  # a repeat extends past the end
    assert periodic.propose([4, 4, 4, 4, 6, 1, 4, 6, 1, 4], 5) == [6, 1, 4, 6, 1]


# ---- greedy: the same tokens ----------------------------------------------------------------------

@pytest.mark.parametrize("spec", ["ngram", "self", "draft"])
def test_greedy_output_is_unchanged_alone_and_in_batches(make, spec):
    ps = prompts(2)
    plain = [o.outputs[0].token_ids for o in run(make(), ps, GREEDY)]
    engine = make(spec)
    for p, expected in zip(ps, plain):
        assert run(engine, [p], GREEDY)[0].outputs[0].token_ids == expected
    assert balanced(engine)
    engine = make(spec, max_batch=64)
    assert [o.outputs[0].token_ids for o in run(engine, ps, GREEDY)] == plain
    stats = engine.speculator.stats
    assert stats.accepted > 0 and stats.proposed > stats.accepted or spec != "ngram"
    assert stats.emitted > stats.rounds  # runs of several tokens were accepted
    assert balanced(engine)


def test_the_draft_model_runs_the_prompt_in_the_step_of_the_first_token(make):
    """Its prefill belongs to the prompt's processing (time to first token), not to the decode
    steps after it: the first verification then runs only the last token through the draft."""
    engine = make("draft")
    prompt = prompts(1)[0]
    engine.add_request(prompt, GREEDY)
    while not any(o.outputs and o.outputs[0].token_ids for o in engine.step()):
        pass
    seq = engine.scheduler.running[0]
    shadow = engine.speculator.proposer.shadows[seq.seq_id]
    assert shadow.written == prompt  # the first token's K/V waits for the first draft step
    while engine.has_unfinished():
        engine.step()
    assert engine.speculator.stats.rounds > 0


def test_large_batches_do_not_speculate(make):
    engine = make("ngram", max_batch=2)
    run(engine, prompts(4), GREEDY)  # six at once, then fewer as they finish
    first = engine.speculator.stats.rounds
    engine2 = make("ngram", max_batch=64)
    run(engine2, prompts(4), GREEDY)
    assert first < engine2.speculator.stats.rounds


def test_requests_waiting_count_toward_the_batch_that_stops_speculation(make):
    """One sequence runs at a time (max_seqs=1): while more than max_batch are running or waiting,
    its decodes take no draft rows from the prompts' budget."""
    engine = make("ngram", max_seqs=1, max_batch=2)
    for p in prompts(4):
        engine.add_request(p, GREEDY)
    rounds_while_busy = 0
    while engine.has_unfinished():
        busy = len(engine.scheduler.running) + len(engine.scheduler.waiting) > 2
        before = engine.speculator.stats.rounds
        engine.step()
        rounds_while_busy += (engine.speculator.stats.rounds - before) * busy
    assert rounds_while_busy == 0 and engine.speculator.stats.rounds > 0


class WrongProposer:
    """Drafts a token the greedy target never picks next (its argmax is not known here, so: one
    the model is made never to pick, by a logit bias in the test)."""
    def propose(self, seqs, ks):
        return [[VOCAB - 1] * k for k in ks]


def test_low_acceptance_pauses_a_request_and_drafts_start_short(make):
    engine = make("ngram")
    engine.speculator.proposer = WrongProposer()
    params = SamplingParams(temperature=0, max_tokens=80, ignore_eos=True, logit_bias={VOCAB - 1: -100})
    run(engine, prompts(0)[:1], params)
    stats = engine.speculator.stats
    assert stats.accepted == 0 and stats.proposed == stats.rounds  # one-token drafts until trusted
    assert 2 <= stats.rounds <= 5  # a round, then pauses of 16, 32, ... steps


def test_a_request_can_turn_speculation_off(make):
    engine = make("ngram")
    run(engine, prompts(0)[:1], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, speculative=False))
    assert engine.speculator.stats.rounds == 0


def test_stop_strings_and_max_tokens_inside_accepted_runs(make):
    p = [5, 6, 7, 8, 9, 10] * 6
    plain_engine, engine = make(), make("ngram")
    plain = run(plain_engine, [p], GREEDY)[0].outputs[0]
    tokens = plain.token_ids
    for i in range(2, 22, 4):
        stop = plain.text[max(0, plain.text.find(f"<{tokens[i]}>") - 2):][:5]  # may span tokens
        params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, stop=[stop])
        want = run(plain_engine, [p], params)[0].outputs[0]
        got = run(engine, [p], params)[0].outputs[0]
        assert (got.text, got.token_ids, got.finish_reason, got.stop_reason) == \
            (want.text, want.token_ids, want.finish_reason, want.stop_reason)
    assert engine.speculator.stats.emitted > engine.speculator.stats.rounds
    assert balanced(engine)
    for max_tokens in range(1, 10):
        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, logprobs=2)
        want = run(plain_engine, [p], params)[0].outputs[0]
        got = run(engine, [p], params)[0].outputs[0]
        assert got.token_ids == want.token_ids == tokens[:max_tokens]
        # logprobs of accepted tokens come from the target, as without speculation
        for a, b in zip(got.logprobs, want.logprobs):
            assert a.token_id == b.token_id and a.logprob == pytest.approx(b.logprob, abs=1e-4)
            assert [t for t, _ in a.top_logprobs] == [t for t, _ in b.top_logprobs]
    assert balanced(engine)


def test_a_stop_token_inside_a_run_drops_the_rest(make):
    p = [5, 6, 7, 8, 9, 10] * 6
    tokens = run(make(), [p], GREEDY)[0].outputs[0].token_ids
    stop_id = tokens[7]
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, stop_token_ids=[stop_id])
    engine = make("ngram")
    got = run(engine, [p], params)[0].outputs[0]
    assert got.token_ids == tokens[:tokens.index(stop_id) + 1] and got.finish_reason == "stop"
    assert balanced(engine)


# ---- sampling: the same distribution --------------------------------------------------------------

class FixedProposer:
    """Drafts the same tokens every time: mostly wrong, so rejections and resampling happen."""
    def propose(self, seqs, ks):
        return [[3, 4, 5, 6][:k] for k in ks]


def _rows(params, ids, n):
    return [SamplingRow(params, ids, 2, None, [2]) for _ in range(n)]


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.7, top_k=6, top_p=0.9, min_p=0.02),
    SamplingParams(temperature=1.2, repetition_penalty=1.5, presence_penalty=0.7, frequency_penalty=0.3,
                   logit_bias={4: 2.0, 9: -1.0}, min_tokens=3),
], ids=["plain", "truncated", "processed"])
def test_verify_keeps_the_target_distribution(params):
    """verify on fixed logits: the first token follows p0, and after accepting the first draft
    token the second follows p1 (computed over the context that includes it), as the sampler's
    reference would draw them."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 12, generator=gen) * 1.5
    logits[:, 4:6] += 1.0  # the draft tokens are likely enough to be accepted often
    draft, context, n = [4, 5], [1, 4, 7, 4], 30000
    seqs = [SimpleNamespace(draft_token_ids=draft, params=params, token_ids=context, num_prompt_tokens=2,
                            generator=None) for _ in range(n)]
    torch.manual_seed(1)
    out = verify(logits.repeat(n, 1), seqs, [2])

    def target(j):  # the sampler's distribution at row j, the draft's first j tokens in context
        row = _rows(params, context + draft[:j], 1)
        return truncated(process(logits[j:j + 1], row), [params]).softmax(-1)[0]
    for j, drawn in ((0, [t[0].token_id for t in out]),
                     (1, [t[1].token_id for t in out if t[0].token_id == draft[0]])):
        p = target(j)
        counts = Counter(drawn)
        assert set(counts) <= {i for i in range(12) if p[i] > 0}
        expected = {i: float(p[i]) for i in range(12) if p[i] > 1e-3}
        stat = sum((counts[i] - len(drawn) * q) ** 2 / (len(drawn) * q) for i, q in expected.items())
        df = len(expected) - 1
        assert stat < df + 6 * (2 * df) ** 0.5, (j, stat, df)
    assert any(len(t) == 1 for t in out) and any(len(t) > 1 for t in out)  # rejections and acceptances


def test_engine_samples_the_same_distribution_with_speculation(make):
    """Two-sample chi-square per output position, speculation on vs off, with many requests; the
    drafts are mostly wrong, so rejections and resampling happen as often as acceptances."""
    p = [7, 8, 9, 7, 8, 9, 7, 8]
    params = SamplingParams(temperature=1.0, max_tokens=3, ignore_eos=True, top_k=12, presence_penalty=0.5,
                            logit_bias={3: 1.5, 4: 1.5, 5: 1.5})  # the drafts' tokens: often accepted
    n = 1000
    torch.manual_seed(0)
    plain = run(make(max_seqs=512), [p] * n, params)
    engine = make("ngram", max_seqs=512, k=3, max_batch=10**6)
    engine.speculator.proposer = FixedProposer()
    torch.manual_seed(1)
    spec = run(engine, [p] * n, params)
    stats = engine.speculator.stats
    assert stats.proposed > stats.accepted > 0  # both acceptances and rejections
    for pos in range(3):
        a = Counter(o.outputs[0].token_ids[pos] for o in plain)
        b = Counter(o.outputs[0].token_ids[pos] for o in spec)
        keys = sorted(k for k in set(a) | set(b) if a[k] + b[k] >= 10)
        _, pvalue, _, _ = chi2_contingency([[a[k] for k in keys], [b[k] for k in keys]])
        assert pvalue > 1e-4, (pos, pvalue)
    assert balanced(engine)


# ---- rollback under preemption ------------------------------------------------------------------

@settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.data())
def test_random_workloads_with_speculation_balance_pages(make, data):
    """A small pool (preemption), page sizes 1-16, small token budgets (drafts cut to fit): greedy
    outputs equal a roomy engine's without speculation and every page comes back."""
    seed = data.draw(st.integers(0, 10**6))
    rng = random.Random(seed)
    page_size = data.draw(st.sampled_from([1, 4, 16]))
    spec = data.draw(st.sampled_from(["ngram", "self", "draft"]))
    small = make(spec, num_pages=max(8, 160 // page_size), page_size=page_size,
                 budget=data.draw(st.sampled_from([8, 64, 512])), max_seqs=8, max_batch=8)
    roomy = make(num_pages=1024 // page_size, page_size=page_size)
    work = []
    for i in range(data.draw(st.integers(2, 8))):
        base = prompts(0, seed + i)[rng.randrange(2)]
        p = base[:rng.randint(4, len(base))]
        work.append((p, SamplingParams(temperature=0, max_tokens=rng.randint(1, 24), ignore_eos=True,
                                       n=rng.choice([1, 1, 2]))))
    expected = run(roomy, [p for p, _ in work], [w for _, w in work])
    got = run(small, [p for p, _ in work], [w for _, w in work])
    assert [[o.token_ids for o in r.outputs] for r in got] == [[o.token_ids for o in r.outputs] for r in expected]
    assert balanced(small)


# ---- self speculation on the C step --------------------------------------------------------------

def test_self_drafts_on_the_c_step_read_the_streaming_view(tmp_path):
    """With one-token pages the shortened page table is exactly the streaming policy's positions:
    the C step's draft logits equal PolicyAttention's, and greedy outputs equal plain decoding."""
    from engine.test_native_decode import int4_model
    from kvserve.engine.executors import NativeExecutor
    model = int4_model(tmp_path)
    tokenizer = token_tokenizer(model.config.vocab_size)

    def engine(spec):
        cfg = EngineConfig(speculative=spec, speculative_window=4, cache=CacheConfig(1, 512, None, True))
        return Engine(cfg, model=model, tokenizer=tokenizer)
    spec = engine("self")
    assert isinstance(spec.runner.executor, NativeExecutor)
    proposer = spec.speculator.proposer
    prompt = [random.Random(i).randrange(3, 250) for i in range(60)]
    spec.add_request(prompt, SamplingParams(temperature=0, max_tokens=5))
    seq = spec.scheduler.waiting[0]
    spec.step()  # the prompt's K/V
    spec.kv.allocate(seq, 70)
    positions = [59, 40, 6]  # past the sink and window, and within them (the whole context)
    native = proposer._forward([seq.token_ids[p] for p in positions], [seq] * 3, positions)
    proposer.native = None
    policy = torch.cat([proposer._forward([seq.token_ids[p]], [seq], [p]) for p in positions])
    assert torch.allclose(native, policy, atol=2e-3, rtol=1e-3), (native - policy).abs().max()

    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    prompts = [prompt, prompt[:20] * 3]
    want = [o.outputs[0].token_ids for o in run(engine(None), prompts, params)]
    spec = engine("self")
    spec.speculator.max_batch = 8
    assert [o.outputs[0].token_ids for o in run(spec, prompts, params)] == want
    assert spec.speculator.stats.rounds > 0 and balanced(spec)


def test_ngram_on_the_c_step_keeps_greedy_outputs(tmp_path):
    """decode.c runs a verification's rows on the few-rows int4 kernel (each row as it is alone) and
    attends them as one block: greedy outputs equal plain decoding's, alone and with 2-3 sequences
    in a step (rows past the kernel's 8 go to gemm.c)."""
    from engine.test_native_decode import int4_model
    from kvserve.engine.executors import NativeExecutor
    model = int4_model(tmp_path)
    tokenizer = token_tokenizer(model.config.vocab_size)

    def engine(spec):
        return Engine(EngineConfig(speculative=spec, cache=CacheConfig(16, 256, None, True)), model=model,
                      tokenizer=tokenizer)
    rng = random.Random(3)
    prompts = [[rng.randrange(3, 250) for _ in range(n)] * 3 for n in (9, 17, 30)]
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    want = [o.outputs[0].token_ids for o in run(engine(None), prompts, params)]
    spec = engine("ngram")
    assert isinstance(spec.runner.executor, NativeExecutor)
    assert [run(spec, [p], params)[0].outputs[0].token_ids for p in prompts] == want
    assert [o.outputs[0].token_ids for o in run(spec, prompts, params)] == want
    assert spec.speculator.stats.accepted > 0 and balanced(spec)


class OracleProposer:
    """Drafts the plain greedy continuation (known from a run without speculation): every draft is
    accepted whole."""
    free_drafts = True

    def __init__(self, prompt, output):
        self.full = prompt + output

    def propose(self, seqs, ks):
        return [self.full[len(s.token_ids):len(s.token_ids) + k] for s, k in zip(seqs, ks)]


def test_drafts_accepted_whole_grow_to_twice_k(make):
    prompt = prompts(0)[0]
    params = SamplingParams(temperature=0, max_tokens=60, ignore_eos=True)
    want = run(make(), [prompt], params)[0].outputs[0].token_ids
    engine = make("ngram", k=3)
    engine.speculator.proposer = OracleProposer(prompt, want)
    assert run(engine, [prompt], params)[0].outputs[0].token_ids == want
    stats = engine.speculator.stats
    assert stats.accepted == stats.proposed
    assert stats.proposed / stats.rounds > 4  # k = 1 twice until trusted, then 3, then 6 on
    assert balanced(engine)
