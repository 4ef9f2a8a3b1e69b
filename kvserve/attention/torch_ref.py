"""Portable paged attention in plain PyTorch; the reference every other backend is tested against.

`plan()` turns the step's page table into gather indices once; `run()` is called per layer.
Decodes (one query row) are batched into one SDPA call over their KV padded to the longest
decode; prefill chunks run one SDPA each with a causal mask offset by their cached prefix,
so a chunk is never padded to another request's length.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvserve.attention.metadata import AttentionMetadata
from kvserve.kv.pool import PagePool


@dataclass
class _Chunk:
    q_start: int
    q_end: int
    kv_slots: torch.Tensor
    mask: torch.Tensor | None  # None: the chunk is the whole sequence, plain causal


class TorchRefAttention:
    def __init__(self, pool: PagePool, num_heads: int, head_dim: int, scale: float | None = None):
        self.pool = pool
        self.num_heads = num_heads
        self.scale = scale if scale is not None else head_dim ** -0.5

    def plan(self, meta: AttentionMetadata) -> None:
        device = self.pool.k.device
        q_lens, kv_lens = meta.q_lens().tolist(), meta.kv_lens().tolist()
        qo = meta.qo_indptr.tolist()
        slots, decode_rows, decode_slots, self.chunks = [], [], [], []
        for i, (q_len, kv_len) in enumerate(zip(q_lens, kv_lens)):
            slots.append(meta.token_slots(i, kv_len - q_len, kv_len))
            if q_len == 1:
                decode_rows.append(qo[i])
                decode_slots.append(meta.token_slots(i, 0, kv_len))
            elif q_len > 1:
                mask = None
                if q_len != kv_len:  # query row r sees KV positions <= kv_len - q_len + r
                    mask = torch.ones(q_len, kv_len, dtype=torch.bool).tril(kv_len - q_len)
                    mask = mask.to(device)
                self.chunks.append(_Chunk(qo[i], qo[i + 1], meta.token_slots(i, 0, kv_len).to(device), mask))
        self.slot_mapping = torch.cat(slots).to(device) if slots else torch.empty(0, dtype=torch.long)
        self.decode_rows = torch.tensor(decode_rows, dtype=torch.long, device=device)
        if decode_slots:
            width = max(len(s) for s in decode_slots)
            self.decode_slots = torch.zeros(len(decode_slots), width, dtype=torch.long)
            self.decode_mask = torch.zeros(len(decode_slots), 1, 1, width, dtype=torch.bool)
            for r, s in enumerate(decode_slots):
                self.decode_slots[r, :len(s)] = s
                self.decode_mask[r, ..., :len(s)] = True
            self.decode_slots, self.decode_mask = self.decode_slots.to(device), self.decode_mask.to(device)

    def run(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [T, H, D], k/v [T, Hkv, D] of this step's tokens -> attention output [T, H, D]."""
        k_cache, v_cache = self.pool.k[layer], self.pool.v[layer]
        k_cache.index_copy_(0, self.slot_mapping, k.to(k_cache.dtype))
        v_cache.index_copy_(0, self.slot_mapping, v.to(v_cache.dtype))
        out = torch.empty_like(q)
        if len(self.decode_rows):
            qd = q[self.decode_rows].unsqueeze(2)  # [B, H, 1, D]
            kd = k_cache[self.decode_slots].transpose(1, 2).to(q.dtype)  # [B, Hkv, W, D]
            vd = v_cache[self.decode_slots].transpose(1, 2).to(q.dtype)
            od = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=self.decode_mask,
                                                scale=self.scale, enable_gqa=True)
            out[self.decode_rows] = od.squeeze(2)
        for c in self.chunks:
            qc = q[c.q_start:c.q_end].transpose(0, 1)  # [H, L, D]
            kc = k_cache[c.kv_slots].transpose(0, 1).to(q.dtype)
            vc = v_cache[c.kv_slots].transpose(0, 1).to(q.dtype)
            oc = F.scaled_dot_product_attention(qc, kc, vc, attn_mask=c.mask, is_causal=c.mask is None,
                                                scale=self.scale, enable_gqa=True)
            out[c.q_start:c.q_end] = oc.transpose(0, 1)
        return out
