"""The step description rank 0 broadcasts to the other tensor-parallel ranks: the scheduled
tokens and page tables (a few int64s per token and per page), never activations.

One message of FIRST int64s: a fixed header, then the start of one flat body (a decode step's
whole body fits); what does not fit follows in a second message of the exact size:
header [op, tokens T, sequences S, returned rows L, pages P, page copies C, prompt spans N, sampled R]
body   ids[T] positions[T] q_lens[S] kv_lens[S] last_rows[L] pages_per_seq[S] pages[P] copies[2C]
       spans[2N] sample_index[R]
Prompt spans (first, count) and sample_index come with prompt logprobs: rank 0 computes logits of
those rows block by block, and every rank must join each block's all-gather of the vocabulary.
A model with several KV groups (kvserve/kv/groups.py) sends every group's tables: a sequence's
tables all have its length, so pages holds group 0's tables of every sequence, then group 1's, ...
(P = groups x the sum of pages_per_seq). Both ends know the group count from the model's config.
"""
from dataclasses import dataclass

import torch

from kvserve.distributed.group import TPGroup
from kvserve.engine.executors import StepBatch
from kvserve.engine.prompt_logprobs import PromptSpan

STEP, STOP = 0, 1
HEADER = 8
FIRST = 512  # 4 KB: a small gloo broadcast costs about what an empty one does


@dataclass
class PageTable:
    """What an executor reads of a scheduled sequence on a rank that has no Sequence objects:
    its page table per KV group."""
    tables: list[list[int]]

    @property
    def pages(self) -> list[int]:
        return self.tables[0]


class StepChannel:
    def __init__(self, group: TPGroup, num_groups: int = 1):
        self.group = group
        self.num_groups = num_groups

    def send(self, batch: StepBatch, copies: list[tuple[int, int]]) -> None:
        seqs = [seq for seq, _ in batch.scheduled]
        flat_pages = [p for g in range(self.num_groups) for seq in seqs for p in seq.tables[g]]
        spans, sample_index = batch.prompt_spans, batch.sample_index or []
        header = [STEP, len(batch.ids), len(batch.q_lens), len(batch.last_rows), len(flat_pages), len(copies),
                  len(spans), len(sample_index)]
        body = (batch.ids + batch.positions + batch.q_lens + batch.kv_lens + batch.last_rows
                + [len(seq.tables[0]) for seq in seqs] + flat_pages + [x for c in copies for x in c]
                + [x for span in spans for x in (span.first, span.count)] + sample_index)
        message = header + body
        first = torch.zeros(FIRST, dtype=torch.int64)
        first[:min(FIRST, len(message))] = torch.tensor(message[:FIRST], dtype=torch.int64)
        self.group.broadcast_step(first)
        if len(message) > FIRST:
            self.group.broadcast_step(torch.tensor(message[FIRST:], dtype=torch.int64))

    def send_stop(self) -> None:
        self.group.broadcast_step(torch.tensor([STOP] + [0] * (FIRST - 1), dtype=torch.int64))

    def recv(self) -> tuple[StepBatch, list[tuple[int, int]]] | None:
        """The next step and the page copies to make before it; None when rank 0 stops."""
        message = self.group.broadcast_step(torch.empty(FIRST, dtype=torch.int64)).tolist()
        op, t, s, n_last, n_pages, n_copies, n_spans, n_sampled = message[:HEADER]
        if op == STOP:
            return None
        size = HEADER + 2 * t + 3 * s + n_last + n_pages + 2 * n_copies + 2 * n_spans + n_sampled
        if size > FIRST:
            message += self.group.broadcast_step(torch.empty(size - FIRST, dtype=torch.int64)).tolist()
        body = message[HEADER:size]
        parts, at = [], 0
        for n in (t, t, s, s, n_last, s, n_pages, 2 * n_copies, 2 * n_spans, n_sampled):
            parts.append(body[at:at + n])
            at += n
        ids, positions, q_lens, kv_lens, last_rows, counts, flat, copies, span_rows, sample_index = parts
        per_group = sum(counts)
        tables = [[] for _ in counts]
        for g in range(self.num_groups):
            at = g * per_group
            for i, n in enumerate(counts):
                tables[i].append(flat[at:at + n])
                at += n
        scheduled = [(PageTable(ts), q) for ts, q in zip(tables, q_lens)]
        spans = [PromptSpan(None, first, 0, count) for first, count in zip(span_rows[0::2], span_rows[1::2])]
        return (StepBatch(scheduled, ids, positions, q_lens, kv_lens, last_rows, [], [], spans,
                          sample_index if spans else None),
                list(zip(copies[0::2], copies[1::2])))
