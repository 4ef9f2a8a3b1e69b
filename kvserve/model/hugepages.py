"""CPU tensors on 2 MiB pages (Linux transparent huge pages), for weights that a step reads as
many short scattered rows: the float32 experts a batch chose (kvserve/model/moe.py). On 4 KiB pages
every 4 KiB of them costs a TLB miss: `bench moe`'s MoE at batch 8 (fp32, one thread) took 15.4 ms a
step on 2 MiB pages against 18.6 on 4 KiB, while its dense twin, which reads whole matrices, took
12.9 against 13.0. With THP in `madvise` mode (the default of many distributions) memory gets them
only when asked, and asking before the first write costs nothing more at load (collapsing pages
already written, MADV_COLLAPSE, took ~5 s a GiB here)."""
import ctypes
import mmap

import torch

HUGE_PAGE = 2 * 2**20
MIN_BYTES = 2 * HUGE_PAGE  # smaller tensors hold at most one whole huge page


def empty(shape: tuple, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised CPU tensor on its own anonymous mapping, 2 MiB-aligned and advised onto
    huge pages, so that it faults in as huge pages when written; torch.empty where that can't be
    had (not Linux, a small tensor). The tensor keeps the mapping alive."""
    numel = 1
    for n in shape:
        numel *= n
    nbytes = numel * dtype.itemsize
    if nbytes < MIN_BYTES or not hasattr(mmap, "MADV_HUGEPAGE"):
        return torch.empty(shape, dtype=dtype)
    buf = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # shared: shmem, no THP
    view = ctypes.c_char.from_buffer(buf)
    offset = -ctypes.addressof(view) % HUGE_PAGE
    del view  # releases its export of the buffer
    buf.madvise(mmap.MADV_HUGEPAGE, offset, nbytes - nbytes % HUGE_PAGE)
    return torch.frombuffer(buf, dtype=dtype, count=numel, offset=offset).view(shape)
