"""Batched sampling: per-request logit processing, then greedy or random choice for each row of a step.

Order (vLLM / OpenAI semantics): logit_bias -> min_tokens mask -> repetition penalty ->
presence/frequency penalties -> logprobs -> temperature -> top-k -> top-p -> min-p -> sample.
"""
import math
from array import array
from dataclasses import dataclass

import torch

from kvserve.engine.request import MIN_TEMPERATURE as _MIN_TEMPERATURE, SamplingParams
from kvserve.native.lists import int_tensor, on_device
from kvserve.native.sampling import sample_rows


@dataclass(slots=True)
class SamplingRow:
    """One sequence in this step's batch. Its ids are sliced only by the options that read them."""
    params: SamplingParams
    token_ids: list[int]  # prompt, then what was generated so far
    num_prompt_tokens: int
    generator: torch.Generator | None  # the request's seeded stream, or None for the global RNG
    eos_token_ids: list[int]  # masked while the output is shorter than min_tokens, unless ignore_eos

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[:self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]


@dataclass(slots=True)
class SampledToken:
    token_id: int
    logprob: float | None  # of the chosen token, when params.logprobs is not None
    top_logprobs: list[tuple[int, float]] | None  # the params.logprobs best (token, logprob), best first


class Sampler:
    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow]) -> list[SampledToken]:
        if logits.dim() != 2 or logits.shape[0] != len(rows):
            raise ValueError(f"logits {tuple(logits.shape)} do not match {len(rows)} rows")
        if all(r.params.plain for r in rows):  # nothing to process: sampling reads the logits only
            return [SampledToken(t, None, None) for t in _sample(logits.float(), rows).tolist()]
        logits = process(logits, rows)

        # Logprobs: from these processed logits, before temperature and truncation, so they describe the
        # request-adjusted model distribution, not the sampling knobs (vLLM's default takes them pre-penalty).
        want = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
        logprobs = logits[want].log_softmax(-1) if want else None

        tokens = _sample(logits, rows)
        out = [SampledToken(t, None, None) for t in tokens.tolist()]
        if want:
            n = min(max(rows[i].params.logprobs for i in want), logits.shape[1])
            chosen = logprobs.gather(1, tokens[want].unsqueeze(1)).squeeze(1).tolist()
            top_vals, top_ids = logprobs.topk(n, dim=-1)
            for i, lp, ids, vals in zip(want, chosen, top_ids.tolist(), top_vals.tolist()):
                k = rows[i].params.logprobs
                out[i] = SampledToken(out[i].token_id, lp, list(zip(ids[:k], vals[:k])))
        return out


