"""The logits near each row's best, recomputed in fp32: on the CPU every one within the margin
(rescore_near_best); on a GPU the best RESCORE_TOP of a row, with fixed shapes so that a step does
not wait for the device (rescore_top). Both against logits computed in fp32 outright."""
import torch

from kvserve.model.llama import RESCORE_MARGIN, RESCORE_TOP, rescore_near_best, rescore_top


def test_both_give_the_exact_logits_near_the_best_and_keep_the_rest():
    g = torch.Generator().manual_seed(1)
    rows, vocab, hidden = 6, 400, 32
    weight, h = torch.randn(vocab, hidden, generator=g), torch.randn(rows, hidden, generator=g)
    exact = h @ weight.T
    approx = exact.bfloat16().float()  # a bf16 lm_head's rounding
    near = (approx >= approx.amax(-1, keepdim=True) - RESCORE_MARGIN).sum(-1)
    assert near.max() <= RESCORE_TOP  # the usual case: rescore_top covers them all
    for rescore in (rescore_near_best, rescore_top):
        got = approx.clone()
        rescore(got, h, lambda tokens: weight[tokens])
        is_near = approx >= approx.amax(-1, keepdim=True) - RESCORE_MARGIN
        torch.testing.assert_close(got[is_near], exact[is_near], atol=1e-5, rtol=1e-5)
        assert torch.equal(got[~is_near], approx[~is_near])
        assert torch.equal(got.argmax(-1), exact.argmax(-1))


def test_rescore_top_rescoring_only_its_best_when_more_are_near():
    g = torch.Generator().manual_seed(2)
    rows, vocab, hidden = 3, 200, 16
    weight, h = torch.randn(vocab, hidden, generator=g) * 0.01, torch.randn(rows, hidden, generator=g)
    exact = h @ weight.T  # all within the margin of one another
    approx = exact.bfloat16().float()
    got = approx.clone()
    rescore_top(got, h, lambda tokens: weight[tokens])
    top = approx.topk(RESCORE_TOP, dim=-1).indices
    torch.testing.assert_close(got.gather(1, top), exact.gather(1, top), atol=1e-6, rtol=1e-5)
    assert (got != approx).sum(-1).max() <= RESCORE_TOP
