"""The batched sampler against straightforward per-row float64 references."""
import math
from collections import Counter

import pytest
import torch
from hypothesis import given, settings, strategies as st

from kvserve.engine.request import SamplingParams
from kvserve.engine.sampler import Sampler, SamplingRow

EOS = 9


def row(params=None, prompt=(), output=(), seed=None, eos=(EOS,)):
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    return SamplingRow(params or SamplingParams(), list(prompt) + list(output), len(prompt), gen, list(eos))


# ---- references ----------------------------------------------------------------------------------

def ref_processed(logits, r: SamplingRow) -> list[float]:
    """bias -> min_tokens -> repetition -> presence/frequency, one token at a time."""
    p, out = r.params, r.output_token_ids
    x = [float(v) for v in logits]
    for t, b in (p.logit_bias or {}).items():
        x[t] += b
    if len(out) < p.min_tokens:
        for t in p.stop_token_ids + ([] if p.ignore_eos else r.eos_token_ids):
            x[t] = -math.inf
    for t in set(r.prompt_token_ids + out):
        x[t] = x[t] / p.repetition_penalty if x[t] > 0 else x[t] * p.repetition_penalty
    for t, c in Counter(out).items():
        x[t] -= p.presence_penalty + p.frequency_penalty * c
    return x


def softmax(x, keep):
    m = max(x[i] for i in keep)
    e = {i: math.exp(x[i] - m) for i in keep}
    s = sum(e.values())
    return {i: v / s for i, v in e.items()}


def ref_support(processed, p: SamplingParams, tol=0.0) -> set[int]:
    """Tokens random sampling may return; tol > 0 widens every cut for float32-vs-float64 slack."""
    x = [v / p.temperature for v in processed]
    keep = {i for i, v in enumerate(x) if v > -math.inf}
    order = sorted(keep, key=lambda i: -x[i])
    if 0 < p.top_k < len(order):  # -inf tokens count towards k in the sampler too, but are never drawn
        kth = x[order[p.top_k - 1]]
        keep = {i for i in keep if x[i] >= kth - tol * (1 + abs(kth))}
    if p.top_p < 1:
        probs, mass, kept = softmax(x, keep), 0.0, set()
        for i in (i for i in order if i in keep):
            if mass >= p.top_p + tol:
                break
            kept.add(i)
            mass += probs[i]
        keep = kept
    if p.min_p > 0:
        top = max(x[i] for i in keep)
        keep = {i for i in keep if x[i] >= top + math.log(p.min_p) - tol * (1 + abs(top))}
    return keep


def ref_probs(processed, p: SamplingParams) -> dict[int, float]:
    return softmax([v / p.temperature for v in processed], ref_support(processed, p))


def chi_square_ok(tokens: list[int], probs: dict[int, float]) -> tuple[bool, float]:
    n, counts = len(tokens), Counter(tokens)
    stat = sum((counts[i] - n * q) ** 2 / (n * q) for i, q in probs.items())
    df = max(len(probs) - 1, 1)
    return stat < df + 6 * math.sqrt(2 * df), stat  # ~4 sigma; the seed is fixed, so no flakes


# ---- greedy ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_greedy_is_argmax_and_deterministic(dtype):
    logits = torch.randn(12, 100, generator=torch.Generator().manual_seed(0)).to(dtype)
    before = logits.clone()
    greedy = [SamplingParams(temperature=0), SamplingParams(top_k=1), SamplingParams(temperature=1e-7)]
    rows = [row(greedy[i % 3], seed=i if i % 2 else None) for i in range(12)]
    first = [t.token_id for t in Sampler()(logits, rows)]
    assert first == logits.float().argmax(-1).tolist()
    torch.manual_seed(123)
    assert [t.token_id for t in Sampler()(logits, rows)] == first
    assert torch.equal(logits, before)  # the caller's logits are not modified
    assert Sampler()(logits[:0], []) == []  # a step where no sequence reached its end of prompt


# ---- random sampling: support and distribution ----------------------------------------------------

