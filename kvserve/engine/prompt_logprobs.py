"""Prompt logprobs (SamplingParams.prompt_logprobs): how likely the model found each prompt token.

The hidden state at prompt position q predicts token q + 1. The runner asks the executor for the
hidden states of a scoring sequence's prompt rows besides the rows it samples (`PromptSpan`), in
every prefill chunk; here they become logits a block at a time, so that a long prompt never holds
[prompt, vocab] floats, and only the prompt token's logprob and the top-N are kept.
"""
from dataclasses import dataclass

import torch

from kvserve.engine.request import Logprob, Sequence

_BLOCK = 256  # rows of logits at once: 256 x a 49k vocabulary is 50 MB of float32


@dataclass(slots=True)
class PromptSpan:
    """`count` rows of `seq`, from prompt position `position`, at `first` in the executor's output."""
    seq: Sequence
    first: int
    position: int
    count: int


def prompt_span(seq: Sequence, start: int, n: int) -> tuple[int, int] | None:
    """The positions [lo, hi) of the chunk [start, start + n) whose rows score a prompt token not
    scored yet (a recompute after preemption skips those done), or None."""
    lo, hi = max(start, len(seq.prompt_logprobs)), min(start + n, seq.num_prompt_tokens - 1)
    return (lo, hi) if lo < hi else None


def blocks(span: PromptSpan) -> list[tuple[int, int]]:
    """(offset, rows) of each block of the span's logits computed at once."""
    return [(s, min(_BLOCK, span.count - s)) for s in range(0, span.count, _BLOCK)]


def compute_prompt_logits(model, hidden: torch.Tensor, spans: list[PromptSpan]) -> None:
    """The logits calls record_prompt_logprobs makes, results unused: a tensor-parallel rank > 0
    joins each one's vocabulary all-gather (kvserve/distributed/executor.py)."""
    for span in spans:
        for s, n in blocks(span):
            model.compute_logits(hidden[span.first + s:span.first + s + n])


def record_prompt_logprobs(model, hidden: torch.Tensor, spans: list[PromptSpan]) -> None:
    """Appends each span's Logprobs to its sequence's prompt_logprobs (log-softmax of the raw logits)."""
    for span in spans:
        seq, k = span.seq, span.seq.params.prompt_logprobs
        assert span.position == len(seq.prompt_logprobs), "prompt rows are scored in order"
        for s, n in blocks(span):
            logprobs = model.compute_logits(hidden[span.first + s:span.first + s + n]).log_softmax(-1)
            pos = span.position + s
            targets = seq.token_ids[pos + 1:pos + 1 + n]
            chosen = logprobs.gather(1, torch.tensor(targets, device=logprobs.device).unsqueeze(1)).squeeze(1).tolist()
            if k:
                vals, ids = logprobs.topk(min(k, logprobs.shape[1]), dim=-1)
                tops = [list(zip(i, v)) for i, v in zip(ids.tolist(), vals.tolist())]
            else:
                tops = [[] for _ in targets]
            seq.prompt_logprobs.extend(Logprob(t, lp, top) for t, lp, top in zip(targets, chosen, tops))
