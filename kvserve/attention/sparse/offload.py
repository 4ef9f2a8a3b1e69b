"""MagicPIG with offload (arXiv 2410.16179's CPU-GPU split): PolicyAttention's decodes whose
sampled positions live in the offload pools (kvserve/kv/offload_pools.py).

A sampled layer's decode splits in two. The device attends the keys the main pool still holds
(sinks, window, generated tokens) -> (out, lse). The CPU samples positions [start, end) from the
host pool with the C kernel (candidates and weighted softmax; tables built there from the same keys,
so it samples what MagicPIG on the device would) -> (out, lse), which go back to the device and
merge (merge_state): the same softmax as one over both parts. The device part of every offloaded
decode of the layer is launched before the CPU starts, so on a GPU they run at the same time.
A dense layer reads [start, end) from the dense pool, on the device, beside the main pool's keys.
"""
import time
from collections import defaultdict
from dataclasses import dataclass

import torch

from kvserve.attention.merge import merge_state
from kvserve.attention.sparse import magicpig


@dataclass
class OffloadRead:
    host_slots: torch.Tensor  # positions [start, end) in the host pool, int64 on the CPU
    dense_slots: torch.Tensor  # the same positions in the dense pool, on its device


def plan_read(pools, pages, start: int, end: int, device) -> OffloadRead:
    pos = torch.arange(start, end, device="cpu")
    return OffloadRead(pools.slots(pages.host, pos), pools.slots(pages.dense, pos).to(device))


class OffloadedDecodes:
    """Runs a layer's offloaded decodes for a PolicyAttention; `seconds` adds up where the time goes:
    the CPU's sampled attention (candidates and softmax, one C call), the query's copy to the host
    (waiting for it included), the partial outputs' copy back, and landing staged K/V rows."""

    def __init__(self, backend):
        self.backend = backend
        self.seconds: dict[str, float] = defaultdict(float)
        self._no_slots = torch.zeros(0, dtype=torch.long, device="cpu")

    def run(self, layer: int, decodes, q: torch.Tensor, k_cache, v_cache, out: torch.Tensor) -> None:
        """out[d.row] for every decode d (all offloaded) of this layer."""
        b, pools = self.backend, self.backend.offload
        if layer in pools.dense_index:
            dk, dv = pools.dense.k[pools.dense_index[layer]], pools.dense.v[pools.dense_index[layer]]
            for d in decodes:
                k_main, v_main = b._gather_slots(k_cache, v_cache, d.dense_slots)
                keys = torch.cat([k_main, dk.index_select(1, d.offload.dense_slots)], 1)
                values = torch.cat([v_main, dv.index_select(1, d.offload.dense_slots)], 1)
                out[d.row] = b._dense(q[d.row], keys, values)[0].to(q.dtype)
                b.keys_read += d.kv_len * b.num_heads
                b.keys_total += d.kv_len * b.num_heads
            return
        hk, hv = pools.host.k[pools.host_index[layer]], pools.host.v[pools.host_index[layer]]
        start = time.perf_counter()
        rows = torch.tensor([d.row for d in decodes], device=q.device)
        q_host = q.index_select(0, rows).to("cpu", non_blocking=True)
        ready = None
        if q.device.type == "cuda":
            ready = torch.cuda.Event()
            ready.record()
        self.seconds["copy_query"] += time.perf_counter() - start
        # the device's part first: it runs while the CPU samples
        device_parts = [b._dense(q[d.row], *b._gather_slots(k_cache, v_cache, d.dense_slots)) for d in decodes]
        start = time.perf_counter()
        if ready is not None:
            ready.synchronize()
        self.seconds["copy_query"] += time.perf_counter() - start
        host_parts = []
        for i, d in enumerate(decodes):
            host_parts.append(self._sampled(layer, d, q_host[i], hk, hv))
        start = time.perf_counter()
        host_out = torch.stack([o for o, _ in host_parts]).to(q.device, non_blocking=True)
        host_lse = torch.stack([s for _, s in host_parts]).to(q.device, non_blocking=True)
        self.seconds["copy_back"] += time.perf_counter() - start
        for i, (d, (out_d, lse_d)) in enumerate(zip(decodes, device_parts)):
            out[d.row] = merge_state(out_d, lse_d, host_out[i], host_lse[i])[0].to(q.dtype)

    def _sampled(self, layer: int, d, q_host: torch.Tensor, hk, hv) -> tuple[torch.Tensor, torch.Tensor]:
        b, p, state = self.backend, d.policy, d.seq.attn_state
        h, slots = b.num_heads, d.offload.host_slots
        start = time.perf_counter()
        if not b.samples_well(layer, d, q_host, hk, slots):  # as PolicyAttention decides it on the device
            out, lse = b._dense(q_host, hk.index_select(1, slots), hv.index_select(1, slots))
            self.seconds["cpu_sampled"] += time.perf_counter() - start
            b.keys_read += d.kv_len * h
            b.keys_total += d.kv_len * h
            return out, lse
        proj, panels = b.projections(p, layer, "cpu")
        tables = state.layers.get(layer)
        if tables is None:
            tables = state.layers[layer] = b._build(slots[:state.built_end - state.start], hk, proj, panels, p)
        out, lse, n = magicpig.sampled_decode(q_host, hk, hv, slots, self._no_slots, tables.key_mean, tables.tables,
                                              proj, panels, b.scale, p.K, p.L, softcap=b.softcap)
        self.seconds["cpu_sampled"] += time.perf_counter() - start
        b.sampled_pairs += n
        b.sampled_heads += h
        b.keys_read += len(d.dense_slots) * h + n
        b.keys_total += d.kv_len * h
        return out, lse

