"""ModelRunner: turns a SchedulerOutput into the step's flat tensors, runs the model once,
and returns the logits of the sequences whose last token was computed this step."""
import torch

from kvserve.attention.metadata import AttentionMetadata
from kvserve.engine.request import Sequence


class ModelRunner:
    def __init__(self, model, attention, page_size: int, device="cpu", compile: bool = False):
        self.model = model
        if compile:
            from kvserve.engine.compiled_forward import compile_forward
            self.forward = compile_forward(model)
        else:
            self.forward = model
        self.attention = attention
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
        meta = AttentionMetadata.build(q_lens, [s.pages for s, _ in scheduled], kv_lens, self.page_size)
        self.attention.plan(meta)
        hidden = self.forward(torch.tensor(ids, device=self.device),
                            torch.tensor(positions, device=self.device), self.attention)
        self.num_tokens_run += len(ids)
        logits = self.model.compute_logits(hidden[torch.tensor(last_rows, dtype=torch.long, device=self.device)])
        return logits, to_sample
