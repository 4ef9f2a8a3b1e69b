"""PagePool: the KV memory of every layer, cut into fixed pages, with ref counts and a free list."""
from collections import deque
from itertools import islice

import torch


class OutOfPagesError(RuntimeError):
    pass


# free pages next in line that are zeroed along with a page handed out for the first time: a decode
# batch crosses page boundaries together, and one zero_ over a run of pages costs what one page does
ZERO_AHEAD = 64


class PagePool:
    """Owns K/V storage; knows nothing about requests.

    Layout per layer is `[num_kv_heads, num_pages * page_size, head_dim]`: token slot
    `page * page_size + offset` is one row per head, so writing new K/V is one index_copy_, and
    gathered pages come out head-major, as attention matmuls want them.
    A page is free when its ref count is 0; the prefix cache and every request using a
    page each hold one reference.
    """

    def __init__(self, num_layers: int, num_pages: int, page_size: int, num_kv_heads: int,
                 head_dim: int, dtype=torch.float32, device="cpu", pin_memory: bool = False):
        self.num_pages = num_pages
        self.page_size = page_size
        shape = (num_layers, num_kv_heads, num_pages * page_size, head_dim)
        # empty, not zeros: untouched memory costs neither startup time nor RSS. A page is zeroed
        # when first handed out, since masked-out slots are still read and must not hold NaNs.
        # pinned (host memory a GPU copies to and from asynchronously): the offloaded K/V of MagicPIG
        self.k = torch.empty(shape, dtype=dtype, device=device, pin_memory=pin_memory)
        self.v = torch.empty(shape, dtype=dtype, device=device, pin_memory=pin_memory)
        self.ref_counts = [0] * num_pages
        self.free_pages = deque(range(num_pages))
        self.zeroed = [False] * num_pages
        self.reserved: list[int] = []  # held for good by the engine itself (a scratch page), never freed
        self.on_copy = None  # called with (src, dst) after copy_page (tensor-parallel ranks repeat it)

    @staticmethod
    def bytes_per_page(num_layers, page_size, num_kv_heads, head_dim, dtype=torch.float32) -> int:
        return 2 * num_layers * page_size * num_kv_heads * head_dim * torch.finfo(dtype).bits // 8

    @property
    def num_free(self) -> int:
        return len(self.free_pages)

    def allocate(self, n: int) -> list[int]:
        if n > len(self.free_pages):
            raise OutOfPagesError(f"need {n} pages, {len(self.free_pages)} free")
        free, refs, zeroed = self.free_pages, self.ref_counts, self.zeroed
        pages = [free.popleft() for _ in range(n)]
        for p in pages:
            refs[p] = 1
        fresh = [p for p in pages if not zeroed[p]]
        if fresh:
            self._zero(fresh + [p for p in islice(free, ZERO_AHEAD) if not zeroed[p]])
        return pages

    def reserve(self) -> int:
        """A page for the engine's own use, e.g. the slot that padding rows of a static batch write."""
        page = self.allocate(1)[0]
        self.reserved.append(page)
        return page

    def ensure_zeroed(self, pages) -> None:
        """Zeroes pages never handed out here (a tensor-parallel rank's pool, whose pages rank 0 allocates)."""
        self._zero([p for p in pages if p >= 0 and not self.zeroed[p]])

    def _zero(self, pages: list[int]) -> None:
        """Zeroes these pages, a run of consecutive ones in one zero_ per tensor."""
        pages = sorted(set(pages))
        n, i = self.page_size, 0
        while i < len(pages):
            j = i + 1
            while j < len(pages) and pages[j] == pages[j - 1] + 1:
                j += 1
            self.k[:, :, pages[i] * n:(pages[j - 1] + 1) * n].zero_()
            self.v[:, :, pages[i] * n:(pages[j - 1] + 1) * n].zero_()
            i = j
        for p in pages:
            self.zeroed[p] = True

    def incref(self, pages) -> None:
        for p in pages:
            assert self.ref_counts[p] > 0, f"incref of free page {p}"
            self.ref_counts[p] += 1

    def decref(self, pages) -> list[int]:
        """Drop one reference per page; returns the pages that became free."""
        freed = []
        for p in pages:
            assert self.ref_counts[p] > 0, f"decref of free page {p}"
            self.ref_counts[p] -= 1
            if self.ref_counts[p] == 0:
                # reused first: a page just freed is already zeroed, in RAM and likely in cache
                self.free_pages.appendleft(p)
                freed.append(p)
        return freed

    def copy_page(self, src: int, dst: int) -> None:
        s, d, n = src * self.page_size, dst * self.page_size, self.page_size
        self.k[:, :, d:d + n].copy_(self.k[:, :, s:s + n])
        self.v[:, :, d:d + n].copy_(self.v[:, :, s:s + n])
        if self.on_copy is not None:
            self.on_copy(src, dst)
