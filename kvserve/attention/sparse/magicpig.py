"""MagicPIG (arXiv 2410.16179): attention estimated from keys sampled by SimHash collisions.

Keys (centred by their mean, per KV head) are hashed into L tables of K sign bits each. A key is
sampled for a query when it falls in the query's bucket in at least 2 tables; its inclusion
probability w is known in closed form from the angle, so dividing its softmax weight by w
(subtracting ln w from its logit) makes the sampled sums unbiased estimates of the full ones.
Tables are CSR per (KV head, table): key ids sorted by bucket and bucket offsets, so finding a
query's candidates reads only its buckets (about L * T / 2^K ids), never all T keys.
"""
import ctypes
import math
from dataclasses import dataclass
from functools import cache

import torch

from kvserve import native
from kvserve.attention.merge import capped, grouped_attention_with_lse, merge_state

MIN_COLLISIONS = 2
MAX_NARROW_KEYS = 1 << 16  # tables of up to this many keys store ids as 16 bits: half the memory
W_EPS = 1e-4  # the paper's floor inside ln(w + eps): bounds the weight of rarely sampled keys


def projections(head_dim: int, K: int, L: int, seed: int, layer: int) -> torch.Tensor:
    """The layer's Gaussian hash matrix [D, K*L]; the same for every request with the same seed."""
    g = torch.Generator().manual_seed(seed * 100_003 + layer)
    return torch.randn(head_dim, K * L, generator=g, device="cpu")


