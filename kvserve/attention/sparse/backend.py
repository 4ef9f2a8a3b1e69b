"""PolicyAttention: one step whose decodes use different attention policies.

Full requests (and every prefill) go through the dense backend in one call, as in a step with no
policy at all; each non-full decode is then computed alone by its policy. A step where every
request is full never comes here (the runner calls the dense backend directly).

With KV groups (kv/groups.py) a policy applies to the global layers only, each reading its own
group's page table; a layer with a sliding window keeps its window attention (the dense backend of
its group, planned over every row), since it never reads past its window anyway.
"""
import time
from dataclasses import dataclass, field

import torch

from kvserve.attention.grouped import GroupedAttention
from kvserve.attention.merge import grouped_attention_with_lse, merge_state
from kvserve.attention.policy import TOPK_DEFAULT_FRACTION, AttentionPolicy
from kvserve.attention.sparse import magicpig
from kvserve.attention.sparse.offload import OffloadedDecodes, OffloadRead, plan_read
from kvserve.attention.sparse.streaming import kept_positions
from kvserve.attention.sparse.topk import topk_attention
from kvserve.kv.groups import KVGroups
from kvserve.native import paged_attention

_ZERO = torch.zeros(1, dtype=torch.int64)  # the one sequence's page table start
HASH_CHUNK = 1024  # positions hashed per matmul at build: bounds the [Hkv, rows, K*L] temporaries


@dataclass
class _LayerTables:
    """MagicPIG state of one layer of one request: tables over positions [start, built_end), and
    as extra keys the positions [built_end, ...) that left the window later."""
    key_mean: torch.Tensor  # [Hkv, D] float32
    tables: magicpig.BucketTables


@dataclass
class MagicPIGState:
    """Per request; dropped when the request is preempted (its pages are recomputed)."""
    start: int
    built_end: int
    layers: dict[int, _LayerTables] = field(default_factory=dict)
    dense: set[int] = field(default_factory=set)  # layers attended densely: below policy.min_coverage

    def nbytes(self) -> int:
        return sum(t.tables.nbytes() + t.key_mean.numel() * 4 for t in self.layers.values())


@dataclass
class SlotSet:
    """Pool slots a decode reads, indexed on the pool's device; `start` where they fill a range
    (a fresh pool's pages), read as a view. Worked out on the host once per plan: no device sync per layer."""
    index: torch.Tensor
    start: int | None

    @classmethod
    def of(cls, slots: torch.Tensor, device) -> "SlotSet":
        """slots: distinct, int64 on the CPU."""
        n = len(slots)
        start = int(slots.min()) if n and int(slots.max() - slots.min()) == n - 1 else None
        return cls(slots.to(device), start)

    def __len__(self) -> int:
        return len(self.index)


@dataclass
class _SparseDecode:
    row: int
    seq: object
    policy: AttentionPolicy
    kv_len: int
    new_slot: torch.Tensor  # [1], on the pool's device
    dense_slots: SlotSet  # slots read densely in a sampled layer (all of them in a dense one)
    all_pages: torch.Tensor | None  # the pages of every position, int32 on the pool's device (magicpig/topk dense layers)
    pages_start: int | None  # all_pages[0] where all_pages are consecutive (read as a view)
    sampled_slots: torch.Tensor | None  # positions [start, end) sampled by magicpig/topk, on the pool's device
    offload: OffloadRead | None = None  # magicpig with offload: where [start, end) sit in the offload pools
    stream_pages: torch.Tensor | None = None  # streaming: the pages of every position, int32 on the CPU (-1: given back)


