"""Inverse-CDF sampling: sampling.c and its PyTorch twin (sampler.inverse_cdf) against the softmax of
sampler.truncated, whose ops are written independently of both."""
import math

import pytest
import torch

from kvserve.engine.request import SamplingParams
from kvserve.engine.sampler import Sampler, SamplingRow, inverse_cdf, truncated
from kvserve.native.sampling import sample_rows

pytestmark = pytest.mark.skipif(sample_rows(torch.zeros(1, 2), torch.tensor([[1.0, 0, 1, 0]], dtype=torch.float64),
                                            torch.zeros(1)) is None, reason="no C compiler")

OPTIONS = {
    "temperature": SamplingParams(temperature=0.7),
    "hot": SamplingParams(temperature=1.8),
    "top_k": SamplingParams(temperature=0.9, top_k=7),
    "top_p": SamplingParams(temperature=0.8, top_p=0.6),
    "min_p": SamplingParams(temperature=1.1, min_p=0.08),
    "top_k_top_p": SamplingParams(temperature=1.3, top_k=12, top_p=0.75),
    "all": SamplingParams(temperature=0.6, top_k=20, top_p=0.9, min_p=0.02),
}


def table(params: list[SamplingParams]) -> torch.Tensor:
    return torch.tensor([(p.temperature, p.top_k, p.top_p, p.min_p) for p in params], dtype=torch.float64)


def kernel(logits, params, u, index=None):
    return sample_rows(logits, table(params), u, index)


def twin(logits, params, u):
    return inverse_cdf(truncated(logits, params), u)


