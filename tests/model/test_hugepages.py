"""Weights advised onto huge pages keep their values, and the kernel reports the pages as huge."""
import re

import pytest
import torch
from torch import nn

from kvserve.model import hugepages


def anon_huge_kib() -> int:
    return int(re.search(r"AnonHugePages:\s+(\d+) kB", open("/proc/self/smaps_rollup").read()).group(1))


def test_weights_keep_their_values_on_huge_pages():
    model = nn.Linear(2048, 2048, bias=False)  # 16 MiB: at least 6 whole huge pages inside
    small = nn.Linear(64, 64)
    model.small = small
    before = model.weight.detach().clone(), small.weight.detach().clone()
    huge_before = anon_huge_kib()
    done = hugepages.advise(model)
    assert torch.equal(model.weight, before[0]) and torch.equal(small.weight, before[1])
    if done == 0:
        pytest.skip("this kernel gives no huge pages (MADV_COLLAPSE refused)")
    assert done >= 6 * hugepages.HUGE_PAGE and done % hugepages.HUGE_PAGE == 0
    assert anon_huge_kib() - huge_before >= done // 1024