LOGITS = torch.tensor([3.0, -0.5, 2.5, 1.2, -3.0, 2.0, 0.0, 1.6, -1.0, 1.0, 0.5, -2.0])
CASES = {
    "plain": SamplingParams(),
    "cold": SamplingParams(temperature=0.5),
    "hot_top_k": SamplingParams(temperature=1.5, top_k=4),
    "top_k_off": SamplingParams(top_k=100),
    "top_p": SamplingParams(top_p=0.7),
    "min_p": SamplingParams(min_p=0.15),
    "all": SamplingParams(temperature=0.8, top_k=6, top_p=0.8, min_p=0.05),
}
GROUPS = [[c] for c in CASES] + [list(CASES), [c for c in CASES if CASES[c].top_p == 1]]


@pytest.mark.parametrize("group", GROUPS, ids=["+".join(g) for g in GROUPS])
def test_distribution_matches_reference(group):
    n = 20000
    names = [group[i % len(group)] for i in range(n * len(group))]  # interleaved: per-row params differ
    torch.manual_seed(0)
    tokens = [t.token_id for t in Sampler()(LOGITS.expand(len(names), -1), [row(CASES[c]) for c in names])]
    for name in group:
        drawn = [t for t, c in zip(tokens, names) if c == name]
        probs = ref_probs(LOGITS.tolist(), CASES[name])
        assert ref_support(LOGITS.tolist(), CASES[name], tol=1e-3) == set(probs)  # no token near a cut
        assert set(drawn) <= set(probs), name
        ok, stat = chi_square_ok(drawn, probs)
        assert ok, f"{name}: chi-square {stat:.1f} over {len(probs)} tokens"


def test_seeded_rows_follow_the_distribution():
    params = CASES["all"]
    tokens = [t.token_id for t in Sampler()(LOGITS.expand(3000, -1), [row(params, seed=s) for s in range(3000)])]
    probs = ref_probs(LOGITS.tolist(), params)
    assert set(tokens) <= set(probs)
    assert chi_square_ok(tokens, probs)[0]


# ---- logit processors --------------------------------------------------------------------------------

def test_penalties_hand_computed():
    params = SamplingParams(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25, logprobs=4)
    out = Sampler()(torch.tensor([[2.0, -1.0, 0.5, 3.0]]), [row(params, prompt=[0], output=[1, 1, 3])])[0]
    # 0: prompt, positive 2/2; 1: output x2, negative -1*2 - 0.5 - 2*0.25; 2: unseen; 3: 3/2 - 0.5 - 0.25
    expected = torch.tensor([1.0, -3.0, 0.5, 0.75]).log_softmax(-1)
    assert dict(out.top_logprobs) == pytest.approx(dict(enumerate(expected.tolist())), abs=1e-6)


def test_processing_matches_reference_per_row():
    g = torch.Generator().manual_seed(1)
    V = 40
    logits = torch.randn(6, V, generator=g) * 3
    paramss = [SamplingParams(repetition_penalty=1.3, logprobs=V),
               SamplingParams(presence_penalty=0.7, frequency_penalty=-0.3, logprobs=V),
               SamplingParams(logprobs=V),
               SamplingParams(repetition_penalty=0.8, presence_penalty=-0.4, logit_bias={3: 2.5, 7: -4.0},
                              logprobs=V),
               SamplingParams(min_tokens=5, stop_token_ids=[2], frequency_penalty=1.0, logprobs=V),
               SamplingParams(repetition_penalty=1.5, logprobs=V)]
    rows = [row(p, prompt=torch.randint(V, (7,), generator=g).tolist(),
                output=torch.randint(V, (i * 2,), generator=g).tolist()) for i, p in enumerate(paramss)]
    del rows[5].token_ids[rows[5].num_prompt_tokens:]  # an empty output next to non-empty ones
    for r, l, out in zip(rows, logits, Sampler()(logits, rows)):
        ref = torch.tensor(ref_processed(l, r), dtype=torch.float64).log_softmax(-1)
        got = torch.full((V,), math.nan, dtype=torch.float64)
        got[[t for t, _ in out.top_logprobs]] = torch.tensor([v for _, v in out.top_logprobs], dtype=torch.float64)
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_logit_bias_forces_and_forbids():
    logits = torch.randn(60, 20, generator=torch.Generator().manual_seed(2))
    rows = [row(SamplingParams(logit_bias={7: 100.0}), seed=i) for i in range(30)]
    best = logits[30:].argmax(-1).tolist()
    rows += [row(SamplingParams(temperature=0, logit_bias={b: -100.0})) for b in best]
    tokens = [t.token_id for t in Sampler()(logits, rows)]
    assert tokens[:30] == [7] * 30
    second = logits[30:].topk(2).indices[:, 1].tolist()
    assert tokens[30:] == second
    with pytest.raises(ValueError):
        Sampler()(logits[:1], [row(SamplingParams(logit_bias={20: 1.0}))])


