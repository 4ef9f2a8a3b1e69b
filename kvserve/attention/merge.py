"""Combining attention over disjoint key sets (FlashInfer's merge_state rule, natural log).

An attention state is the output over some keys plus the log-sum-exp of their scores; two
states over disjoint keys merge into exactly the attention over their union."""
import torch


def merge_state(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor):
    """out [..., D] with lse [...] (float32) -> merged (out, lse)."""
    lse = torch.logaddexp(lse_a, lse_b)
    w_a = torch.exp(lse_a - lse).unsqueeze(-1)
    w_b = torch.exp(lse_b - lse).unsqueeze(-1)
    return (out_a.float() * w_a + out_b.float() * w_b).to(out_a.dtype), lse


def attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                       bias: torch.Tensor | None = None):
    """Plain attention returning its state: q [..., L, D], k/v [..., S, D] -> out [..., L, D], lse [..., L]."""
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * scale
    if bias is not None:
        scores = scores + bias
    lse = torch.logsumexp(scores, -1)
    probs = torch.exp(scores - lse.unsqueeze(-1)).to(q.dtype)
    return torch.matmul(probs, v), lse
