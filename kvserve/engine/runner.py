"""ModelRunner: turns a SchedulerOutput into the step's flat inputs, runs them on the device's
executor, and returns the logits of the sequences whose last token was computed this step (with a
draft, the rows of its last token and of each draft token)."""
import torch

from kvserve.engine.executors import StepBatch
from kvserve.engine.prompt_logprobs import PromptSpan, prompt_span, record_prompt_logprobs
from kvserve.engine.request import Sequence


class ModelRunner:
    def __init__(self, model, executor):
        self.model = model
        self.executor = executor  # chosen once per device: kvserve.engine.executors.select_executor
        self.num_tokens_run = 0  # tokens through the model since start; tests count prefix hits with it

    @property
    def attention(self):
        return self._torch_executor.attention

    @property
    def policy_attention(self):
        return self._torch_executor.policy_attention

    @property
    def _torch_executor(self):
        return getattr(self.executor, "fallback", self.executor)

    @torch.inference_mode()
    def execute(self, scheduled: list[tuple[Sequence, int]],
                pending_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, list[Sequence]]:
        """pending_ids: the ids sampled by the previous step, still on the device, where a sequence's
        input is its pending token (kvserve/engine/overlap.py)."""
        batch = self.batch(scheduled)
        if pending_ids is not None:
            batch.carry(pending_ids)
        hidden = self.executor.execute(batch)
        self.num_tokens_run += len(batch.ids)
        if batch.prompt_spans:
            record_prompt_logprobs(self.model, hidden, batch.prompt_spans)
            hidden = hidden[batch.sample_index]
        return self.model.compute_logits(hidden), batch.sampled

    @staticmethod
    def batch(scheduled: list[tuple[Sequence, int]]) -> StepBatch:
        if all(n == 1 for _, n in scheduled):  # decodes only: comprehensions, no per-row appends
            seqs = [seq for seq, _ in scheduled]
            positions = [seq.num_computed_tokens for seq in seqs]
            last = [i for i, seq in enumerate(seqs)
                    if seq.num_computed_tokens + 1 == len(seq.token_ids) + seq.num_pending]
            if len(last) < len(seqs) and any(seq.scores_prompt for seq in seqs):
                return ModelRunner._batch(scheduled)  # a one-token prompt chunk to score
            # a pending token is not on the host yet: StepBatch.carry puts it in
            ids = [0 if seq.num_pending else seq.token_ids[p] for seq, p in zip(seqs, positions)]
            return StepBatch(scheduled, ids, positions, [1] * len(seqs), [p + 1 for p in positions], last,
                             [seqs[i] for i in last],
                             [i for i, seq in enumerate(seqs) if _policy_decode(seq, seq.num_computed_tokens)])
        return ModelRunner._batch(scheduled)

    @staticmethod
    def _batch(scheduled: list[tuple[Sequence, int]]) -> StepBatch:
        ids, positions, q_lens, kv_lens, last_rows, sampled, sparse = [], [], [], [], [], [], []
        spans, sample_index = [], []
        for i, (seq, n) in enumerate(scheduled):
            start = seq.num_computed_tokens
            if n == 1:
                ids.append(0 if seq.num_pending else seq.token_ids[start])
                positions.append(start)
                if _policy_decode(seq, start):
                    sparse.append(i)
            else:
                ids.extend(seq.token_ids[start:start + n])
                positions.extend(range(start, start + n))
            draft = seq.draft_token_ids
            if draft:  # its last token and a draft: n = 1 + len(draft), each row verifies the next
                ids.extend(draft)
            q_lens.append(n)
            kv_lens.append(start + n)
            if seq.params.prompt_logprobs is not None and (span := prompt_span(seq, start, n)):
                lo, hi = span
                spans.append(PromptSpan(seq, len(last_rows), lo, hi - lo))
                row = len(ids) - n - start  # the row of position 0
                last_rows.extend(range(row + lo, row + hi))
            if start + n == len(seq.token_ids) + seq.num_pending + len(draft):
                sample_index.extend(range(len(last_rows), len(last_rows) + 1 + len(draft)))
                last_rows.extend(range(len(ids) - 1 - len(draft), len(ids)))
                sampled.append(seq)
        return StepBatch(scheduled, ids, positions, q_lens, kv_lens, last_rows, sampled, sparse, spans,
                         sample_index if spans else None)


def _policy_decode(seq: Sequence, position: int) -> bool:
    """Whether the token at `position`, alone in its step, is attended by seq's non-full policy: a
    generated token. A prompt's last token left alone by a prefix hit is the prompt's: full attention
    (and for offload, its K/V staged before any policy decode samples them)."""
    return seq.params.attention is not None and not seq.params.attention.is_full and position >= seq.num_prompt_tokens
