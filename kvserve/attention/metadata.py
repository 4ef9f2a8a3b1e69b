"""The page table of one step in FlashInfer's CSR layout: four flat int32 tensors anyone can print."""
from dataclasses import dataclass
from itertools import accumulate, chain
from operator import gt

import torch

from kvserve.native.lists import int_tensor


@dataclass
class AttentionMetadata:
    """Request i owns query rows qo_indptr[i]:qo_indptr[i+1] of the step and pages
    kv_indices[kv_indptr[i]:kv_indptr[i+1]]; its last page holds kv_last_page_len[i] tokens.
    The K/V of the step's own tokens are the last tokens of each request's pages."""
    qo_indptr: torch.Tensor
    kv_indptr: torch.Tensor
    kv_indices: torch.Tensor
    kv_last_page_len: torch.Tensor
    page_size: int

    @classmethod
    def build(cls, q_lens: list[int], page_tables: list[list[int]], kv_lens: list[int],
              page_size: int) -> "AttentionMetadata":
        """From per-request query lengths, page lists and total KV lengths (new tokens included)."""
        num_pages = [-(-kv_len // page_size) for kv_len in kv_lens]
        held = list(map(len, page_tables))
        if any(map(gt, q_lens, kv_lens)) or any(map(gt, num_pages, held)):
            raise ValueError("a page table is shorter than its KV length, or a query longer than it")
        # a table mostly holds exactly its KV length's pages: no slices then
        tables = page_tables if held == num_pages else (pages[:n] for pages, n in zip(page_tables, num_pages))
        indices = list(chain.from_iterable(tables))
        last = [kv_len - (n - 1) * page_size for kv_len, n in zip(kv_lens, num_pages)]
        i32 = torch.int32
        return cls(int_tensor([0, *accumulate(q_lens)], i32), int_tensor([0, *accumulate(num_pages)], i32),
                   int_tensor(indices, i32), int_tensor(last, i32), page_size)

    @property
    def batch_size(self) -> int:
        return len(self.qo_indptr) - 1

    def q_lens(self) -> torch.Tensor:
        return (self.qo_indptr[1:] - self.qo_indptr[:-1]).long()

    def kv_lens(self) -> torch.Tensor:
        pages = (self.kv_indptr[1:] - self.kv_indptr[:-1]).long()
        return (pages - 1) * self.page_size + self.kv_last_page_len.long()

    def token_slots(self, request: int, start: int, end: int) -> torch.Tensor:
        """Pool slots of request's KV positions start:end."""
        pos = torch.arange(start, end)
        pages = self.kv_indices[self.kv_indptr[request]:self.kv_indptr[request + 1]].long()
        return pages[pos // self.page_size] * self.page_size + pos % self.page_size
