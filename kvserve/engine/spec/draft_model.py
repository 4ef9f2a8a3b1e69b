"""A draft model: a smaller model with the target's vocabulary drafts k tokens greedily, with its
own KV pool. Each target sequence has a shadow here (its pages and which positions hold valid
K/V); a step first catches the shadow up on the tokens the target accepted since (one chunk),
then runs k - 1 decode steps, all batched across sequences."""
import torch

from kvserve.engine.executors import StepBatch, select_executor
from kvserve.engine.request import SequenceStatus
from kvserve.kv.groups import KVGroups
from kvserve.kv.manager import KVCacheManager
from kvserve.kv.pool import PagePool
from kvserve.kv.windows import kv_windows


class _Shadow:
    def __init__(self, seq):
        self.seq = seq
        self.tables: list[list[int]] = [[]]  # one page table per KV group of the draft model
        self.released_until = [0]
        self.page_hashes: list[bytes] = []
        self.written: list[int] = []  # the token whose K/V is at each position, from 0

    @property
    def pages(self) -> list[int]:
        return self.tables[0]


class DraftModelProposer:
    def __init__(self, model, target_model, num_pages: int, page_size: int, device):
        if model.config.vocab_size != target_model.config.vocab_size:
            raise ValueError(f"the draft model's vocabulary ({model.config.vocab_size}) is not the target's "
                             f"({target_model.config.vocab_size})")
        cfg = model.config
        self.model = model
        groups = KVGroups.from_windows(kv_windows(cfg))  # kept whole: shadows give no page back
        self.pool = PagePool(groups.slots, num_pages, page_size, cfg.num_kv_heads, cfg.head_dim, model.dtype, device)
        self.kv = KVCacheManager(self.pool, enable_prefix_caching=False, groups=groups)
        self.executor = select_executor(model, self.pool, device, groups=groups)
        self.shadows: dict[int, _Shadow] = {}

    def release_finished(self) -> None:
        """Shadows of sequences no longer running give their pages back (a preempted one starts over)."""
        for seq_id, shadow in list(self.shadows.items()):
            if shadow.seq.status is not SequenceStatus.RUNNING:
                self.kv.free(shadow)
                del self.shadows[seq_id]

    def _pending(self, seqs: list, extra: list[int]) -> list[tuple[int, _Shadow, list[int]]]:
        """(index, shadow, the tokens its cache lacks) of each sequence whose shadow has pages for
        its tokens and `extra` more positions. The last token is always among them: its row drafts."""
        self.release_finished()
        pending = []
        for i, (seq, k) in enumerate(zip(seqs, extra)):
            shadow = self.shadows.setdefault(seq.seq_id, _Shadow(seq))
            tokens = seq.token_ids
            valid = 0  # positions whose K/V was computed from the tokens now there
            while valid < len(shadow.written) and valid < len(tokens) and shadow.written[valid] == tokens[valid]:
                valid += 1
            valid = min(valid, len(tokens) - 1)
            del shadow.written[valid:]
            if self.kv.allocate(shadow, len(tokens) + k - 1):
                pending.append((i, shadow, tokens[valid:]))
        return pending

    @torch.inference_mode()
    def catch_up(self, seqs: list) -> None:
        """Runs the prompts of sequences that just sampled their first token, so that the draft
        model's prefill is part of the prompt's processing (as the target's is), not of decoding."""
        work = [(s, chunk[:-1]) for _, s, chunk in self._pending(seqs, [0] * len(seqs)) if len(chunk) > 1]
        if work:
            self._run(work)

    @torch.inference_mode()
    def propose(self, seqs: list, ks: list[int]) -> list[list[int]]:
        drafts = [[] for _ in seqs]
        pending = self._pending(seqs, ks)
        if not pending:
            return drafts
        shadows = [(i, s, ks[i]) for i, s, _ in pending]
        # step 0: each shadow's uncomputed tokens as a chunk; its last row drafts the first token
        last = self._run([(s, chunk) for _, s, chunk in pending])
        for step in range(max(k for _, _, k in shadows)):
            for (i, _, _), t in zip(shadows, last):
                drafts[i].append(t)
            shadows = [(i, s, k) for i, s, k in shadows if step + 1 < k]
            if not shadows:
                break
            last = self._run([(s, [drafts[i][-1]]) for i, s, _ in shadows])
        return drafts

    def _run(self, work: list[tuple[_Shadow, list[int]]]) -> list[int]:
        """Runs each shadow's tokens at its next positions; the greedy next token of each."""
        ids, positions, q_lens, kv_lens, last_rows, page_table = [], [], [], [], [], []
        for shadow, tokens in work:
            start = len(shadow.written)
            ids += tokens
            positions += range(start, start + len(tokens))
            q_lens.append(len(tokens))
            kv_lens.append(start + len(tokens))
            last_rows.append(len(ids) - 1)
            shadow.written += tokens
        batch = StepBatch([(s, len(t)) for s, t in work], ids, positions, q_lens, kv_lens, last_rows,
                          [s for s, _ in work], [])
        return self.model.compute_logits(self.executor.execute(batch)).argmax(-1).tolist()
