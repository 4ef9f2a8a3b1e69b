"""TensorParallelExecutor: the executor of every rank of a tensor-parallel engine.

Rank 0 (the engine with the scheduler and sampler) sends each step's description, then runs its
shard of the forward; the caller computes logits with the model's vocabulary-parallel lm_head,
whose all-gather the other ranks join. Ranks > 0 run `serve_forever`: receive a step, make the
page copies rank 0 made since the last one (copy-on-write of `n > 1` forks), run the same forward
and logits on their shards, repeat until rank 0 sends stop.
The inner executor is the one a single process would pick for the rank's shard, minus CUDA
graphs (which cannot join collectives): the C whole-step decoder for int4 weights on the CPU
(decode.c calls the all-reduce back between layers), else the eager TorchExecutor.
"""
import weakref

import torch

from kvserve.distributed.group import TPGroup
from kvserve.distributed.step_channel import StepChannel
from kvserve.engine.executors import StepBatch
from kvserve.engine.prompt_logprobs import compute_prompt_logits


class TensorParallelExecutor:
    def __init__(self, inner, model, pool, group: TPGroup, num_groups: int = 1):
        self.inner = inner
        # the TorchExecutor: ModelRunner reaches the attention backends through it
        self.fallback = getattr(inner, "fallback", inner)
        self.model, self.pool, self.group = model, pool, group
        self.channel = StepChannel(group, num_groups)  # KV groups: each sends its page tables
        self._copies: list[tuple[int, int]] = []
        if group.rank == 0:
            pool.on_copy = lambda src, dst: self._copies.append((src, dst))
            # an engine nobody closed still stops its ranks: when it is collected, or at exit
            self._stop = weakref.finalize(self, _stop_ranks, self.channel, group)

    def execute(self, batch: StepBatch) -> torch.Tensor:
        if batch.sparse:  # checked before anything is sent: the ranks stay in step
            raise ValueError("attention policies other than full are not supported with tensor parallelism")
        copies, self._copies = self._copies, []
        self.group.steps += 1
        self.channel.send(batch, copies)
        return self.inner.execute(batch)

    @torch.inference_mode()
    def serve_forever(self) -> None:
        """Ranks > 0: run rank 0's steps until it stops (returns) or the group fails (raises)."""
        while True:
            step = self.channel.recv()
            if step is None:
                return
            batch, copies = step
            for src, dst in copies:
                self.pool.ensure_zeroed([src, dst])
                self.pool.copy_page(src, dst)
            self.pool.ensure_zeroed(p for seq, _ in batch.scheduled for table in seq.tables for p in table)
            hidden = self.inner.execute(batch)
            if batch.prompt_spans:  # as ModelRunner.execute: the prompt rows' logits, then the sampled rows'
                compute_prompt_logits(self.model, hidden, batch.prompt_spans)
                hidden = hidden[batch.sample_index]
            self.model.compute_logits(hidden)

    def close(self) -> None:
        """Rank 0: tells the other ranks to stop, then waits for the ones it spawned."""
        if self.group.rank == 0:
            self._stop()
        else:
            self.group.close()


def _stop_ranks(channel: StepChannel, group: TPGroup) -> None:
    if group.closed:
        return
    if not group.failure:
        try:
            channel.send_stop()
        except Exception:  # noqa: BLE001 - a rank already gone; close() kills what is left
            pass
    group.close()
