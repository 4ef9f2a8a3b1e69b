"""Verification of drafted tokens against the target's logits.

Every proposer here drafts deterministically (a lookup or an argmax), so the draft distribution q
is one-hot and rejection sampling (accept with min(1, p/q), else draw from max(0, p - q)
normalised) becomes: accept draft token d with probability p(d), else draw from p with d removed.
The output then has exactly the target's distribution. p is what the sampler would draw from at
that position (bias, min_tokens, penalties over the tokens before it, temperature, top-k/top-p/
min-p), computed with the sampler's own functions. Greedy rows accept while d is the argmax.
"""
import torch

from kvserve.engine.sampler import SampledToken, SamplingRow, draw, process, random_rows, truncated, uniforms


def verify(logits: torch.Tensor, seqs: list, eos_token_ids: list[int]) -> list[list[SampledToken]]:
    """logits: len(seq.draft_token_ids) + 1 rows per sequence, in order. Returns each sequence's
    tokens: the accepted drafts, then the target's correction or bonus token."""
    rows, starts = [], []
    for seq in seqs:
        starts.append(len(rows))
        draft, plain = seq.draft_token_ids, seq.params.plain
        for j in range(len(draft) + 1):
            # penalties and min_tokens read the tokens before the row: the drafts up to it
            ids = seq.token_ids if plain or j == 0 else seq.token_ids + draft[:j]
            rows.append(SamplingRow(seq.params, ids, seq.num_prompt_tokens, seq.generator, eos_token_ids))
    processed = logits.float() if all(r.params.plain for r in rows) else process(logits, rows)
    argmax = processed.argmax(-1).tolist()
    rand = random_rows(rows)
    probs = truncated(processed[rand], [rows[i].params for i in rand]).softmax(-1) if rand else None
    prob_row = {r: i for i, r in enumerate(rand)}
    out = []
    for seq, start in zip(seqs, starts):
        draft, g = seq.draft_token_ids, seq.generator
        tokens = []
        for j in range(len(draft) + 1):
            r = start + j
            if r not in prob_row:  # greedy
                tokens.append(argmax[r])
                if j < len(draft) and argmax[r] == draft[j]:
                    continue
                break
            p = probs[prob_row[r]]
            if j < len(draft):
                d = draft[j]
                if float(uniforms([g])) < float(p[d]):
                    tokens.append(d)
                    continue
                p = p.clone()
                p[d] = 0  # the residual max(0, p - one_hot(d)); p(d) < 1 here, so it has mass
            tokens.append(int(draw(p.unsqueeze(0), uniforms([g]).to(p.device))))
            break
        out.append(tokens)
    return [_with_logprobs(seq, start, tokens, processed) for seq, start, tokens in zip(seqs, starts, out)]


def _with_logprobs(seq, start: int, tokens: list[int], processed: torch.Tensor) -> list[SampledToken]:
    """As the sampler: logprobs of the processed logits, before temperature and truncation."""
    k = seq.params.logprobs
    if k is None:
        return [SampledToken(t, None, None) for t in tokens]
    lp = processed[start:start + len(tokens)].log_softmax(-1)
    chosen = lp.gather(1, torch.tensor(tokens, device=lp.device).unsqueeze(1)).squeeze(1).tolist()
    vals, ids = lp.topk(min(k, lp.shape[1]), dim=-1) if k else (None, None)
    return [SampledToken(t, c, list(zip(ids[j].tolist(), vals[j].tolist())) if k else [])
            for j, (t, c) in enumerate(zip(tokens, chosen))]
