"""Overlapped steps (SGLang's overlap scheduler, vLLM's async scheduling): step N+1 is scheduled and
launched before step N's sampled ids reach the host, so that on a GPU the host schedules, plans and
processes outputs while the device computes. Step N lands (its ids appended, detokenized, stop
checks) right after step N+1 is launched.

A sampled sequence holds its token as pending (Sequence.num_pending counts it in the sequence's
length) until its step lands; the next step reads it from the device (StepBatch.carry). A sequence
that stops at a landed token has already been run once more: that row's token is dropped, and its
K/V write went to pages that later steps, queued after it on the device, may reuse.

Only steps whose sequences need nothing on the host between sampling and their next input overlap
(no grammar, penalties, bias, min_tokens, prompt logprobs, n > 1, sparse policy; logprobs are
computed on the device and land with the ids); any other step lands the pending one first and runs
as Engine._run. Greedy and seeded outputs are the
same with overlap on and off."""
from dataclasses import dataclass

import torch

from kvserve.engine.request import Sequence, SequenceStatus
from kvserve.engine.sampler import SampledToken, _sample, argmax_rows
from kvserve.native.lists import on_device


@dataclass
class Launched:
    """A step whose sampled ids are on their way to the host."""
    scheduled: list[tuple[Sequence, int]]
    sampled: list[Sequence]  # row i of ids is sampled[i]'s token
    ids: torch.Tensor  # on the device: the next step's input
    host: torch.Tensor  # ids' host copy (pinned on a GPU), complete once `ready` has passed
    ready: object  # torch.cuda.Event, or None on the CPU
    logprobs: tuple | None  # (rows, chosen [R], top values [R, n], top ids [R, n]) on the host, or None


def overlap_schedule(config, device: str, tp) -> bool:
    """Whether the engine overlaps steps: config.overlap_schedule, by default (None) on a GPU. Not with
    speculative decoding (drafts read the host's tokens) or tensor parallelism (ranks get host ids)."""
    wanted = config.overlap_schedule
    if wanted is None:
        wanted = str(device).startswith("cuda")
    if wanted and (config.speculative or tp is not None):
        if config.overlap_schedule:
            raise ValueError("overlapped steps do not combine with speculative decoding or tensor parallelism")
        return False
    return bool(wanted)


def overlaps(seq: Sequence) -> bool:
    """Whether seq's next input can come from the device: nothing is done on the host to its tokens."""
    p = seq.params
    return p.unprocessed and seq.grammar is None and p.n == 1 and p.prompt_logprobs is None \
        and (p.attention is None or p.attention.is_full) and not seq.draft_token_ids


