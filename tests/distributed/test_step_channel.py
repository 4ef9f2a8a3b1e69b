"""The step description rank 0 sends: what a rank receives is the step rank 0 ran, in one message
for a decode step, two for a step too large for the first."""
from collections import deque

import pytest
import torch

from kvserve.distributed.step_channel import FIRST, PageTable, StepChannel
from kvserve.engine.executors import StepBatch


class Loopback:
    """broadcast_step of a two-rank group, both ends in this process: rank 0 while `sending`."""

    def __init__(self):
        self.sent = deque()
        self.messages = 0
        self.sending = True

    def broadcast_step(self, t: torch.Tensor) -> torch.Tensor:
        if self.sending:
            self.sent.append(t.clone())
            self.messages += 1
        else:
            got = self.sent.popleft()
            assert got.shape == t.shape, "the receiver expects the message size the sender sent"
            t.copy_(got)
        return t


def batch(num_seqs: int, q: int, pages_per_seq: int) -> StepBatch:
    scheduled, ids, positions = [], [], []
    for i in range(num_seqs):
        scheduled.append((PageTable([list(range(i * pages_per_seq, (i + 1) * pages_per_seq))]), q))
        ids += list(range(i, i + q))
        positions += list(range(q))
    last = [(i + 1) * q - 1 for i in range(num_seqs)]
    return StepBatch(scheduled, ids, positions, [q] * num_seqs, [q] * num_seqs, last, [s for s, _ in scheduled], [])


@pytest.mark.parametrize("num_seqs,q,pages,messages", [(8, 1, 5, 1), (4, 300, 20, 2)])
def test_rank_receives_the_step_rank0_sent(num_seqs, q, pages, messages):
    group = Loopback()
    channel = StepChannel(group)
    sent = batch(num_seqs, q, pages)
    channel.send(sent, [(1, 7), (2, 9)])
    group.sending = False
    assert group.messages == messages and group.sent[0].numel() == FIRST
    got, copies = channel.recv()
    assert not group.sent
    assert copies == [(1, 7), (2, 9)]
    for name in ("ids", "positions", "q_lens", "kv_lens", "last_rows"):
        assert getattr(got, name) == getattr(sent, name)
    assert [(p.pages, n) for p, n in got.scheduled] == [(s.pages, n) for s, n in sent.scheduled]


def test_every_kv_group_table_arrives():
    """Three KV groups: each sequence's three tables (a windowed one with pages given back, -1)."""
    group = Loopback()
    channel = StepChannel(group, num_groups=3)
    sent = batch(5, 1, 4)
    for i, (table, _) in enumerate(sent.scheduled):
        pages = table.tables[0]
        table.tables += [[-1, -1] + [100 + 10 * i + j for j in range(2)], [200 + 10 * i + j for j in range(4)]]
        assert len(table.tables[1]) == len(pages)
    channel.send(sent, [])
    group.sending = False
    got, _ = channel.recv()
    assert [(p.tables, n) for p, n in got.scheduled] == [(s.tables, n) for s, n in sent.scheduled]
    assert [p.pages for p, _ in got.scheduled] == [s.tables[0] for s, _ in sent.scheduled]
