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


def capped(scores: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """Gemma 2's bound on the scaled scores: softcap * tanh(scores / softcap); None leaves them."""
    return scores if not softcap else torch.tanh(scores / softcap) * softcap


def attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                       bias: torch.Tensor | None = None, softcap: float | None = None):
    """Plain attention returning its state: q [..., L, D], k/v [..., S, D] -> out [..., L, D], lse [..., L]."""
    scores = capped(torch.matmul(q, k.transpose(-1, -2)).float() * scale, softcap)
    if bias is not None:
        scores = scores + bias
    lse = torch.logsumexp(scores, -1)
    probs = torch.exp(scores - lse.unsqueeze(-1)).to(q.dtype)
    return torch.matmul(probs, v), lse


def grouped_attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                               softcap: float | None = None):
    """One decode token's heads against their KV heads' keys: q [H, D], k/v [Hkv, S, D] (query head h
    reads KV head h // (H / Hkv)) -> out [H, D] float32, lse [H]. [Hkv, group, D] against [Hkv, S, D]:
    batched matmuls, no broadcast copies of K/V."""
    hkv, d = k.shape[0], k.shape[2]
    out, lse = attention_with_lse(q.view(hkv, -1, d), k.to(q.dtype), v.to(q.dtype), scale, softcap=softcap)
    return out.reshape(-1, d).float(), lse.reshape(-1)
