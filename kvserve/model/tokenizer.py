"""Tokenizer: built from GGUF metadata or a Hugging Face directory on top of the `tokenizers` library.

Mirrors what transformers builds for the same files, so ids, decoded text and chat prompts match it.
"""
from __future__ import annotations

import json
from array import array
from datetime import datetime
from functools import lru_cache
from pathlib import Path

import numpy as np

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as _Backend

_UNKNOWN, _CONTROL, _USER_DEFINED = 2, 3, 4  # llama.cpp token types (gguf.TokenType)

# Split regexes for `tokenizer.ggml.pre` names whose merges were not learned on GPT-2's split.
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_SPLITS = {name: _LLAMA3 for name in ("llama3", "llama-v3", "llama-bpe", "falcon3", "smaug-bpe", "dbrx")}
_SPLITS.update({name: _QWEN2 for name in ("qwen2", "deepseek-r1-qwen")})


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2's reversible byte -> printable character map used by byte-level BPE vocabularies.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    cs = bs[:]
    extra = [b for b in range(256) if b not in bs]  # unprintable bytes go to chr(256), chr(257), ...
    bs, cs = bs + extra, cs + [256 + n for n in range(len(extra))]
    return {b: chr(c) for b, c in zip(bs, cs)}


_MAX_MERGED_TOKEN = 1024  # characters: each split of a token copies it, so the work is quadratic


def _merges_from_scores(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    # SentencePiece files list no merges: every split of a token into two vocab pieces is a merge, ranked
    # by the score of the token it makes (same order as transformers' `generate_merges`). A 262k vocabulary
    # has ~0.5M merges: they are ranked as arrays of ids and built from the vocabulary's own strings, not
    # as tuples of new slices (~100 MiB less at load).
    vocab, n = {t: i for i, t in enumerate(tokens)}, len(tokens)
    get = vocab.get
    pairs, score_of = array("q"), array("d")  # pair: left id * n + right id, so sorting pairs sorts by (left, right)
    for tok, score in dict(zip(tokens, scores)).items():
        if len(tok) > _MAX_MERGED_TOKEN:  # no real vocabulary has one; a hostile file's would take hours
            continue
        local = sorted(a * n + b for k in range(1, len(tok))
                       if (a := get(tok[:k])) is not None and (b := get(tok[k:])) is not None)
        pairs.extend(local)
        score_of.extend([score] * len(local))
    left, right = np.divmod(np.frombuffer(pairs, dtype=np.int64), n)
    lengths = np.fromiter(map(len, tokens), dtype=np.int64, count=len(tokens))
    # highest score first, then the longer left and right pieces; a stable sort keeps ties in the order found
    order = np.lexsort((-lengths[right], -lengths[left], -np.frombuffer(score_of, dtype=np.float64)))
    return [(tokens[a], tokens[b]) for a, b in zip(left[order].tolist(), right[order].tolist())]


def _byte_level_bpe(tokens, merges, pre) -> tuple[_Backend, dict[str, int]]:
    spell = _bytes_to_unicode()
    alphabet = set(spell.values())
    # A few GGUF writers store tokens as plain text; respell those in the byte alphabet.
    vocab = {t if set(t) <= alphabet else "".join(spell[b] for b in t.encode()): i for i, t in enumerate(tokens)}
    merges = [tuple(m.split(" ", 1)) for m in merges] if merges is not None else \
        _merges_from_scores(list(vocab), [-i for i in range(len(tokens))])
    tk = _Backend(models.BPE(vocab, merges, fuse_unk=False))
    split = _SPLITS.get(pre)
    if split is None:
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # GPT-2's own regex
    else:
        tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tk.decoder = decoders.ByteLevel()
    return tk, vocab


def _sentencepiece_bpe(tokens, merges, scores, unk, add_prefix) -> tuple[_Backend, dict[str, int]]:
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = [tuple(m.split(" ", 1)) for m in merges] if merges is not None else _merges_from_scores(tokens, scores)
    tk = _Backend(models.BPE(vocab, merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    # Spaces are spelled "▁"; "first" prepends one only at the very start, not after special tokens.
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first" if add_prefix else "never",
                                                split=False)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    tk.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if add_prefix else []))
    return tk, vocab


def _token_str(value) -> str | None:
    return value.get("content") if isinstance(value, dict) else value  # AddedToken dicts in tokenizer_config


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message):
    from jinja2.exceptions import TemplateError
    raise TemplateError(message)


@lru_cache(maxsize=16)
def _compile_template(template: str):
    # Same environment as transformers' chat templates, so prompts render byte-identically.
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


