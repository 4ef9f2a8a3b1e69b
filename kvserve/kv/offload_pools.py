"""Where MagicPIG with offload keeps a request's K/V outside the main pool.

`host` (CPU memory, pinned when the main pool is on a GPU) holds the sampled layers, whose attention
the CPU computes; `dense` (on the main pool's device) holds the dense layers. Both hold every
position of the request, in pages of the main pool's size, numbered as the request's own (logical
page i is host[i] and dense[i]). The main pool then keeps only what a decode reads there: the sinks,
the window and the generated tokens. So the CPU's memory, not the GPU's, bounds how many long
contexts run at once.

Rows reach the host pool asynchronously: `stage` gathers them on the device and starts their copy,
`flush` lands every staged copy, in order (a page's latest owner always writes last), before a read.
"""
from dataclasses import dataclass, field

import torch

from kvserve.kv.pool import PagePool


@dataclass
class OffloadPages:
    """One sequence's pages in both offload pools, and how many of its positions were copied there."""
    host: list[int] = field(default_factory=list)
    dense: list[int] = field(default_factory=list)
    synced: int = 0


class OffloadPools:
    def __init__(self, num_layers: int, dense_layers, num_pages: int, page_size: int, hkv: int, head_dim: int,
                 dtype, device):
        device = torch.device(device)
        self.page_size = page_size
        self.dense_layers = tuple(sorted({i for i in dense_layers if i < num_layers}))
        self.sampled_layers = tuple(i for i in range(num_layers) if i not in self.dense_layers)
        self.host_index = {layer: i for i, layer in enumerate(self.sampled_layers)}
        self.dense_index = {layer: i for i, layer in enumerate(self.dense_layers)}
        pin = device.type == "cuda"
        self.host = PagePool(len(self.sampled_layers), num_pages, page_size, hkv, head_dim, dtype, "cpu",
                             pin_memory=pin)
        self.dense = PagePool(len(self.dense_layers), num_pages, page_size, hkv, head_dim, dtype, device)
        self._sampled_sel = torch.tensor(self.sampled_layers, dtype=torch.long, device=device)
        self._dense_sel = torch.tensor(self.dense_layers, dtype=torch.long, device=device)
        self._pending: list[tuple] = []  # (event or None, host slots, staged k, staged v)

    @staticmethod
    def bytes_per_page(num_layers: int, dense_layers, page_size, num_kv_heads, head_dim, dtype) -> tuple[int, int]:
        """(host bytes, device bytes) of one offload page."""
        dense = len({i for i in dense_layers if i < num_layers})
        per_layer = PagePool.bytes_per_page(1, page_size, num_kv_heads, head_dim, dtype)
        return (num_layers - dense) * per_layer, dense * per_layer

    @property
    def num_free(self) -> int:
        return min(self.host.num_free, self.dense.num_free)

    def grow(self, pages: OffloadPages, n: int) -> None:
        pages.host += self.host.allocate(n)
        pages.dense += self.dense.allocate(n)

    def free(self, pages: OffloadPages) -> None:
        self.host.decref(pages.host)
        self.dense.decref(pages.dense)

    def slots(self, pages: list[int], positions: torch.Tensor) -> torch.Tensor:
        """Slots (on the CPU) of positions (CPU) held by a sequence's pages."""
        table = torch.tensor(pages, dtype=torch.long, device="cpu")
        return table[positions // self.page_size] * self.page_size + positions % self.page_size

    def stage(self, main: PagePool, main_pages: list[int], pages: OffloadPages, end: int) -> None:
        """Copy positions [pages.synced, end) from the main pool: the dense layers' rows on the device,
        the sampled layers' rows to the host, landing at the next flush()."""
        if end <= pages.synced:
            return
        pos = torch.arange(pages.synced, end, device="cpu")
        device = main.k.device
        src = self.slots(main_pages, pos).to(device)
        if self.dense_layers:
            dst = self.slots(pages.dense, pos).to(device)
            for pool, cache in ((self.dense.k, main.k), (self.dense.v, main.v)):
                pool.index_copy_(2, dst, cache.index_select(2, src).index_select(0, self._dense_sel))
        if self.sampled_layers:
            staged = [c.index_select(2, src).index_select(0, self._sampled_sel).to("cpu", non_blocking=True)
                      for c in (main.k, main.v)]
            event = None
            if device.type == "cuda":
                event = torch.cuda.Event()
                event.record()
            self._pending.append((event, self.slots(pages.host, pos), *staged))
        pages.synced = end

    def flush(self) -> None:
        """Land every staged copy in the host pool."""
        for event, slots, k, v in self._pending:
            if event is not None:
                event.synchronize()
            self.host.k.index_copy_(2, slots, k)
            self.host.v.index_copy_(2, slots, v)
        self._pending.clear()
