"""Engine logprobs (token ids) as OpenAI shows them: token strings, their UTF-8 bytes, offsets.

A token can be part of a character (byte-level BPE splits UTF-8), so its text alone may not
decode; OpenAI gives the raw `bytes` beside it, and so does this, read from the vocabulary itself.
"""
import re

from kvserve.engine.request import Logprob
from kvserve.server.protocol import CompletionLogprobs, TokenLogprob, TopLogprob

_FLOOR = -9999.0  # OpenAI's stand-in for an impossible token; JSON has no -inf
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _gpt2_unicode_to_byte() -> dict[str, int]:
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table, extra = {chr(b): b for b in printable}, 0
    for b in range(256):
        if b not in printable:
            table[chr(256 + extra)] = b
            extra += 1
    return table


class TokenStrings:
    """Text and bytes of single tokens, memoized (a vocabulary is small, requests are many)."""

    def __init__(self, tokenizer):
        self._tok = tokenizer
        self._byte_of = _gpt2_unicode_to_byte()
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def get(self, token_id: int) -> tuple[str, list[int]]:
        hit = self._cache.get(token_id)
        if hit is None:
            raw = self._bytes(token_id)
            hit = self._cache[token_id] = (raw.decode("utf-8", "replace"), list(raw))
        return hit

    def text(self, token_id: int) -> str:
        return self.get(token_id)[0]

    def _bytes(self, token_id: int) -> bytes:
        piece = self._tok.id_to_token(token_id)
        if piece is None:
            return self._tok.decode([token_id], skip_special_tokens=False).encode()
        if all(c in self._byte_of for c in piece):  # byte-level BPE spelling
            return bytes(self._byte_of[c] for c in piece)
        if m := _BYTE_PIECE.fullmatch(piece):  # SentencePiece byte fallback
            return bytes([int(m.group(1), 16)])
        return piece.replace("\u2581", " ").encode()


def _finite(lp: float) -> float:
    return lp if lp > _FLOOR else _FLOOR  # also maps NaN to the floor


def chat_logprobs(strings: TokenStrings, entries: list[Logprob]) -> list[TokenLogprob]:
    out = []
    for e in entries:
        text, raw = strings.get(e.token_id)
        tops = [TopLogprob(token=strings.text(t), logprob=_finite(lp), bytes=strings.get(t)[1])
                for t, lp in e.top_logprobs]
        out.append(TokenLogprob(token=text, logprob=_finite(e.logprob), bytes=raw, top_logprobs=tops))
    return out


def completion_logprobs(strings: TokenStrings, entries: list[Logprob], offset: int) -> CompletionLogprobs:
    """`offset`: where the first token's text starts in the choice's text (after an echoed prompt)."""
    tokens, lps, tops, offsets = [], [], [], []
    for e in entries:
        text = strings.text(e.token_id)
        tokens.append(text)
        lps.append(_finite(e.logprob))
        top: dict[str, float] = {}
        for t, lp in e.top_logprobs:
            top.setdefault(strings.text(t), _finite(lp))
        tops.append(top)
        offsets.append(offset)
        offset += len(text)
    return CompletionLogprobs(tokens=tokens, token_logprobs=lps, top_logprobs=tops, text_offset=offsets)


def echo_logprobs(strings: TokenStrings, prompt_ids: list[int], entries: list[Logprob | None]) -> CompletionLogprobs:
    """The echoed prompt's part of a completion's logprobs (SamplingParams.prompt_logprobs): its first
    token has null logprob and top_logprobs, as OpenAI's and vLLM's; offsets from 0."""
    text = strings.text(prompt_ids[0])
    first = CompletionLogprobs(tokens=[text], token_logprobs=[None], top_logprobs=[None], text_offset=[0])
    return joined(first, completion_logprobs(strings, entries[1:], len(text)))


def joined(a: CompletionLogprobs, b: CompletionLogprobs) -> CompletionLogprobs:
    return CompletionLogprobs(tokens=a.tokens + b.tokens, token_logprobs=a.token_logprobs + b.token_logprobs,
                              top_logprobs=a.top_logprobs + b.top_logprobs, text_offset=a.text_offset + b.text_offset)