class Tokenizer:
    def __init__(self, backend: _Backend, *, bos_token_id=None, eos_token_ids=(), add_bos=False, add_eos=False,
                 chat_template=None, vocab_size=None):
        self._tk = backend
        self.bos_token_id = bos_token_id
        self.eos_token_ids = [i for i in dict.fromkeys(eos_token_ids) if i is not None]
        self.eos_token_id = self.eos_token_ids[0] if self.eos_token_ids else None
        self.add_bos = bool(add_bos) and bos_token_id is not None
        self.add_eos = bool(add_eos) and self.eos_token_id is not None
        self.chat_template = chat_template or None
        self.vocab_size = vocab_size or backend.get_vocab_size(with_added_tokens=True)
        added = backend.get_added_tokens_decoder()
        self.special_ids = {i for i, t in added.items() if t.special}
        self.special_ids |= {i for i in [bos_token_id, *self.eos_token_ids] if i is not None}
        self.bos_token = self.id_to_token(bos_token_id) if bos_token_id is not None else None
        self.eos_token = self.id_to_token(self.eos_token_id) if self.eos_token_id is not None else None
        # Byte-level BPE decodes by joining its tokens' bytes, so after whole characters a token whose
        # bytes are whole characters adds exactly its own text: one dict lookup instead of two decodes.
        self._pieces = {i: None for i in added} if isinstance(backend.decoder, decoders.ByteLevel) else None

    @classmethod
    def from_gguf(cls, reader_or_path) -> Tokenizer:
        from kvserve.model.gguf_file import GGUFFile
        reader = reader_or_path if isinstance(reader_or_path, GGUFFile) else GGUFFile(reader_or_path)

        def get(key, default=None):
            return reader.fields.get(f"tokenizer.{key}", default)

        kind, tokens = get("ggml.model"), get("ggml.tokens")
        types = get("ggml.token_type") or [1] * len(tokens)
        unk = get("ggml.unknown_token_id")
        if kind == "gpt2":
            tk, vocab = _byte_level_bpe(tokens, get("ggml.merges"), get("ggml.pre"))
            # Control tokens outside the byte alphabet are llama.cpp mislabels; adding them would grow the vocab.
            alphabet = set(_bytes_to_unicode().values())
            special = [t for t, ty in zip(tokens, types) if ty == _CONTROL and set(t) <= alphabet]
        elif kind == "llama":
            tk, vocab = _sentencepiece_bpe(tokens, get("ggml.merges"), get("ggml.scores"),
                                           tokens[unk] if unk is not None else None, get("ggml.add_space_prefix", True))
            special = [t for t, ty in zip(tokens, types) if ty in (_CONTROL, _UNKNOWN)]
        else:
            raise ValueError(f"unsupported GGUF tokenizer model {kind!r} (expected 'gpt2' or 'llama')")
        # Added tokens are matched whole before the model sees the text; they reuse their vocab ids.
        tk.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in special])
        tk.add_tokens([AddedToken(t, normalized=False, special=False)
                       for t, ty in zip(tokens, types) if ty == _USER_DEFINED and t in vocab])
        # llama.cpp adds BOS to SentencePiece vocabularies that do not say otherwise.
        return cls(tk, bos_token_id=get("ggml.bos_token_id"),
                   eos_token_ids=[get("ggml.eos_token_id"), get("ggml.eot_token_id"), get("ggml.eom_token_id")],
                   add_bos=get("ggml.add_bos_token", kind == "llama"), add_eos=get("ggml.add_eos_token", False),
                   chat_template=get("chat_template"), vocab_size=len(tokens))

    @classmethod
    def from_dir(cls, path) -> Tokenizer:
        path = Path(path)
        tk = _Backend.from_file(str(path / "tokenizer.json"))
        tk.no_padding(), tk.no_truncation()  # some files enable these; a prompt must come back as is
        cfg = _read_json(path / "tokenizer_config.json")
        gen, model_cfg = _read_json(path / "generation_config.json"), _read_json(path / "config.json")
        bos = tk.token_to_id(_token_str(cfg.get("bos_token")) or "")
        if bos is None:
            bos = gen.get("bos_token_id", model_cfg.get("bos_token_id"))
        eos_ids = [tk.token_to_id(_token_str(cfg.get("eos_token")) or "")]
        for extra in (gen.get("eos_token_id"), model_cfg.get("eos_token_id")):
            eos_ids += extra if isinstance(extra, list) else [extra]
        eos_ids = [i for i in eos_ids if i is not None]
        # An explicit flag wins (transformers rebuilds the post-processor from it); else ask the post-processor.
        probe, bare = tk.encode("a").ids, tk.encode("a", add_special_tokens=False).ids
        added = len(probe) > len(bare)
        add_bos = cfg.get("add_bos_token", added and bos is not None and probe[0] == bos)
        add_eos = cfg.get("add_eos_token", added and bool(eos_ids) and probe[-1] == eos_ids[0])
        template = cfg.get("chat_template")
        if isinstance(template, list):  # named templates: use the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        if (path / "chat_template.jinja").is_file():
            template = (path / "chat_template.jinja").read_text(encoding="utf-8")
        return cls(tk, bos_token_id=bos, eos_token_ids=eos_ids, add_bos=add_bos, add_eos=add_eos,
                   chat_template=template)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        # BOS/EOS are added here rather than by a post-processor so a prompt that already has BOS keeps one.
        ids = self._tk.encode(text, add_special_tokens=False).ids
        if add_special_tokens:
            if self.add_bos and ids[:1] != [self.bos_token_id]:
                ids.insert(0, self.bos_token_id)
            if self.add_eos:
                ids.append(self.eos_token_id)
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tk.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def piece(self, token_id: int) -> str | None:
        """The text token_id adds after whole characters, where that is always its own text; else None."""
        if self._pieces is None:
            return None
        text = self._pieces.get(token_id, False)
        if text is False:
            text = self._tk.decode([token_id], skip_special_tokens=False)
            text = self._pieces[token_id] = text if text and "\ufffd" not in text else None
        return text

    def token_to_id(self, token: str) -> int | None:
        return self._tk.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tk.id_to_token(token_id)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, tokenize: bool = False,
                            continue_final_message: bool = False, **kwargs) -> str | list[int]:
        """continue_final_message (as transformers): the text ends with the last message's content,
        its turn left open, so that the model goes on writing it (no generation prompt then)."""
        if continue_final_message and add_generation_prompt:
            raise ValueError("continue_final_message and add_generation_prompt cannot both be true")
        if not self.chat_template:
            raise ValueError("this model has no chat template; send a plain prompt instead of chat messages")
        msgs = []
        for m in messages:
            content = m.get("content")
            if isinstance(content, list):  # OpenAI-style parts: keep the text ones
                content = "\n".join(p["text"] for p in content if p.get("type") == "text")
            msgs.append({**m, "content": content})
        # transformers passes tools/documents as None and the special tokens by name; kwargs override.
        context = {"tools": None, "documents": None, "bos_token": self.bos_token, "eos_token": self.eos_token,
                   **kwargs}
        text = _compile_template(self.chat_template).render(
            messages=msgs, add_generation_prompt=add_generation_prompt, **context)
        if continue_final_message:
            text = _open_final_message(text, msgs[-1]["content"] if msgs else None)
        # The template writes its own special tokens, so none are added on top.
        return self.encode(text, add_special_tokens=False) if tokenize else text