def test_min_tokens_masks_eos_and_stop_ids_then_releases():
    logits = torch.zeros(1, 10)
    logits[0, 8], logits[0, 9], logits[0, 4] = 5.0, 4.0, 1.0  # stop id 8 > EOS 9 > token 4
    sampler = Sampler()

    def greedy(output, **kw):
        params = SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[8], **kw)
        return sampler(logits, [row(params, output=output)])[0].token_id

    assert greedy([]) == 4 and greedy([1]) == 4
    assert greedy([1, 1]) == 8
    assert greedy([], ignore_eos=True) == 9  # an EOS that does not stop needs no mask; stop ids still do
    rows = [row(SamplingParams(min_tokens=3, stop_token_ids=[8]), output=[1], seed=s) for s in range(500)]
    assert not {t.token_id for t in sampler(logits.expand(500, -1), rows)} & {8, 9}


# ---- seeds ---------------------------------------------------------------------------------------------

def test_seeded_row_is_independent_of_batch_composition():
    V, steps = 50, 10
    step_logits = [torch.randn(V, generator=torch.Generator().manual_seed(100 + s)) * 2 for s in range(steps)]
    target = SamplingParams(top_p=0.95, presence_penalty=0.3)
    others = [SamplingParams(), SamplingParams(temperature=0), SamplingParams(top_k=5, min_p=0.1),
              SamplingParams(temperature=0.3, top_p=0.5, repetition_penalty=1.2)]

    def generate(seed, layout, rng_seed):
        """layout: the batch around the target, as (params index, seeded?) for each other row."""
        torch.manual_seed(rng_seed)
        sampler, gen, out = Sampler(), torch.Generator().manual_seed(seed), []
        other_gens = [torch.Generator().manual_seed(999 + j) if seeded else None for j, (_, seeded) in
                      enumerate(layout)]
        for s in range(steps):
            rows, logits = [], []
            for (k, _), other_gen in zip(layout, other_gens):
                if k is None:
                    rows.append(SamplingRow(target, [1, 2, 3] + out, 3, gen, [EOS]))
                    logits.append(step_logits[s])
                else:
                    rows.append(SamplingRow(others[k], [4], 1, other_gen, [EOS]))
                    logits.append(torch.randn(V))
            out = out + [sampler(torch.stack(logits), rows)[[k for k, _ in layout].index(None)].token_id]
        return out

    alone = generate(1234, [(None, True)], rng_seed=0)
    assert generate(1234, [(None, True)], rng_seed=1) == alone
    layouts = [[(None, True), (0, False), (1, True)],
               [(2, True), (0, False), (None, True), (3, False), (0, True)],
               [(3, True), (3, False), (2, False), (1, False), (0, True), (None, True)]]
    for i, layout in enumerate(layouts):
        assert generate(1234, layout, rng_seed=i + 5) == alone, layout
    assert generate(4321, [(None, True)], rng_seed=0) != alone


# ---- logprobs ------------------------------------------------------------------------------------------

def test_logprobs_are_log_softmax_before_temperature():
    logits = torch.randn(4, 30, generator=torch.Generator().manual_seed(3)) * 2
    rows = [row(SamplingParams(temperature=0.5, top_k=3, logprobs=5), seed=0),
            row(SamplingParams(temperature=0, logprobs=0)),
            row(SamplingParams(temperature=0.7)),
            row(SamplingParams(logprobs=50), seed=1)]
    outs = Sampler()(logits, rows)
    ref = logits.double().log_softmax(-1)
    for i, n in [(0, 5), (1, 0), (3, 30)]:
        out = outs[i]
        assert out.logprob == pytest.approx(ref[i, out.token_id].item(), abs=1e-5)
        assert len(out.top_logprobs) == n
        assert [t for t, _ in out.top_logprobs] == ref[i].topk(n).indices.tolist()
        values = [v for _, v in out.top_logprobs]
        assert values == sorted(values, reverse=True)
        assert values == pytest.approx(ref[i].topk(n).values.tolist(), abs=1e-5)
    assert outs[2].logprob is None and outs[2].top_logprobs is None


