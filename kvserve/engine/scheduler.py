"""Continuous batching with chunked prefill (Sarathi-Serve style) over the paged KV cache.

Each step takes every running sequence first (decodes cost one token each, unfinished prefills
continue in chunks), then admits waiting sequences while the token budget and the sequence cap
allow. There are no prefill/decode phases: a sequence just needs `num_uncomputed` more tokens.
When pages run out, the newest running sequence is preempted: its pages are freed and it is
recomputed later (often cheaply, from its own pages still in the prefix cache).
"""
import bisect
from dataclasses import dataclass, field

from kvserve.config import SchedulerConfig
from kvserve.engine.request import Sequence, SequenceStatus, now
from kvserve.kv.manager import KVCacheManager


@dataclass
class SchedulerOutput:
    scheduled: list[tuple[Sequence, int]] = field(default_factory=list)  # (sequence, tokens to run)
    preempted: list[Sequence] = field(default_factory=list)


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager):
        self.config = config
        self.kv = kv
        self.waiting: list[Sequence] = []  # sorted by (priority, arrival, id)
        self.running: list[Sequence] = []  # admission order: the last is the first to preempt

    @staticmethod
    def _order(seq: Sequence):
        return (seq.priority, seq.arrival, seq.seq_id)

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        bisect.insort(self.waiting, seq, key=self._order)

    def add_running(self, seq: Sequence) -> None:
        """A forked sequence that already holds its pages."""
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)

    def finish(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.kv.free(seq)
        seq.status = SequenceStatus.FINISHED

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.kv.free(seq)
        seq.num_computed_tokens = 0
        seq.attn_state = None  # sparse attention state refers to the freed pages
        seq.draft_token_ids = []
        self.add(seq)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        # decodes first, so that an unfinished long prefill never starves them of the budget
        room = self.kv.page_size
        running = list(self.running)  # preemption below removes from self.running
        pending = [len(s.token_ids) + s.num_pending - s.num_computed_tokens for s in running]
        if pending.count(1) == len(running) <= budget and self._decode_pages(running):
            out.scheduled = [(s, 1) for s in running]  # every running sequence decodes one token
            self._admit(out, budget - len(running))
            return out
        if max(pending, default=1) > 1:
            order = sorted(range(len(running)), key=lambda i: pending[i] > 1)
            running, pending = [running[i] for i in order], [pending[i] for i in order]
        scheduled = out.scheduled
        for seq, n in zip(running, pending):
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING:  # preempted earlier in this loop
                continue
            if seq.draft_token_ids:  # its draft's rows count in the budget: cut it to fit
                n = min(n + len(seq.draft_token_ids), budget)
                del seq.draft_token_ids[n - 1:]
            elif n > budget:
                n = budget
            fits = seq.num_computed_tokens + n <= len(seq.tables[0]) * room  # most decode steps
            while not fits and not self.kv.allocate(seq, seq.num_computed_tokens + n):
                victim = self.running[-1]
                self.preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
                for i, (s, k) in enumerate(out.scheduled):  # a decode taken earlier in this loop
                    if s is victim:
                        del out.scheduled[i]
                        budget += k
                        break
            if seq.status is SequenceStatus.RUNNING:
                scheduled.append((seq, n))
                budget -= n
        if not out.preempted:
            self._admit(out, budget)
        return out

    def _decode_pages(self, running: list[Sequence]) -> bool:
        """Whether each of these decodes (no drafts) has room for its token, pages allocated here
        in running order where a page fills; False where one cannot get a page (the caller's
        loop then preempts, as it would have at that sequence)."""
        room = self.kv.page_size
        if any(s.draft_token_ids for s in running):
            return False
        for seq in [s for s in running if s.num_computed_tokens >= len(s.tables[0]) * room]:
            if not self.kv.allocate(seq, seq.num_computed_tokens + 1):
                return False
        return True

    def _admit(self, out: SchedulerOutput, budget: int) -> None:
        if not self.waiting or budget == 0 or len(self.running) >= self.config.max_num_seqs:
            return
        # first pages of prompts whose new full pages are being computed now
        page = self.kv.page_size
        prefilling = {self._first_page(s) for s in self.running if s.num_prompt_tokens - s.num_computed_tokens >= page}
        for seq in list(self.waiting):
            if budget == 0 or len(self.running) >= self.config.max_num_seqs:
                break
            if seq.num_pending:
                continue  # preempted with a token still on the device: readmitted once it has landed
            key = self._first_page(seq)
            if key is not None and key in prefilling:
                continue  # its prefix is being computed now: next step it is a cache hit
            if not seq.pages and not seq.scores_prompt:  # a hit would skip the rows to score
                seq.num_computed_tokens = self.kv.match_prefix(seq)
                seq.num_cached_tokens = max(seq.num_cached_tokens, seq.num_computed_tokens)
            n = min(seq.num_uncomputed, budget)
            if n < seq.num_uncomputed and not self.config.enable_chunked_prefill:
                break
            if not self.kv.allocate(seq, seq.num_computed_tokens + n):
                self.kv.free(seq)  # gives its prefix hits back until pages free up
                seq.num_computed_tokens = 0
                break
            self.waiting.remove(seq)
            seq.status = SequenceStatus.RUNNING
            if seq.first_scheduled is None:
                seq.first_scheduled = now()
            self.running.append(seq)
            out.scheduled.append((seq, n))
            budget -= n
            if key is not None and n >= page:
                prefilling.add(key)

    def _first_page(self, seq: Sequence):
        if self.kv.prefix is None or seq.num_prompt_tokens <= self.kv.page_size:
            return None
        return seq.cache_salt, tuple(seq.token_ids[:self.kv.page_size])