def projection_panels(proj: torch.Tensor) -> torch.Tensor:
    """proj [D, K*L] as the C hash kernel reads it: panels [P, D, 16] of 16 columns, zero-padded."""
    d, n = proj.shape
    padded = torch.zeros(d, (n + 15) // 16 * 16, device="cpu")
    padded[:, :n] = proj
    return padded.view(d, -1, 16).transpose(0, 1).contiguous()


def simhash(x: torch.Tensor, proj: torch.Tensor, K: int, L: int, panels: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., D] -> bucket codes [..., L] (int64 in [0, 2^K)): the sign bits of K projections each.
    With `panels` (projection_panels(proj)) a C kernel hashes: ~5x PyTorch's speed on many rows."""
    kernel = _kernel("magicpig_hash") if panels is not None and x.device.type == "cpu" else None
    if kernel is not None:
        rows = x.reshape(-1, x.shape[-1]).float().contiguous()
        codes = torch.empty(rows.shape[0], L, dtype=torch.int16, device="cpu")
        if kernel(rows.data_ptr(), rows.shape[0], rows.shape[1], panels.data_ptr(), panels.shape[0], K, L,
                  codes.data_ptr()) == 0:
            return codes.view(*x.shape[:-1], L).long()
    bits = (x.float() @ proj > 0).view(*x.shape[:-1], L, K)
    return (bits.float() @ (2.0 ** torch.arange(K, device=x.device))).long()  # exact: codes < 2^15


@dataclass
class BucketTables:
    """CSR hash tables of one layer: sorted_ids [Hkv, L, T], offsets [Hkv, L, 2^K + 1]; and
    the codes of keys added after the build (the few that leave the dense window later), compared
    directly and numbered after the tables' keys: extra [Hkv, room, L] int16, num_extra in use.
    sorted_ids are int32, or, when narrow (T <= MAX_NARROW_KEYS), uint16 bits in an int16 tensor
    (PyTorch indexes few ops of uint16)."""
    sorted_ids: torch.Tensor
    offsets: torch.Tensor
    K: int
    extra: torch.Tensor
    num_extra: int = 0

    @classmethod
    def build(cls, codes: torch.Tensor, K: int) -> "BucketTables":
        """codes [Hkv, T, L] -> tables; a counting sort per table (C), or one argsort and bincount for all."""
        hkv, t, L = codes.shape
        buckets = 1 << K
        device = codes.device
        extra = torch.empty(hkv, 0, L, dtype=torch.int16, device=device)
        narrow = t <= MAX_NARROW_KEYS
        kernel = _kernel("magicpig_build") if codes.device.type == "cpu" else None
        if kernel is not None:  # a counting sort: ~40x faster than argsort at 32k keys
            c = codes.transpose(1, 2).to(torch.int16).contiguous()  # [Hkv, L, T]
            offsets = torch.empty(hkv, L, buckets + 1, dtype=torch.int64, device=device)
            sorted_ids = torch.empty(hkv, L, t, dtype=torch.int16 if narrow else torch.int32, device=device)
            kernel(c.data_ptr(), hkv * L, t, buckets, offsets.data_ptr(), sorted_ids.data_ptr(), int(narrow))
            return cls(sorted_ids, offsets, K, extra)
        c = codes.transpose(1, 2).long()  # [Hkv, L, T]
        order = torch.argsort(c, dim=-1, stable=True)
        table = torch.arange(hkv * L, device=device).view(hkv, L, 1)
        counts = torch.bincount((table * buckets + c).flatten(), minlength=hkv * L * buckets).view(hkv, L, buckets)
        offsets = torch.zeros(hkv, L, buckets + 1, dtype=torch.int64, device=device)
        offsets[..., 1:] = counts.cumsum(-1)
        if narrow:  # ids past 32767 as their uint16 bits
            return cls(torch.where(order < 1 << 15, order, order - (1 << 16)).to(torch.int16).contiguous(),
                       offsets, K, extra)
        return cls(order.to(torch.int32).contiguous(), offsets, K, extra)

    @property
    def extra_codes(self) -> torch.Tensor:
        return self.extra[:, :self.num_extra]

    def reserve(self, n: int) -> None:
        """Room for n more extra keys (doubling, so that adding a key a step copies little)."""
        if self.num_extra + n > self.extra.shape[1]:
            hkv, room, L = self.extra.shape
            grown = torch.empty(hkv, max(2 * room, self.num_extra + n, 16), L, dtype=torch.int16,
                                device=self.extra.device)
            grown[:, :self.num_extra] = self.extra_codes
            self.extra = grown

    def add(self, codes: torch.Tensor) -> None:
        """codes [Hkv, n, L] of the next n keys."""
        self.reserve(codes.shape[1])
        self.extra[:, self.num_extra:self.num_extra + codes.shape[1]] = codes
        self.num_extra += codes.shape[1]

    @property
    def num_keys(self) -> int:
        return self.sorted_ids.shape[-1]

    @property
    def narrow(self) -> bool:
        return self.sorted_ids.dtype == torch.int16

    def nbytes(self) -> int:
        return sum(x.numel() * x.element_size() for x in (self.sorted_ids, self.offsets, self.extra))

    def collisions(self, qcodes: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
        """qcodes [H, L] (query head h uses KV head h // group) -> (gathered ids, their query heads):
        every key in the query's bucket of every table, one entry per table where they collide."""
        hkv, L, t = self.sorted_ids.shape
        h, device = qcodes.shape[0], qcodes.device
        table = (torch.arange(h, device=device) // group)[:, None] * L + torch.arange(L, device=device)  # [H, L]
        flat_offsets = self.offsets.view(-1, self.offsets.shape[-1])
        starts = flat_offsets[table, qcodes].flatten()
        lens = flat_offsets[table, qcodes + 1].flatten() - starts
        seg_start = torch.cumsum(lens, 0) - lens  # where each bucket lands in the output
        total = int(lens.sum())
        # segment of each output entry: a mark at each non-empty bucket's start, summed up
        # (repeat_interleave is ~10x slower at this size)
        nonempty = torch.nonzero(lens).flatten()
        marks = torch.zeros(total, dtype=torch.int32, device=device)
        marks[seg_start[nonempty]] = 1
        seg = nonempty[torch.cumsum(marks, 0) - 1]
        # entry j of bucket s sits at flat (table, starts[s] + j - seg_start[s]) in the sorted ids
        pos = (table.flatten() * t + starts - seg_start)[seg] + torch.arange(total, device=device)
        ids = self.sorted_ids.view(-1)[pos].long()
        if self.narrow:
            ids &= 0xFFFF
        heads = seg // L
        return ids, heads


_PTR, _INT = ctypes.c_void_p, ctypes.c_int64
_SIGNATURES = {  # kvserve/native/magicpig.c
    "magicpig_build": (None, [_PTR] + [_INT] * 3 + [_PTR] * 2 + [_INT]),
    "magicpig_hash": (_INT, [_PTR] + [_INT] * 2 + [_PTR] + [_INT] * 3 + [_PTR]),
    "magicpig_decode": (_INT, [_PTR, _PTR, _INT, _INT, _INT] + [ctypes.c_float] * 2 + [_PTR, _PTR, _INT, _INT, _PTR, _PTR, _INT]
                        + [_PTR] * 2 + [_INT, _PTR] + [_INT] * 3 + [_PTR] + [_INT] * 3 + [_PTR, _INT, _PTR, _INT]
                        + [_PTR] * 3),
}


@cache
def _kernel(name: str):
    return native.function("magicpig", name, *_SIGNATURES[name])


def candidates(tables: BucketTables, qcodes: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys colliding with the query in >= 2 tables (the extra keys included) -> (query head,
    key id) pairs, grouped by head."""
    h, t, device = qcodes.shape[0], tables.num_keys, qcodes.device
    ids, heads = tables.collisions(qcodes, group)
    # a count per (head, key) pair: an int32 index_add is ~3x faster than bincount's int64 here
    pairs = heads * t + ids
    counts = torch.zeros(h * t, dtype=torch.int32, device=device).index_add_(
        0, pairs, torch.ones(len(pairs), dtype=torch.int32, device=device))
    hits = pairs[counts[pairs] >= MIN_COLLISIONS]  # each candidate once per colliding table
    # keep one copy of each: whichever entry's index lands last in its slot (no H x T scan)
    owner = torch.empty(h * t, dtype=torch.int64, device=device)
    order = torch.arange(len(hits), device=device)
    owner[hits] = order
    hits = hits[owner[hits] == order]
    hit_h, hit_id = hits // t, hits % t
    extra_codes = tables.extra_codes
    if extra_codes.shape[1]:
        kv = torch.arange(h, device=device) // group
        extra = (extra_codes[kv] == qcodes[:, None, :]).sum(-1) >= MIN_COLLISIONS  # [H, P]
        eh, eid = torch.nonzero(extra, as_tuple=True)
        hit_h, hit_id = torch.cat([hit_h, eh]), torch.cat([hit_id, eid + t])
    return hit_h, hit_id


def inclusion_probability(cos: torch.Tensor, K: int, L: int) -> torch.Tensor:
    """P(a key at this cosine to the query collides in >= 2 of L tables of K bits):
    1 - (1-p)^L - L p (1-p)^(L-1) with p = (1 - theta/pi)^K, in float64 (it cancels badly in float32)."""
    theta = torch.arccos(cos.double().clamp(-1, 1))
    p = (1 - theta / math.pi) ** K
    miss = torch.log1p(-p.clamp(max=1 - 1e-12))  # ln(1 - p)
    return 1 - torch.exp(L * miss) - L * p * torch.exp((L - 1) * miss)


def coverage(q: torch.Tensor, keys: torch.Tensor, key_mean: torch.Tensor, scale: float, K: int, L: int,
             softcap: float | None = None) -> torch.Tensor:
    """q [H, D], keys [Hkv, T, D] -> [H]: the share of each head's attention over these keys that
    the keys it samples carry, in expectation (sum of a_i * w_i over softmax weights a_i and inclusion
    probabilities w_i). Low where the keys that matter hardly collide more often than the rest."""
    hkv = keys.shape[0]
    qf = q.float().view(hkv, -1, q.shape[-1])  # [Hkv, group, D]
    kf = keys.float()
    weights = capped(torch.einsum("gqd,gtd->gqt", qf, kf) * scale, softcap).softmax(-1)
    centred = kf - key_mean.float()[:, None]
    cos = torch.einsum("gqd,gtd->gqt", qf, centred) / (
        qf.norm(dim=-1)[..., None] * centred.norm(dim=-1)[:, None]).clamp_min(1e-12)
    return (weights.double() * inclusion_probability(cos, K, L)).sum(-1).flatten().float()


def sampled_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, key_mean: torch.Tensor,
                      heads: torch.Tensor, kv_heads: torch.Tensor, scale: float, K: int, L: int,
                      num_heads: int, softcap: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Importance-weighted softmax over sampled (head, key) pairs.

    q [H, D]; keys/values [C, D] of the C pairs, heads [C] their query head, kv_heads [C] their KV
    head (for key_mean [Hkv, D]). Logit q.k * scale (capped by softcap) - ln(w + eps), with w from
    the angle between q and the centred key (what was hashed); the raw key gives the score, so lse
    merges with dense parts.
    -> out [H, D] float32, lse [H] (natural log; -inf for a head with no sample)."""
    qf, kf, mean, device = q.float(), keys.float(), key_mean.float(), q.device
    c = torch.arange(len(heads), device=device)
    # one small matmul gives q.k and k.mean for every pair; the centred key is never materialized
    prods = kf @ torch.cat([qf, mean]).T  # [C, H + Hkv]
    qk = prods[c, heads]
    km = prods[c, num_heads + kv_heads]
    qm = (qf * mean[torch.arange(num_heads, device=device) // (num_heads // mean.shape[0])]).sum(-1)  # [H]
    centred_sq = (kf * kf).sum(-1) - 2 * km + (mean * mean).sum(-1)[kv_heads]
    cos = (qk - qm[heads]) / (qf.norm(dim=-1)[heads] * centred_sq.clamp_min(0).sqrt()).clamp_min(1e-12)
    w = inclusion_probability(cos, K, L)
    logits = capped(qk * scale, softcap) - torch.log(w + W_EPS).float()
    top = torch.full((num_heads,), float("-inf"), device=device).scatter_reduce(0, heads, logits, "amax", include_self=True)
    e = torch.exp(logits - top[heads])
    weights = torch.zeros(num_heads, len(heads), device=device)
    weights[heads, c] = e
    total = weights.sum(-1)
    out = (weights @ values.float()) / total.clamp_min(1e-30)[:, None]
    return out, top + torch.log(total)


def paged_sampled_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
                            heads: torch.Tensor, ids: torch.Tensor, key_mean: torch.Tensor, scale: float,
                            K: int, L: int, dense_slots: torch.Tensor | None = None,
                            softcap: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """sampled_attention over candidates() whose key id i of KV head kv sits at k_cache[kv, slots[i]]
    (caches [Hkv, S, D]), merged with full attention over the keys at dense_slots (every head reads
    them, unweighted): gathered, and the two parts merged by log-sum-exp. The twin of the C
    kernel's single softmax over both, in place (sampled_decode)."""
    h, (hkv, s, dim) = q.shape[0], k_cache.shape
    group = h // hkv
    kv_heads = heads // group
    flat = kv_heads * s + slots[ids]
    keys, values = k_cache.reshape(-1, dim).index_select(0, flat), v_cache.reshape(-1, dim).index_select(0, flat)
    out, lse = sampled_attention(q, keys, values, key_mean, heads, kv_heads, scale, K, L, h, softcap)
    if dense_slots is None or not len(dense_slots):
        return out, lse
    out_d, lse_d = grouped_attention_with_lse(q.float(), k_cache.index_select(1, dense_slots),
                                              v_cache.index_select(1, dense_slots), scale, softcap)
    return merge_state(out_d, lse_d, out, lse)


def sampled_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
                   dense_slots: torch.Tensor, key_mean: torch.Tensor, tables: BucketTables, proj: torch.Tensor,
                   panels: torch.Tensor, scale: float, K: int, L: int, qcodes: torch.Tensor | None = None,
                   found: torch.Tensor | None = None, softcap: float | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """One sampled layer's decode over the keys at slots (key id i at k_cache[kv, slots[i]]): the
    keys past the tables' (those that left the dense window since) hashed, centred by key_mean
    [Hkv, D], and added to them; q [H, D] hashed (unless its qcodes [H, L] are given); its
    candidates(), and paged_sampled_attention() over them and the dense keys -> (out [H, D],
    lse [H], number of (head, key) pairs sampled). One C call where the caches allow; those
    functions otherwise. found: None, or int32 [H, len(slots)] to receive each head's candidate
    ids, -1 after the last (for tests). softcap: scores capped as Gemma 2's (None: not)."""
    h, (hkv, s, dim) = q.shape[0], k_cache.shape
    t, new = tables.num_keys, len(slots) - tables.num_keys - tables.num_extra
    kernel = _kernel("magicpig_decode")
    if (kernel is not None and k_cache.device.type == "cpu" and k_cache.dtype in (torch.float32, torch.bfloat16)
            and v_cache.dtype == k_cache.dtype and k_cache.is_contiguous() and v_cache.is_contiguous()):
        qf, mean = q.float().contiguous(), key_mean.float().contiguous()
        slots, dense_slots = slots.to(torch.int64).contiguous(), dense_slots.to(torch.int64).contiguous()
        out, lse, table = torch.empty(h, dim, device="cpu"), torch.empty(h, device="cpu"), log_weight_table(K, L)
        tables.reserve(new)

        def call(codes: torch.Tensor | None, new: int) -> int:
            n = kernel(qf.data_ptr(), 0 if codes is None else codes.data_ptr(), h, h // hkv, dim, scale, softcap or 0.0,
                       k_cache.data_ptr(), v_cache.data_ptr(), int(k_cache.dtype == torch.bfloat16), s,
                       slots.data_ptr(), dense_slots.data_ptr(), len(dense_slots), mean.data_ptr(),
                       tables.sorted_ids.data_ptr(), int(tables.narrow), tables.offsets.data_ptr(), K, L, t,
                       tables.extra.data_ptr(), tables.num_extra, tables.extra.shape[1], new, panels.data_ptr(),
                       panels.shape[0], table.data_ptr(), len(table) - 1, 0 if found is None else found.data_ptr(),
                       out.data_ptr(), lse.data_ptr())
            if n == -1:
                raise MemoryError("magicpig_decode could not allocate its scratch")
            return n
        codes = None if qcodes is None else qcodes.to(torch.int16).contiguous()
        n = call(codes, new)
        if n == -2:  # no AVX2 for the kernel's hashing
            _add_new_keys(k_cache, slots, key_mean, tables, proj, K, L, panels)
            n = call(simhash(q, proj, K, L).to(torch.int16).contiguous() if codes is None else codes, 0)
        else:
            tables.num_extra += new
        return out, lse, n
    _add_new_keys(k_cache, slots, key_mean, tables, proj, K, L, panels)
    if qcodes is None:
        qcodes = simhash(q, proj, K, L, panels)
    heads, ids = candidates(tables, qcodes, h // hkv)
    if found is not None:
        found.fill_(-1)
        for head in range(h):
            mine = ids[heads == head]
            found[head, :len(mine)] = mine.to(torch.int32)
    out, lse = paged_sampled_attention(q, k_cache, v_cache, slots, heads, ids, key_mean, scale, K, L, dense_slots,
                                       softcap)
    return out, lse, len(ids)


def _add_new_keys(k_cache, slots, key_mean, tables: BucketTables, proj, K: int, L: int, panels) -> None:
    known = tables.num_keys + tables.num_extra
    if known < len(slots):
        new = k_cache.index_select(1, slots[known:]).float() - key_mean[:, None]
        tables.add(simhash(new, proj, K, L, panels).to(torch.int16))


@cache
def log_weight_table(K: int, L: int, n: int = 1 << 16) -> torch.Tensor:
    """ln(w + eps) at n + 1 evenly spaced cosines in [-1, 1], for the C kernel to interpolate
    (256 KiB; interpolated, it is off by < 1e-5)."""
    cos = torch.linspace(-1, 1, n + 1, dtype=torch.float64, device="cpu")
    return torch.log(inclusion_probability(cos, K, L) + W_EPS).float()
