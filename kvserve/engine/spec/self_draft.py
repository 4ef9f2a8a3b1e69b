"""Self speculation (TriForce): the target model drafts its own next k tokens while attending to a
streaming view of its KV cache (the first pages and the last `window` tokens), which at long
contexts costs a fraction of full attention; the verification step then reads every position.

The draft passes write the K/V of the tokens they run into the sequence's own pages, past
num_computed_tokens: verification recomputes those k + 1 positions, so nothing is rolled back.

On the C step (NativeExecutor) the view is a shortened page table: the sink pages, then the pages
of the window, each token placed at its position within that table but rotated by its true
position (keys are stored rotated, so only relative distances matter). Elsewhere the draft steps
are streaming-policy decodes through PolicyAttention.

With KV groups (a model with sliding-window layers) the view is the global layers' only: each
group's table is shortened the same way, and the view's window covers the widest layer window
and a page more, so a windowed layer's keys all lie in the view's last pages, at their distances
(its group's pages below the window, -1, are never read)."""
from types import SimpleNamespace

import torch

from kvserve.attention.policy import AttentionPolicy
from kvserve.engine.executors import NativeExecutor, StepBatch


class SelfDraftProposer:
    full_drafts = True  # see speculator.TRUSTED
    def __init__(self, runner, kv, window: int, sink: int = 4):
        self.model, self.kv = runner.model, kv
        self.page_size = kv.page_size
        executor = runner.executor
        self.native = executor.decoder if isinstance(executor, NativeExecutor) else None
        self.torch = runner._torch_executor
        windows = [w for w in kv.groups.windows if w is not None]
        if windows:  # see the module's docstring
            window = max(window, max(windows) + self.page_size)
        self.num_groups = len(kv.groups)
        self.policy = AttentionPolicy("streaming", sink=sink, window=window)
        self.sink_pages = -(-sink // self.page_size)
        self.window_pages = -(-window // self.page_size)
        # below this a draft pass reads most of what a full step reads, and drafting costs more
        # than it saves
        self.min_context = 4 * (sink + window)

    @torch.inference_mode()
    def propose(self, seqs: list, ks: list[int]) -> list[list[int]]:
        # the draft passes write up to position L + k - 2; verification needs L + k slots
        live = [i for i, (s, k) in enumerate(zip(seqs, ks))
                if len(s.token_ids) >= self.min_context and self.kv.allocate(s, len(s.token_ids) + k)]
        drafts = [[] for _ in seqs]
        last = {i: seqs[i].token_ids[-1] for i in live}
        for step in range(max((ks[i] for i in live), default=0)):
            active = [i for i in live if step < ks[i]]
            positions = [len(seqs[i].token_ids) - 1 + step for i in active]
            logits = self._forward([last[i] for i in active], [seqs[i] for i in active], positions)
            for i, t in zip(active, logits.argmax(-1).tolist()):
                drafts[i].append(t)
                last[i] = t
        return drafts

    def _forward(self, ids: list[int], seqs: list, positions: list[int]) -> torch.Tensor:
        if self.native is not None:
            return self._native(ids, seqs, positions)
        views = [SimpleNamespace(policy=self.policy, tables=s.tables, num_prompt_tokens=s.num_prompt_tokens,
                                 attn_state=None) for s in seqs]
        n = len(ids)
        batch = StepBatch([(v, 1) for v in views], ids, positions, [1] * n, [p + 1 for p in positions],
                          list(range(n)), views, list(range(n)))
        return self.model.compute_logits(self.torch.execute(batch))

    def _native(self, ids: list[int], seqs: list, positions: list[int]) -> torch.Tensor:
        page = self.page_size
        tables, starts, placed = [[] for _ in range(self.num_groups)], [], []
        for s, pos in zip(seqs, positions):
            pages = pos // page + 1  # pages holding positions 0..pos
            skip = max(0, pages - self.sink_pages - self.window_pages)
            starts.append(len(tables[0]))
            for table, own in zip(tables, s.tables):  # every group's table shortened alike
                table.extend(own[:self.sink_pages] + own[self.sink_pages + skip:pages] if skip else own[:pages])
            placed.append(pos - skip * page)
        hidden = self.native(ids, placed, [p for table in tables for p in table], starts, None,
                             rope_positions=positions)
        return self.model.compute_logits(hidden)
