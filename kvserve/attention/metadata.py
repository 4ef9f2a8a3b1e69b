"""The page table of one step in FlashInfer's CSR layout: four flat int32 tensors anyone can print."""
from dataclasses import dataclass

import torch


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
        qo, kv, indices, last = [0], [0], [], []
        for q_len, pages, kv_len in zip(q_lens, page_tables, kv_lens):
            n = -(-kv_len // page_size)
            assert q_len <= kv_len and n <= len(pages), "page table shorter than the KV length"
            qo.append(qo[-1] + q_len)
            indices.extend(pages[:n])
            kv.append(kv[-1] + n)
            last.append(kv_len - (n - 1) * page_size)
        i32 = dict(dtype=torch.int32)
        return cls(torch.tensor(qo, **i32), torch.tensor(kv, **i32), torch.tensor(indices, **i32),
                   torch.tensor(last, **i32), page_size)

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
