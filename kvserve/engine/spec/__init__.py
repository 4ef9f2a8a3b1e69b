"""Speculative decoding: a proposer guesses a sequence's next k tokens, the target model runs them
as k+1 query rows of one step (a chunk, as in chunked prefill), and `verify` keeps the longest
prefix the target agrees with plus one token of its own, so outputs keep the target's distribution.

- `ngram.py`: prompt lookup (the tokens that followed the latest earlier occurrence of the suffix)
- `self_draft.py`: TriForce-style self speculation: the target itself over a streaming view of its KV
- `draft_model.py`: a smaller model with the same vocabulary and its own KV pool
- `verify.py`: greedy matching and rejection sampling over the sampler's processed distribution
- `speculator.py`: which sequences speculate this step (batch size, acceptance), and the counters
"""
