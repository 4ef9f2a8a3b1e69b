"""Tensors on huge pages hold what is written to them, and the kernel reports their pages as huge."""
import gc
import re
from pathlib import Path

import pytest
import torch

from kvserve.model import hugepages


def anon_huge_kib() -> int:
    return int(re.search(r"AnonHugePages:\s+(\d+) kB", Path("/proc/self/smaps_rollup").read_text()).group(1))


def test_small_tensors_are_plain():
    t = hugepages.empty((64, 64), torch.float32)
    assert t.shape == (64, 64) and t.dtype == torch.float32


def test_weights_written_fault_in_as_huge_pages():
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if not thp.exists() or "[never]" in thp.read_text():
        pytest.skip("no transparent huge pages here")
    before = anon_huge_kib()
    t = hugepages.empty((8, 1024, 512), torch.float32)  # 16 MiB
    assert t.data_ptr() % hugepages.HUGE_PAGE == 0 and t.shape == (8, 1024, 512) and t.is_contiguous()
    values = torch.randn(8, 1024, 512)
    t.copy_(values)
    gc.collect()  # the mapping lives as long as the tensor
    assert torch.equal(t, values)
    assert anon_huge_kib() - before >= 8 * 1024  # at least half of it on 2 MiB pages
