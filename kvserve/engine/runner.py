"""ModelRunner: turns a SchedulerOutput into the step's flat tensors, runs the model once,
and returns the logits of the sequences whose last token was computed this step."""
import torch

from kvserve.attention.metadata import AttentionMetadata
from kvserve.engine.request import Sequence


class ModelRunner:
    def __init__(self, model, attention, page_size: int, device="cpu", compile: bool = False,
                 policy_attention=None):
        self.model = model
        if compile:
            from kvserve.engine.compiled_forward import compile_forward
            self.forward = compile_forward(model)
        else:
            self.forward = model
        self.attention = attention
        self.policy_attention = policy_attention  # PolicyAttention: steps with non-full decodes
        self.native_decoder = None  # NativeDecoder: every step with full attention only
        self.page_size = page_size
        self.device = device
        self.num_tokens_run = 0  # tokens through the model since start; tests count prefix hits with it

    @torch.inference_mode()
    def execute(self, scheduled: list[tuple[Sequence, int]]) -> tuple[torch.Tensor, list[Sequence]]:
        ids, positions, q_lens, kv_lens, last_rows, to_sample = [], [], [], [], [], []
        for seq, n in scheduled:
            start = seq.num_computed_tokens
            ids.extend(seq.token_ids[start:start + n])
            positions.extend(range(start, start + n))
            q_lens.append(n)
            kv_lens.append(start + n)
            if start + n == len(seq.token_ids):
                last_rows.append(len(ids) - 1)
                to_sample.append(seq)
        sparse = [i for i, (seq, n) in enumerate(scheduled) if n == 1 and not seq.policy.is_full]
        native = self.native_decoder
        if native is not None and not sparse:
            page_table, page_starts = [], []
            for seq, n in scheduled:
                page_starts.extend([len(page_table)] * n)
                page_table.extend(seq.pages)
            hidden = native(ids, positions, page_table, page_starts, last_rows)
        else:
            attention, forward = self._plan(scheduled, sparse, q_lens, kv_lens)
            hidden = forward(torch.tensor(ids, device=self.device), torch.tensor(positions, device=self.device),
                             attention)
            hidden = hidden[torch.tensor(last_rows, dtype=torch.long, device=self.device)]
        self.num_tokens_run += len(ids)
        logits = self.model.compute_logits(hidden)
        return logits, to_sample

    def _plan(self, scheduled, sparse: list[int], q_lens, kv_lens):
        """The step's planned attention backend and the forward to run it with."""
        if sparse and self.policy_attention is not None:
            self.model.rope.ensure(max(kv_lens))  # streaming runs past the context length
            return self._plan_policies(scheduled, sparse, q_lens, kv_lens), self.model
        meta = AttentionMetadata.build(q_lens, [s.pages for s, _ in scheduled], kv_lens, self.page_size)
        self.attention.plan(meta)
        return self.attention, self.forward

    def _plan_policies(self, scheduled, sparse: list[int], q_lens, kv_lens):
        """Full requests and prefills through the dense backend, each non-full decode by its policy.
        Runs eagerly: the compiled graph is for the full-attention path only."""
        row_starts = [0]
        for n in q_lens:
            row_starts.append(row_starts[-1] + n)
        sparse_set = set(sparse)
        dense = [i for i in range(len(scheduled)) if i not in sparse_set]
        meta = AttentionMetadata.build([q_lens[i] for i in dense], [scheduled[i][0].pages for i in dense],
                                       [kv_lens[i] for i in dense], self.page_size) if dense else None
        rows = [r for i in dense for r in range(row_starts[i], row_starts[i + 1])]
        decodes = [(row_starts[i], scheduled[i][0], kv_lens[i]) for i in sparse]
        self.policy_attention.plan(meta, torch.tensor(rows, dtype=torch.long, device=self.device), decodes)
        return self.policy_attention