# ---- property --------------------------------------------------------------------------------------------

def params_strategy():
    return st.builds(
        SamplingParams,
        temperature=st.one_of(st.just(0.0), st.floats(0.05, 3.0)),
        top_k=st.integers(-1, 70),
        top_p=st.floats(0.01, 1.0),
        min_p=st.one_of(st.just(0.0), st.floats(0.0, 1.0)),
        repetition_penalty=st.one_of(st.just(1.0), st.floats(0.5, 2.0)),
        presence_penalty=st.one_of(st.just(0.0), st.floats(-2.0, 2.0)),
        frequency_penalty=st.one_of(st.just(0.0), st.floats(-2.0, 2.0)),
        logit_bias=st.one_of(st.none(), st.dictionaries(st.integers(0, 7), st.floats(-50, 50), max_size=3)),
        max_tokens=st.none(),
        min_tokens=st.integers(0, 3),
        stop_token_ids=st.lists(st.integers(0, 7), max_size=3),
        ignore_eos=st.booleans(),
        logprobs=st.one_of(st.none(), st.integers(0, 8)),
    )


@settings(max_examples=150, deadline=None)
@given(vocab=st.integers(8, 64), logits_seed=st.integers(0, 2**31), scale=st.floats(0.1, 10.0),
       specs=st.lists(st.tuples(params_strategy(), st.lists(st.integers(0, 7), max_size=6),
                                st.lists(st.integers(0, 7), max_size=6), st.one_of(st.none(), st.integers(0, 99))),
                      min_size=1, max_size=6))
def test_tokens_always_in_allowed_set(vocab, logits_seed, scale, specs):
    logits = torch.randn(len(specs), vocab, generator=torch.Generator().manual_seed(logits_seed)) * scale
    rows = [row(p, prompt, output, seed, eos=[vocab - 1]) for p, prompt, output, seed in specs]
    outs = Sampler()(logits, rows)
    assert len(outs) == len(rows)
    for r, l, out in zip(rows, logits, outs):
        x, p, t = ref_processed(l, r), r.params, out.token_id
        if p.greedy:
            assert x[t] >= max(x) - 1e-4 * (1 + abs(max(x)))
        else:
            assert t in ref_support(x, p, tol=1e-4)
        if p.logprobs is None:
            assert out.logprob is None and out.top_logprobs is None
        else:
            ref = torch.tensor(x, dtype=torch.float64).log_softmax(-1)
            assert out.logprob == pytest.approx(ref[t].item(), abs=1e-3)
            values = [v for _, v in out.top_logprobs]
            assert len(values) == min(p.logprobs, vocab) and values == sorted(values, reverse=True)


def test_blocked_argmax_is_torch_argmax():
    """argmax_rows (the CPU's greedy pick, block maxima first) returns what argmax returns: the
    first maximum on ties, the first NaN where a row has one, column 0 of an all -inf row."""
    from kvserve.engine.sampler import argmax_rows
    g = torch.Generator().manual_seed(0)
    for trial in range(200):
        rows, vocab = int(torch.randint(1, 300, (1,), generator=g)), 32 * int(torch.randint(1, 40, (1,), generator=g))
        x = torch.randint(-3, 3, (rows, vocab), generator=g).float()  # many ties
        if trial % 3 == 0:
            x[torch.rand(rows, vocab, generator=g) < 0.01] = float("nan")
        if trial % 5 == 0:
            x[torch.rand(rows, vocab, generator=g) < 0.5] = float("-inf")
            x[0] = float("-inf")
        assert torch.equal(argmax_rows(x), x.argmax(-1)), trial
        assert torch.equal(argmax_rows(x[:, :vocab - 1]), x[:, :vocab - 1].argmax(-1))  # not a multiple of 32