def _open_final_message(text: str, final: str | None) -> str:
    """text cut right after the final message's content, dropping the end of its turn."""
    core = (final or "").strip()
    at = text.rfind(core) if core else -1
    if at < 0:
        raise ValueError("continue_final_message: the final message's content is not in the rendered chat")
    # the template may have trimmed the message's own leading or trailing blanks
    kept = final.lstrip()
    return text[:at + (len(kept) if text[at:at + len(kept)] == kept else len(core))]


class IncrementalDetokenizer:
    """Streams text for token ids as they come, using vLLM's prefix/read offsets.

    Each call decodes only the ids from `prefix_offset` on: the text of ids[prefix:read] was already
    emitted, and decoding it again alongside the new ids gives the context (leading spaces, partial
    UTF-8 bytes) the new ids need. Text ending in U+FFFD is a character cut mid-way: hold it back.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True, prompt_ids: list[int] | None = None):
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._ids = list(prompt_ids or [])
        # With a prompt, a few of its ids give the first new token its context (e.g. a leading "▁").
        self._read = len(self._ids)
        self._prefix = max(self._read - 5, 0)
        self._parts: list[str] = []

    def add(self, token_ids: list[int]) -> str:
        if len(token_ids) == 1:
            return self.add_token(token_ids[0])
        return self._add(token_ids)

    def add_token(self, token_id: int) -> str:
        """add([token_id]), the engine's call once per sequence and step."""
        ids = self._ids
        if self._read == len(ids):  # nothing held back
            piece = self._tok.piece(token_id)
            if piece is not None:
                ids.append(token_id)
                self._prefix = self._read
                self._read += 1
                self._parts.append(piece)
                return piece
        return self._add([token_id])

    def _add(self, token_ids: list[int]) -> str:
        self._ids.extend(token_ids)
        prefix_text = self._tok.decode(self._ids[self._prefix:self._read], self._skip)
        new_text = self._tok.decode(self._ids[self._prefix:], self._skip)
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return ""
        delta = new_text[len(prefix_text):]
        self._prefix, self._read = self._read, len(self._ids)
        self._parts.append(delta)
        return delta

    def flush(self) -> str:
        """Emit whatever is held back, less a last character cut mid-way (the sequence ended inside
        it): dropped, as vLLM and llama.cpp drop it, rather than sent as U+FFFD."""
        prefix_text = self._tok.decode(self._ids[self._prefix:self._read], self._skip)
        delta = self._tok.decode(self._ids[self._prefix:], self._skip)[len(prefix_text):].rstrip("\ufffd")
        self._prefix, self._read = self._read, len(self._ids)
        if delta:
            self._parts.append(delta)
        return delta

    @property
    def text(self) -> str:
        if len(self._parts) > 1:
            self._parts[:] = ["".join(self._parts)]
        return self._parts[0] if self._parts else ""
