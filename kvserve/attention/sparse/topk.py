"""Exact top-k attention: each query head keeps its k highest-scoring keys. MagicPIG's baseline,
an oracle of what a key budget can buy: it still scores every key, and saves only V's reads. The
PyTorch path for any device; on the CPU, paged_attention.topk_decode does it in place."""
import torch

from kvserve.attention.merge import capped


def topk_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, k: int,
                   scale: float, softcap: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """q [H, D] over keys/values [Hkv, T, D] -> out [H, D] float32, lse [H] over each head's top k
    (ranked by the scores, capped by softcap if any)."""
    hkv, t, d = keys.shape
    qg = q.float().view(hkv, -1, d)
    scores = capped(torch.matmul(qg, keys.float().transpose(1, 2)) * scale, softcap)  # [Hkv, g, T]
    top, idx = scores.topk(min(k, t), dim=-1)
    lse = torch.logsumexp(top, -1)
    probs = torch.exp(top - lse[..., None])
    picked = values.float()[torch.arange(hkv, device=q.device)[:, None, None], idx]  # [Hkv, g, k, D]
    out = (probs[..., None] * picked).sum(-2)
    return out.reshape(-1, d), lse.reshape(-1)