class PolicyAttention:
    def __init__(self, dense, pool, num_heads: int, head_dim: int, scale: float | None = None,
                 groups: KVGroups | None = None, softcap: float | None = None):
        """dense: the backend of full rows, a GroupedAttention where groups has several groups.
        groups: the pool's KV groups; None: one group of every layer (slot = layer). softcap: the
        model's bound on attention scores (Gemma 2), applied by every policy."""
        self.dense, self.pool = dense, pool
        self.groups = groups or KVGroups([None], [list(range(pool.k.shape[0]))], pool.k.shape[0])
        self.backends = dense.backends if isinstance(dense, GroupedAttention) else [dense]
        assert len(self.backends) == len(self.groups)
        self.route = list(zip(self.groups.group_of, self.groups.slot_of))
        self.global_groups = [g for g, w in enumerate(self.groups.windows) if w is None]
        self.num_heads, self.head_dim = num_heads, head_dim
        self.scale = scale if scale is not None else head_dim ** -0.5
        self.softcap = softcap
        self._proj: dict[tuple, torch.Tensor] = {}
        self.keys_read = 0  # (query head, key) pairs read by sparse decodes, for the benchmarks
        self.keys_total = 0  # ... and what full attention would have read
        self.sampled_pairs = 0  # magicpig candidates, over (query head, sampled layer) instances:
        self.sampled_heads = 0  # their ratio is the key budget topk gets to match magicpig
        self.offload = None  # OffloadPools, set by the engine when it runs MagicPIG with offload
        self.offloaded = OffloadedDecodes(self)

    def plan(self, metas: list, rows: list[torch.Tensor], decodes: list[tuple[int, object, int]]) -> None:
        """Per KV group, metas[g] (None if none) covers the step's rows rows[g]: the full rows for a
        global group, every row for a windowed one. decodes are (row, sequence, kv_len) of the
        one-token steps of non-full sequences, computed by their policy in the global layers."""
        self.rows = rows
        for backend, meta in zip(self.backends, metas, strict=True):
            if meta is not None:
                backend.plan(meta)
        self.plan_decodes(decodes)

    def plan_decodes(self, decodes: list[tuple[int, object, int]]) -> None:
        """The policy decodes alone, for run_rows: a caller that computes every other row (decode.c)."""
        # per global group: its decodes over its own page table (positions are the same in each)
        self.by_group = {g: [self._plan_one(row, seq, kv_len, g) for row, seq, kv_len in decodes]
                         for g in self.global_groups}
        self.decodes = self.by_group[self.global_groups[0]] if self.global_groups else []
        self.split = [d for d in self.decodes if d.offload is not None]
        if self.split:
            start = time.perf_counter()
            self.offload.flush()  # the rows they sample must have landed on the host
            self.offloaded.seconds["copy_rows"] += time.perf_counter() - start

    def _plan_one(self, row: int, seq, kv_len: int, group: int = 0) -> _SparseDecode:
        """Positions to slots on the host (the group's page table is a Python list), moved to the
        pool's device once."""
        policy, page, device = seq.policy, self.pool.page_size, self.pool.k.device
        cpu = torch.device("cpu")
        pages = torch.tensor(seq.tables[group], dtype=torch.long, device=cpu)

        def slots(pos: torch.Tensor) -> torch.Tensor:
            return pages[pos // page] * page + pos % page
        new_slot = slots(torch.tensor([kv_len - 1], device=cpu)).to(device)
        if policy.policy == "streaming":
            dense = slots(kept_positions(kv_len, policy.sink, policy.window))
            stream_pages = pages[:-(-kv_len // page)].to(torch.int32) if device.type == "cpu" else None
            return _SparseDecode(row, seq, policy, kv_len, new_slot, SlotSet.of(dense, device), None, None, None,
                                 stream_pages=stream_pages)
        start = min(policy.sink, kv_len)
        end = max(start, min(seq.num_prompt_tokens, kv_len - policy.window, kv_len - 1))
        dense = torch.cat([torch.arange(start, device=cpu), torch.arange(end, kv_len, device=cpu)])
        if policy.policy == "magicpig" and end > start:
            state = seq.attn_state
            if state is None or state.start != start:
                state = seq.attn_state = MagicPIGState(start, end)
        if policy.offload and end > start and self.offload is not None and seq.offload is not None:
            return _SparseDecode(row, seq, policy, kv_len, new_slot, SlotSet.of(slots(dense), device), None, None,
                                 None, plan_read(self.offload, seq.offload, start, end, device))
        all_pages = pages[:-(-kv_len // page)]
        consecutive = bool((all_pages.diff() == 1).all())
        return _SparseDecode(row, seq, policy, kv_len, new_slot, SlotSet.of(slots(dense), device),
                             all_pages.to(device, torch.int32), int(all_pages[0]) if consecutive else None,
                             slots(torch.arange(start, end, device=cpu)).to(device) if end > start else None)

    def run(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        group, slot = self.route[layer]
        rows = self.rows[group]
        if self.groups.windows[group] is not None:  # a windowed layer: every row (rows[group]) by its window
            return self.backends[group].run(slot, q, k, v)
        out = torch.empty_like(q)
        if len(rows):
            out[rows] = self.backends[group].run(slot, q[rows], k[rows], v[rows])
        k_cache, v_cache = self.pool.k[slot], self.pool.v[slot]
        decodes = self.by_group[group]
        for d in decodes:
            k_cache[:, d.new_slot] = k[d.row:d.row + 1].transpose(0, 1).to(k_cache.dtype)
            v_cache[:, d.new_slot] = v[d.row:d.row + 1].transpose(0, 1).to(v_cache.dtype)
        if self.split:
            self.offloaded.run(layer, self.split, q, k_cache, v_cache, out)
        for d in decodes:
            if d.offload is None:
                out[d.row] = self._decode(layer, d, q[d.row], k_cache, v_cache).to(q.dtype)
        return out

    def run_rows(self, layer: int, q: torch.Tensor, out: torch.Tensor, rows: list[int]) -> None:
        """A global layer's planned decodes (plan_decodes) whose K/V the caller already wrote to
        the pool: decode i's query at q[rows[i]] (-1: none), its output into out[rows[i]]."""
        group, slot = self.route[layer]
        k_cache, v_cache = self.pool.k[slot], self.pool.v[slot]
        for d, r in zip(self.by_group[group], rows, strict=True):
            if r >= 0:
                out[r] = self._decode(layer, d, q[r].to(k_cache.dtype), k_cache, v_cache).to(out.dtype)

    def _decode(self, layer: int, d: _SparseDecode, q: torch.Tensor, k_cache, v_cache) -> torch.Tensor:
        h, kv_len = self.num_heads, d.kv_len
        sparse_layer = d.sampled_slots is not None and layer not in d.policy.dense_layers
        magicpig_layer = sparse_layer and d.policy.policy == "magicpig"
        if magicpig_layer and not self.samples_well(layer, d, q, k_cache, d.sampled_slots):
            sparse_layer = magicpig_layer = False
        topk_in_place = (sparse_layer and not magicpig_layer and d.all_pages is not None
                         and paged_attention.available(k_cache))
        if magicpig_layer:  # one softmax over the dense keys and the sampled ones
            out, _, n = self._magicpig(layer, d, q, k_cache, v_cache)
            self.sampled_pairs += n
            self.sampled_heads += h
            read = len(d.dense_slots) * h + n
        elif topk_in_place:  # the dense keys and each head's top k in one C call
            start, end = self._sampled_range(d)
            budget = self._topk_budget(d)
            out = paged_attention.topk_decode(q, k_cache, v_cache, d.all_pages, kv_len, start, end, budget,
                                              self.pool.page_size, self.scale, self.softcap)
            read = (kv_len - (end - start) + min(budget, end - start)) * h
        elif d.stream_pages is not None and paged_attention.available(k_cache):  # sinks and window in place
            out = paged_attention.decode(q.view(1, h, -1), k_cache, v_cache, d.stream_pages, _ZERO,
                                         torch.tensor([kv_len], device="cpu"), self.pool.page_size, self.scale,
                                         window=max(d.policy.window, 1), softcap=self.softcap,
                                         sink=d.policy.sink).view(h, -1)
            read = len(d.dense_slots) * h
        elif d.all_pages is None or sparse_layer:
            out, lse = self._dense(q, *self._gather_slots(k_cache, v_cache, d.dense_slots))
            read = len(d.dense_slots) * h
        elif paged_attention.available(k_cache):  # a dense layer: read in place, as full attention does
            out = paged_attention.decode(q.view(1, h, -1), k_cache, v_cache, d.all_pages, _ZERO,
                                         torch.tensor([kv_len], device="cpu"), self.pool.page_size,
                                         self.scale, softcap=self.softcap).view(h, -1)
            read = kv_len * h
        else:
            out, lse = self._dense(q, *self._gather_pages(k_cache, v_cache, d, kv_len))
            read = kv_len * h
        if sparse_layer and not magicpig_layer and not topk_in_place:  # topk: the PyTorch oracle
            out_s, lse_s, n = self._topk(d, q, k_cache, v_cache)
            out, lse = merge_state(out, lse, out_s, lse_s)
            read += n
        self.keys_read += read
        self.keys_total += kv_len * h
        return out

    @staticmethod
    def _gather_slots(k_cache, v_cache, slots: SlotSet) -> tuple[torch.Tensor, torch.Tensor]:
        if slots.start is not None:  # a view
            start, n = slots.start, len(slots)
            return k_cache[:, start:start + n], v_cache[:, start:start + n]
        return k_cache.index_select(1, slots.index), v_cache.index_select(1, slots.index)

    def _gather_pages(self, k_cache, v_cache, d: _SparseDecode, kv_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first kv_len positions held by d.all_pages, copied a page at a time (3x faster than a
        slot at a time), or a view where the pages are consecutive."""
        page = self.pool.page_size
        if d.pages_start is not None:
            first = d.pages_start * page
            return k_cache[:, first:first + kv_len], v_cache[:, first:first + kv_len]
        hkv, dim = k_cache.shape[0], k_cache.shape[2]
        return tuple(c.view(hkv, -1, page * dim).index_select(1, d.all_pages).view(hkv, -1, dim)[:, :kv_len]
                     for c in (k_cache, v_cache))

    def _dense(self, q, kd, vd) -> tuple[torch.Tensor, torch.Tensor]:
        return grouped_attention_with_lse(q, kd, vd, self.scale, self.softcap)

    def _topk(self, d: _SparseDecode, q, k_cache, v_cache):
        # the sampled positions [start, end): a view where the pages are consecutive, else a page at a time
        start, end = self._sampled_range(d)
        keys, values = (c[:, start:end] for c in self._gather_pages(k_cache, v_cache, d, end))
        budget = self._topk_budget(d)
        out, lse = topk_attention(q, keys, values, budget, self.scale, self.softcap)
        return out, lse, min(budget, keys.shape[1]) * self.num_heads

    @staticmethod
    def _sampled_range(d: _SparseDecode) -> tuple[int, int]:
        """The positions [start, end) a magicpig/topk decode samples (after the sinks)."""
        start = min(d.policy.sink, d.kv_len)
        return start, start + len(d.sampled_slots)

    @staticmethod
    def _topk_budget(d: _SparseDecode) -> int:
        return d.policy.k or max(1, round(TOPK_DEFAULT_FRACTION * len(d.sampled_slots)))

    def projections(self, policy: AttentionPolicy, layer: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's hash matrix on `device` (drawn on the CPU: the same on every device) and its
        panels for the C hash kernel (on the CPU, where that kernel runs)."""
        key = (policy.K, policy.L, policy.seed, layer, str(device))
        if key not in self._proj:
            proj = magicpig.projections(self.head_dim, policy.K, policy.L, policy.seed, layer)
            self._proj[key] = proj.to(device), magicpig.projection_panels(proj)
        return self._proj[key]

    def _magicpig(self, layer: int, d: _SparseDecode, q, k_cache, v_cache):
        p, state = d.policy, d.seq.attn_state
        proj, panels = self.projections(p, layer, k_cache.device)
        tables = state.layers.get(layer)
        if tables is None:
            tables = state.layers[layer] = self._build(d.sampled_slots[:state.built_end - state.start],
                                                       k_cache, proj, panels, p)
        return magicpig.sampled_decode(q, k_cache, v_cache, d.sampled_slots, d.dense_slots.index, tables.key_mean,
                                       tables.tables, proj, panels, self.scale, p.K, p.L, softcap=self.softcap)

    def samples_well(self, layer: int, d: _SparseDecode, q, k_cache, slots: torch.Tensor) -> bool:
        """Whether this request samples the layer (slots: its positions [start, end) in k_cache):
        decided at its first decode, by the coverage that its tables' keys would give this query
        (magicpig.coverage), against policy.min_coverage."""
        state, p = d.seq.attn_state, d.policy
        if layer in state.layers or p.min_coverage == 0:
            return True
        if layer in state.dense:
            return False
        keys = k_cache.index_select(1, slots[:state.built_end - state.start])
        covered = magicpig.coverage(q, keys, keys.float().mean(1), self.scale, p.K, p.L, self.softcap).mean()
        if covered >= p.min_coverage:
            return True
        state.dense.add(layer)
        return False

    @staticmethod
    def _build(slots: torch.Tensor, k_cache, proj, panels, p: AttentionPolicy) -> _LayerTables:
        """Tables over the keys at slots: centred per KV head, hashed in chunks, sorted per table."""
        keys = k_cache.index_select(1, slots)
        mean = keys.float().mean(1)
        codes = torch.cat([magicpig.simhash(keys[:, i:i + HASH_CHUNK].float() - mean[:, None], proj, p.K, p.L,
                                            panels).to(torch.int16) for i in range(0, keys.shape[1], HASH_CHUNK)], 1)
        tables = magicpig.BucketTables.build(codes, p.K)
        return _LayerTables(mean, tables)