def reference(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    return truncated(logits.unsqueeze(0).double(), [params])[0].softmax(-1)


def row_logits(vocab: int, seed: int) -> torch.Tensor:
    """Spread logits, no two within 1e-3 of each other (no token near a cut), with masked ones among them."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randperm(vocab, generator=g).float() * (6.0 / vocab) + torch.rand(vocab, generator=g) * 1e-4
    x[torch.randperm(vocab, generator=g)[:vocab // 10]] = -math.inf
    return x


@pytest.mark.parametrize("draw", [kernel, twin], ids=["kernel", "torch"])
@pytest.mark.parametrize("name", list(OPTIONS))
@pytest.mark.parametrize("vocab", [50, 333])
def test_grid_of_uniforms_reproduces_the_distribution(draw, name, vocab):
    """Inverse CDF over N evenly spaced uniforms hits each token about N p times (within 1 + rounding):
    an off-by-one in the CDF, a wrong cut or an ignored temperature moves whole tokens' mass."""
    n = 20000
    x = row_logits(vocab, seed=vocab)
    u = (torch.arange(n, dtype=torch.float64) + 0.5).div(n).float()
    tokens = draw(x.expand(n, -1).contiguous(), [OPTIONS[name]] * n, u)
    counts = torch.bincount(tokens, minlength=vocab).double()
    expected = reference(x, OPTIONS[name]) * n
    assert (counts[expected == 0] == 0).all(), "a token outside the truncated support was drawn"
    assert (counts - expected).abs().max() <= 2, (counts - expected).abs().max()


@pytest.mark.parametrize("name", list(OPTIONS))
def test_random_draws_pass_chi_square(name):
    vocab, n = 64, 30000
    x = row_logits(vocab, seed=7)
    tokens = kernel(x.expand(n, -1).contiguous(), [OPTIONS[name]] * n, torch.rand(n, generator=torch.Generator().manual_seed(1)))
    probs = reference(x, OPTIONS[name])
    keep = probs > 0
    counts = torch.bincount(tokens, minlength=vocab).double()
    assert counts[~keep].sum() == 0
    stat = ((counts[keep] - n * probs[keep]) ** 2 / (n * probs[keep])).sum().item()
    df = int(keep.sum()) - 1
    assert stat < df + 6 * math.sqrt(2 * max(df, 1)), stat  # ~4 sigma; fixed seed


def test_masked_tokens_never_drawn_at_extreme_uniforms():
    """u = 0 and u = 1 - 2^-24 take the first and the last kept token, never a masked one (masked
    tokens sit at both ends of the row and next to every kept one)."""
    vocab = 130  # not a multiple of the kernel's blocks
    x = torch.full((vocab,), -math.inf)
    x[1:-1:2] = torch.linspace(-2, 3, len(range(1, vocab - 1, 2)))
    for name, params in OPTIONS.items():
        keep = (reference(x, params) > 0).nonzero().flatten().tolist()
        for draw in (kernel, twin):
            for u, want in [(0.0, keep[0]), (1 - 2 ** -24, keep[-1])]:
                got = draw(x.unsqueeze(0).clone(), [params], torch.tensor([u], dtype=torch.float32)).item()
                assert got == want, (name, draw.__name__, u, got, want)
    # tiny kept weights next to the end: rounding at u -> 1 must still not fall off the kept set
    x = torch.full((vocab,), -math.inf)
    x[0], x[5] = 0.0, -80.0
    for draw in (kernel, twin):
        assert draw(x.unsqueeze(0), [SamplingParams()], torch.tensor([1 - 2 ** -24])).item() in (0, 5)


def test_kernel_and_torch_choose_the_same_token():
    """Same uniforms, same token, but where u * total falls within float rounding of a CDF step."""
    g = torch.Generator().manual_seed(3)
    rows, vocab = 400, 1000
    x = torch.randn(rows, vocab, generator=g) * torch.rand(rows, 1, generator=g) * 6
    x[torch.rand(rows, vocab, generator=g) < 0.05] = -math.inf
    names = list(OPTIONS)
    params = [OPTIONS[names[i % len(names)]] for i in range(rows)]
    u = torch.rand(rows, generator=g)
    a, b = kernel(x, params, u), twin(x, params, u)
    probs = truncated(x.double(), params).softmax(-1)
    cdf = probs.cumsum(-1)
    for i in (a != b).nonzero().flatten().tolist():
        lo, hi = sorted((a[i].item(), b[i].item()))
        step = cdf[i, lo].item()  # the boundary between them: u must sit on it
        assert abs(step - u[i].item()) < 1e-5 and probs[i, lo + 1:hi].sum() < 1e-6, i
    assert (a != b).float().mean() < 0.01


def test_large_vocab_matches_torch():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(48, 49152, generator=g) * 3
    params = [OPTIONS[n] for n in OPTIONS] * 6 + [SamplingParams(temperature=0.8, top_p=0.95)] * 6
    u = torch.rand(len(params), generator=g)
    a, b = kernel(x, params, u), twin(x, params, u)
    assert (a == b).float().mean() >= 0.95
    probs = truncated(x.double(), params).softmax(-1)
    assert (probs.gather(1, a.unsqueeze(1)) > 0).all()


def test_ties_at_a_cut_are_all_kept():
    """top-k keeps every token tied with the k-th, top-p every token tied with the last of its prefix;
    the kernel and truncated() agree."""
    x = torch.tensor([2.0, 1.0, 0.5, 1.0, 1.0, -1.0, 0.5, 3.0])
    cases = [(SamplingParams(top_k=2), {0, 7}), (SamplingParams(top_k=3), {0, 7, 1, 3, 4}),
             (SamplingParams(top_p=0.75), {0, 7, 1, 3, 4})]
    n = 4000
    u = (torch.arange(n) + 0.5).div(n).float()
    for params, support in cases:
        assert set((reference(x, params) > 0).nonzero().flatten().tolist()) == support
        assert set(kernel(x.expand(n, -1).contiguous(), [params] * n, u).tolist()) == support
    # top-p's prefix ends at the first of the three tokens at 1.0: the mass before it is below 0.75
    probs = x.double().softmax(-1)
    assert probs[[0, 7]].sum() < 0.75 <= probs[[0, 7, 1]].sum()


def test_rows_by_index_and_greedy_rows_in_a_mixed_batch():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(6, 300, generator=g)
    params = [OPTIONS["top_p"], OPTIONS["all"]]
    u = torch.rand(2, generator=g)
    index = torch.tensor([4, 1])
    assert torch.equal(kernel(x, params, u, index), kernel(x[[4, 1]].contiguous(), params, u))
    rows = [SamplingRow(SamplingParams(temperature=0), [1], 1, None, [0]) for _ in range(6)]
    rows[1] = SamplingRow(OPTIONS["top_k"], [1], 1, torch.Generator().manual_seed(0), [0])
    rows[4] = SamplingRow(OPTIONS["min_p"], [1], 1, None, [0])
    tokens = [t.token_id for t in Sampler()(x, rows)]
    greedy = x.argmax(-1).tolist()
    assert [tokens[i] for i in (0, 2, 3, 5)] == [greedy[i] for i in (0, 2, 3, 5)]
    assert reference(x[1], OPTIONS["top_k"])[tokens[1]] > 0 and reference(x[4], OPTIONS["min_p"])[tokens[4]] > 0


def test_a_seeded_row_draws_one_uniform_a_step():
    """One float from the request's own CPU generator per step: its stream does not depend on the vocabulary."""
    x = torch.randn(2, 5000)
    g, twin_g = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    Sampler()(x, [SamplingRow(OPTIONS["all"], [1], 1, g, [0]), SamplingRow(OPTIONS["hot"], [1], 1, None, [0])])
    torch.rand(1, generator=twin_g)
    assert torch.equal(torch.rand(3, generator=g), torch.rand(3, generator=twin_g))