def process(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """A float32 copy of the logits with each row's logit bias, min_tokens mask and penalties:
    what logprobs describe and what temperature and truncation then act on."""
    logits = logits.to(torch.float32, copy=True)  # processed in place; the caller's tensor stays intact
    _put(logits, [(i, t, b) for i, r in enumerate(rows) for t, b in (r.params.logit_bias or {}).items()],
         accumulate=True)
    _put(logits, [(i, t, -math.inf) for i, r in enumerate(rows) for t in _min_tokens_masked(r)])
    _apply_penalties(logits, rows)
    return logits


def random_rows(rows: list[SamplingRow]) -> list[int]:
    """Rows drawn at random; the others take the argmax of their processed logits."""
    return [i for i, r in enumerate(rows) if not r.params.greedy and r.params.temperature >= _MIN_TEMPERATURE]


def truncated(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Processed logits of random rows -> temperature-scaled logits with top-k, top-p and min-p
    applied (-inf outside): their softmax is the distribution a row's token is drawn from."""
    sub = logits / _column([p.temperature for p in params], logits)
    vocab = sub.shape[1]
    top_k = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
    if any(p.top_p < 1 for p in params):
        # top_p 1 -> inf, so float rounding in the cumsum never trims a row that asked for no top-p
        top_p = _column([p.top_p if p.top_p < 1 else math.inf for p in params], sub)
        sub = _top_k_top_p(sub, on_device(top_k, sub.device).unsqueeze(1), top_p)
    elif any(k < vocab for k in top_k):  # top-k alone needs no full sort
        kth = sub.topk(max(top_k), dim=-1).values.gather(1, on_device(top_k, sub.device).unsqueeze(1) - 1)
        sub.masked_fill_(sub < kth, -math.inf)
    if any(p.min_p > 0 for p in params):  # p < min_p * p_max  <=>  l < l_max + log(min_p)
        floor = sub.amax(-1, keepdim=True) + _column([p.min_p for p in params], sub).log()
        sub.masked_fill_(sub < floor, -math.inf)
    return sub


def _put(logits: torch.Tensor, entries: list[tuple[int, int, float]], accumulate: bool = False) -> None:
    """logits[row, token] = value (or += value) for each entry, in one indexed write."""
    if not entries:
        return
    r, t, v = zip(*entries)
    if not all(0 <= tok < logits.shape[1] for tok in t):
        # advanced indexing would wrap negative ids, and out-of-range ones are a device assert on GPU
        raise ValueError(f"token ids {sorted(set(t))} are not all in the vocabulary of {logits.shape[1]}")
    index = (on_device(list(r), logits.device), on_device(list(t), logits.device))
    logits.index_put_(index, on_device(list(v), logits.device, logits.dtype), accumulate=accumulate)


def _min_tokens_masked(row: SamplingRow) -> list[int]:
    if len(row.token_ids) - row.num_prompt_tokens >= row.params.min_tokens:
        return []
    # with ignore_eos the EOS does not end the sequence, so it need not be held back (vLLM's rule)
    return row.params.stop_token_ids + ([] if row.params.ignore_eos else row.eos_token_ids)


def _apply_penalties(logits: torch.Tensor, rows: list[SamplingRow]) -> None:
    rep = [i for i, r in enumerate(rows) if r.params.repetition_penalty != 1]
    if rep:  # HF / vLLM: over prompt and output, positive logits shrink by division, negative by multiplication
        seen = _counts([rows[i].token_ids for i in rep], logits) > 0
        penalty = _column([rows[i].params.repetition_penalty for i in rep], logits)
        sub = logits[rep]
        logits[rep] = torch.where(seen, torch.where(sub > 0, sub / penalty, sub * penalty), sub)
    pf = [i for i, r in enumerate(rows) if r.params.presence_penalty or r.params.frequency_penalty]
    if pf:  # OpenAI: over output tokens only
        counts = _counts([rows[i].output_token_ids for i in pf], logits)
        presence = _column([rows[i].params.presence_penalty for i in pf], logits)
        frequency = _column([rows[i].params.frequency_penalty for i in pf], logits)
        logits[pf] -= presence * (counts > 0) + frequency * counts


def _counts(token_lists: list[list[int]], logits: torch.Tensor) -> torch.Tensor:
    """[len(token_lists), V] occurrence counts, from one scatter over lists padded with the id V."""
    vocab = logits.shape[1]
    width = max(map(len, token_lists))
    ids = torch.tensor([t + [vocab] * (width - len(t)) for t in token_lists], dtype=torch.long)
    ids = ids.to(logits.device, non_blocking=True)  # no wait for the device's queued work
    counts = torch.zeros(len(token_lists), vocab + 1, device=logits.device)
    return counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=counts.dtype))[:, :vocab]


def _column(values: list[float], logits: torch.Tensor) -> torch.Tensor:
    return on_device(values, logits.device, logits.dtype).unsqueeze(1)