class OverlapScheduler:
    def __init__(self, engine):
        self.engine = engine
        self.pending: Launched | None = None

    def step(self, scheduled: list[tuple[Sequence, int]]) -> dict:
        """Launches scheduled (or runs it after landing the pending step, where it cannot overlap) and
        lands the step before it: the requests both touched, for Engine._outputs."""
        touched: dict = {}
        landing, self.pending = self.pending, None
        if scheduled and all(overlaps(seq) for seq, _ in scheduled):
            self.pending = self._launch(scheduled, landing, touched)
            if landing is not None:
                self._land(landing, touched)
            return touched
        if landing is not None:
            self._land(landing, touched)
            scheduled = [(seq, n) for seq, n in scheduled if seq.status is SequenceStatus.RUNNING]
        return self.engine._run(scheduled, touched) if scheduled else touched

    def _launch(self, scheduled, landing: Launched | None, touched: dict) -> Launched | None:
        e = self.engine
        failed: dict[str, Exception] = {}
        logits, sampled = e._execute(scheduled, failed, landing.ids if landing is not None else None)
        for seq, n in scheduled:
            if seq.request_id not in failed:
                seq.num_computed_tokens += n  # its pages are published when the step lands (the ids are needed)
        ids = self._sample(logits, sampled, failed)
        touched.update({rid: e._fail(rid, err) for rid, err in failed.items()})
        keep = None  # the rows of logits still sampled
        if failed:  # a sequence whose run or sampling failed keeps no row
            keep = [i for i, seq in enumerate(sampled) if seq.request_id not in failed]
            sampled, ids = [sampled[i] for i in keep], ids[on_device(keep, ids.device)]
        for row, seq in enumerate(sampled):
            seq.num_pending += 1
            seq.pending_row = row
        logprobs = self._logprobs(logits, sampled, ids, keep)
        if logprobs is not None:  # queued before the ids' copy, whose event then covers them
            logprobs = (logprobs[0], *(self._host_copy(t) for t in logprobs[1:]))
        host, ready = self._to_host(ids)
        return Launched(scheduled, sampled, ids, host, ready, logprobs)

    @staticmethod
    def _logprobs(logits: torch.Tensor, seqs: list[Sequence], ids: torch.Tensor, kept: list[int] | None):
        """For the rows asking for logprobs: (rows, the chosen token's, the best n's values and ids),
        on the device, from the logits as sampled (Sampler's order: before temperature and truncation)."""
        want = [i for i, seq in enumerate(seqs) if seq.params.logprobs is not None]
        if not want:
            return None
        index = on_device([kept[i] for i in want] if kept is not None else want, logits.device)
        lp = logits.index_select(0, index).float().log_softmax(-1)
        chosen = lp.gather(1, ids[on_device(want, ids.device)].unsqueeze(1)).squeeze(1)
        n = min(max(seqs[i].params.logprobs for i in want), lp.shape[1])
        top_vals, top_ids = lp.topk(n, dim=-1)
        return want, chosen, top_vals, top_ids

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence], failed: dict) -> torch.Tensor:
        """The sampled ids on the logits' device, with no wait for them on the host."""
        if not seqs:
            return torch.empty(0, dtype=torch.long, device=logits.device)
        try:
            if all(seq.argmax_only for seq in seqs):
                return argmax_rows(logits)
            return _sample(logits, self.engine.sampling_rows(seqs))
        except Exception:  # Engine._sample names the rows that fail (failed), waiting for the ids
            ids, _ = self.engine._sample(logits, seqs, failed)
            return torch.tensor([0 if t is None else t for t in ids], dtype=torch.long, device=logits.device)

    @staticmethod
    def _host_copy(t: torch.Tensor) -> torch.Tensor:
        """t's copy on the host, queued on a GPU: pinned memory, which torch's caching host allocator
        hands out again only once the copy is done. Read it after the step's event."""
        if t.device.type == "cpu":
            return t
        return torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)

    def _to_host(self, ids: torch.Tensor):
        """ids' host copy, and the event after which it (and every copy queued before) is complete."""
        if ids.device.type == "cpu":
            return ids, None
        host = self._host_copy(ids)
        ready = torch.cuda.Event()
        ready.record()
        return host, ready

    def _land(self, step: Launched, touched: dict) -> None:
        """Does what the synchronous step does after running the model: the newly full pages go to
        the prefix cache (those whose tokens are on the host: the next step's token is computed but
        not landed), the tokens are appended (detokenized, stops checked), windows give pages back."""
        e = self.engine
        if step.ready is not None:
            step.ready.synchronize()
        ids = step.host.tolist()
        page_size = e.pool.page_size
        for seq, _ in step.scheduled:
            known = min(seq.num_computed_tokens, len(seq.token_ids))
            if seq.status is SequenceStatus.RUNNING and known // page_size > len(seq.page_hashes):
                e.kv.cache_computed_pages(seq, known)
        for seq in step.sampled:
            seq.num_pending -= 1
        tokens = None
        if step.logprobs is not None:
            rows, chosen, top_vals, top_ids = step.logprobs
            tokens = [None] * len(ids)
            for i, lp, vals, top in zip(rows, chosen.tolist(), top_vals.tolist(), top_ids.tolist()):
                k = step.sampled[i].params.logprobs
                tokens[i] = SampledToken(ids[i], lp, list(zip(top[:k], vals[:k])))
        # a sequence stopped at the step before is skipped: its request is gone
        e._append_all(step.sampled, ids, tokens, {}, touched)
        if e._releases:
            e._release_streamed_pages(step.scheduled)