def argmax_rows(logits: torch.Tensor) -> torch.Tensor:
    """logits.argmax(-1), ties and NaNs alike (the first maximum; a NaN counts as the maximum). The CPU's
    argmax kernel is scalar, ~8x slower than its vectorized amax: on the CPU, the block of 32 columns
    holding each row's maximum is found by amax, and argmax then reads that block alone."""
    rows, vocab = logits.shape
    if logits.device.type != "cpu" or vocab % _ARGMAX_BLOCK or rows * vocab < 32768:  # small: one op is less
        return logits.argmax(-1)
    blocks = logits.view(rows, vocab // _ARGMAX_BLOCK, _ARGMAX_BLOCK) if logits.is_contiguous() else \
        logits.reshape(rows, vocab // _ARGMAX_BLOCK, _ARGMAX_BLOCK)
    best = blocks.amax(-1).argmax(-1)  # the first block whose maximum is the row's (NaN included)
    return best * _ARGMAX_BLOCK + blocks[torch.arange(rows), best].argmax(-1)


_ARGMAX_BLOCK = 32  # amax over 32 floats vectorizes; fewer would make the block argmax the slow part


def _sample(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    rand = random_rows(rows)
    if not rand:
        return argmax_rows(logits)
    every = len(rand) == len(rows)  # the common sampled batch: the logits are read as they are
    params = [rows[i].params for i in rand]
    u = uniforms([rows[i].generator for i in rand])
    drawn = sample_rows(logits, _option_table(params), u, None if every else int_tensor(rand))
    index = None if every else on_device(rand, logits.device)
    if drawn is None:  # GPU, or no C compiler: the same draw in PyTorch ops
        drawn = inverse_cdf(truncated(logits if every else logits[index], params),
                            u.to(logits.device, non_blocking=True))
    if every:
        return drawn
    tokens = argmax_rows(logits)  # greedy rows keep theirs
    tokens[index] = drawn
    return tokens


def _option_table(params: list[SamplingParams]) -> torch.Tensor:
    """[R, 4] float64 of temperature, top_k, top_p, min_p (packed by array: torch.tensor of tuples is ~5x slower)"""
    flat = array("d", [v for p in params for v in (p.temperature, p.top_k, p.top_p, p.min_p)])
    return torch.frombuffer(flat, dtype=torch.float64).view(len(params), 4)


def uniforms(generators: list[torch.Generator | None]) -> torch.Tensor:
    """One uniform in [0, 1) a row, on the CPU: a seeded row's from its own generator (so its token does
    not depend on the rest of the batch), the others' from the global RNG in one call."""
    seeded = [j for j, g in enumerate(generators) if g is not None]
    u = torch.rand(len(generators)) if len(seeded) < len(generators) else torch.empty(len(generators))
    if seeded:
        u[seeded] = torch.cat([torch.rand(1, generator=generators[j]) for j in seeded])
    return u


def inverse_cdf(logits: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Truncated logits [R, V] and uniforms [R] -> a token a row drawn from their softmax (sampling.c's twin)."""
    return draw(logits.softmax(-1), u)


def draw(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """probs [R, V] (unnormalized is fine) and uniforms [R] in [0, 1) -> per row, the first token whose
    cumulative probability exceeds u times the row's total. A token of probability 0 never is one, for
    any u: where rounding leaves no such token, the last token of nonzero probability is taken."""
    cdf = probs.cumsum(-1)
    kept = probs > 0
    hit = kept & (cdf > u.unsqueeze(1) * cdf[:, -1:])
    last = torch.where(kept, torch.arange(probs.shape[1], device=probs.device), 0).amax(-1)
    return torch.where(hit.any(-1), hit.to(torch.uint8).argmax(-1), last)


def _top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """top_k: [R, 1] (V where off); top_p: [R, 1] (inf where off). Each keeps the tokens at or above a
    value (sampling.c's rule): top-k the k-th largest, top-p the last of the smallest sorted prefix
    with mass >= top_p, so tokens tied with either are kept."""
    ordered = logits.sort(-1, descending=True).values
    kth = ordered.gather(1, top_k - 1)
    probs = ordered.masked_fill_(ordered < kth, -math.inf).softmax(-1)
    # a token stays while the mass before it is below top_p: the first always does
    kept = (probs.cumsum(-1) - probs < top_p).sum(-1, keepdim=True)
    return logits.masked_fill_(logits < torch.maximum(kth, ordered.gather(1, kept - 1)), -math.inf)
