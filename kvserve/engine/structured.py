"""Structured outputs: a request's output constrained to a JSON schema, any JSON object, a regex,
a choice among strings or an EBNF grammar, enforced token by token with xgrammar.

A spec is compiled once per (spec, tokenizer) into a bounded LRU cache; each constrained sequence
holds its own matcher, which advances on every token appended to it. Each step the matchers fill
a bitmask of allowed tokens (CPU) that is applied to those rows' logits before sampling; EOS is
allowed only where the grammar can end.
"""
from __future__ import annotations

import atexit
import json
import re
import threading
import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from kvserve.engine.json_schema import for_xgrammar
from kvserve.native.token_bitmask import apply_token_bitmask

DEFAULT_COMPILE_TIMEOUT_S = 5.0
_KINDS = ("json", "json_object", "regex", "choice", "grammar")


@dataclass(frozen=True)
class StructuredOutputs:
    """Exactly one of the constraints (vLLM's StructuredOutputsParams, minus backends)."""
    json: dict | str | None = None  # a JSON schema (dict or its JSON text)
    json_object: bool = False  # any JSON object
    regex: str | None = None
    choice: tuple[str, ...] | list[str] | None = None
    grammar: str | None = None  # EBNF, xgrammar/GBNF dialect, start rule `root`
    any_whitespace: bool = False  # JSON: compact separators unless True (small models loop on blanks)
    _key: str = field(default="", init=False, repr=False, compare=False)

    def __post_init__(self):
        given = [k for k in _KINDS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise ValueError(f"structured outputs take exactly one of {', '.join(_KINDS)}; got "
                             f"{', '.join(given) or 'none'}")
        if self.json is not None and not isinstance(self.json, (dict, str)):
            raise ValueError("structured json must be a JSON schema (an object or its JSON text)")
        if isinstance(self.json, str):
            try:
                object.__setattr__(self, "json", json.loads(self.json))
            except json.JSONDecodeError as e:
                raise ValueError(f"structured json is not valid JSON: {e}") from None
            if not isinstance(self.json, dict):
                raise ValueError("a JSON schema must be a JSON object")
        if self.regex is not None and not isinstance(self.regex, str):
            raise ValueError("structured regex must be a string")
        if self.grammar is not None and (not isinstance(self.grammar, str) or not self.grammar.strip()):
            raise ValueError("structured grammar must be a non-empty EBNF string")
        if self.choice is not None:
            if isinstance(self.choice, str) or not self.choice or not all(isinstance(c, str) for c in self.choice):
                raise ValueError("structured choice must be a non-empty list of strings")
            object.__setattr__(self, "choice", tuple(self.choice))
        spec = {k: getattr(self, k) for k in _KINDS} | {"ws": self.any_whitespace}
        object.__setattr__(self, "_key", json.dumps(spec, sort_keys=True, separators=(",", ":")))

    @classmethod
    def coerce(cls, value) -> StructuredOutputs:
        if isinstance(value, cls):
            return value
        if isinstance(value, dict):
            try:
                return cls(**value)
            except TypeError as e:  # an unknown key
                raise ValueError(f"structured outputs: {e}") from None
        raise ValueError(f"structured must be StructuredOutputs or a dict, got {type(value).__name__}")

    @property
    def kind(self) -> str:
        return next(k for k in _KINDS if getattr(self, k) not in (None, False))

    @property
    def key(self) -> str:
        return self._key


# ---- the vocabulary as raw bytes --------------------------------------------------------------

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def encoded_vocab(tokenizer, vocab_size: int) -> list[bytes]:
    """The bytes each token id stands for, `vocab_size` long (the model's logits width). Special
    tokens and ids the tokenizer lacks are b"": xgrammar never allows those (stop tokens aside)."""
    pieces = tokenizer._tk.get_vocab(with_added_tokens=True)
    from kvserve.model.tokenizer import _bytes_to_unicode
    alphabet = {c: b for b, c in _bytes_to_unicode().items()}  # byte-level BPE's character -> byte
    # decided for the whole vocabulary: "é" is byte 0xE9 in a byte-level one, two UTF-8 bytes elsewhere
    byte_fallback = sum(f"<0x{b:02X}>" in pieces for b in range(256)) >= 128
    byte_level = not byte_fallback and sum(c in pieces for c in alphabet) >= 128
    special = tokenizer.special_ids
    out = [b""] * vocab_size
    for piece, i in pieces.items():
        if i >= vocab_size or i in special:
            continue
        if byte_level and all(c in alphabet for c in piece):
            out[i] = bytes(alphabet[c] for c in piece)
        elif byte_fallback and (m := _BYTE_PIECE.fullmatch(piece)):
            out[i] = bytes([int(m.group(1), 16)])
        else:
            out[i] = piece.replace("\u2581", " ").encode()
    return out


# ---- compiling ------------------------------------------------------------------------------

def _ebnf_literal(s: str) -> str:
    # JSON string escapes are the EBNF parser's escapes (\" \\ \n \uXXXX)
    return json.dumps(s, ensure_ascii=True)


def _parser_message(e: Exception) -> str:
    """xgrammar's message without its '[time] /path/file.cc:123: ' prefix."""
    return re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", str(e).strip()) or type(e).__name__


_RUNNING: set[threading.Event] = set()


@atexit.register
def _wait_for_compiles(limit_s: float = 60.0) -> None:
    # a compile still running in C++ when the interpreter exits aborts the process
    deadline = time.monotonic() + limit_s
    for done in list(_RUNNING):
        done.wait(max(0.0, deadline - time.monotonic()))


class _Pending:
    """One compile running on its own thread; later requests for the same spec wait on it."""

    def __init__(self, fn, on_done=None):
        self.done = threading.Event()
        self.result = self.error = None
        _RUNNING.add(self.done)
        threading.Thread(target=self._run, args=(fn, on_done), name="kvserve-grammar", daemon=True).start()

    def _run(self, fn, on_done):
        try:
            self.result = fn()
        except Exception as e:  # noqa: BLE001 - handed to the waiter
            self.error = e
        if on_done is not None:  # even when every waiter gave up: the result is cached, the slot freed
            on_done(self)
        self.done.set()
        _RUNNING.discard(self.done)


class GrammarCache:
    """Compiled grammars of one tokenizer, LRU-bounded; thread-safe (the server compiles ahead on
    its own threads, the engine looks them up). A compile runs on a thread of its own so a
    pathological grammar is refused after `timeout_s` instead of holding the caller."""

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: list[int], capacity: int = 256,
                 timeout_s: float = DEFAULT_COMPILE_TIMEOUT_S, max_pending: int = 8):
        self.tokenizer, self.vocab_size, self.eos_token_ids = tokenizer, vocab_size, list(eos_token_ids)
        self.capacity, self.timeout_s, self.max_pending = capacity, timeout_s, max_pending
        self._cache: OrderedDict[str, object] = OrderedDict()
        self._pending: dict[str, _Pending] = {}
        self._lock = threading.Lock()
        self._compiler = None
        self._json_safe = None
        self.compiles = 0  # compiles started: tests count cache hits with it
        self.compile_seconds = 0.0

    def compiler(self):
        with self._lock:
            if self._compiler is None:
                self._compiler = _compiler_for(self.tokenizer, self.vocab_size, tuple(self.eos_token_ids))
            return self._compiler

    def warm_up(self) -> None:
        """Imports xgrammar and builds the vocabulary's compiler on a thread (seconds), so that
        the first structured request does not wait for it."""
        _Pending(lambda: (self.compiler(), self.json_safe()))

    def compile(self, spec: StructuredOutputs):
        """The compiled grammar of spec; ValueError with the parser's message if it does not
        compile, or if compiling takes longer than the time limit."""
        key = spec.key
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
            pending = self._pending.get(key)
            if pending is None:
                if len(self._pending) >= self.max_pending:
                    raise ValueError("too many grammars are compiling; try again later")
                compiler = self._compiler
        if pending is None:
            compiler = compiler or self.compiler()
            with self._lock:
                pending = self._pending.get(key)
                if pending is None:
                    self.compiles += 1
                    pending = self._pending[key] = _Pending(lambda: self._timed(compiler, spec),
                                                            lambda done: self._settle(key, done))
        if not pending.done.wait(self.timeout_s):
            raise ValueError(f"compiling the {spec.kind} grammar took longer than {self.timeout_s:g} s")
        if pending.error is not None:
            raise ValueError(f"invalid {spec.kind} for structured output: {_parser_message(pending.error)}") \
                from None
        return pending.result

    def _settle(self, key: str, pending: _Pending) -> None:
        with self._lock:
            if self._pending.get(key) is pending:
                del self._pending[key]
            if pending.error is None:
                self._cache[key] = pending.result
                while len(self._cache) > self.capacity:
                    self._cache.popitem(last=False)

    def _timed(self, compiler, spec):
        start = time.perf_counter()
        try:
            return _compile(compiler, spec)
        finally:
            self.compile_seconds += time.perf_counter() - start

    def matcher(self, spec: StructuredOutputs) -> Constraint:
        import xgrammar as xgr
        compiled = self.compile(spec)
        strict = spec.kind in ("json", "json_object") and not spec.any_whitespace
        return Constraint(xgr.GrammarMatcher(compiled, override_stop_tokens=self.eos_token_ids), strict)

    def json_safe(self) -> torch.Tensor:
        """Bitmask row of the tokens that cannot break strict JSON inside a string: none with a
        control byte (< 0x20), none ending in a lone 0xED (xgrammar then lets a UTF-16 surrogate's
        bytes through, which is not UTF-8)."""
        if self._json_safe is None:
            vocab = _vocab_for(self.tokenizer, self.vocab_size)
            ok = torch.tensor([not any(b < 0x20 for b in p) and not _ends_in_lone_ed(p) for p in vocab] +
                              [False] * (-len(vocab) % 32), dtype=torch.int64).view(-1, 32)
            packed = (ok << torch.arange(32, dtype=torch.int64)).sum(-1)
            self._json_safe = torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)
        return self._json_safe


def _ends_in_lone_ed(piece: bytes) -> bool:
    return piece.endswith(b"\xed")  # 0xED is never a continuation byte: a 3-byte character begins


class Constraint:
    """A sequence's matcher. `strict_json`: compact JSON, where a raw control character could only
    sit inside a string, which JSON forbids but xgrammar lets through: GrammarCache.json_safe."""
    __slots__ = ("matcher", "strict_json")

    def __init__(self, matcher, strict_json: bool):
        self.matcher, self.strict_json = matcher, strict_json

    def accept_token(self, token_id: int) -> bool:
        return self.matcher.accept_token(token_id)

    def fork(self) -> Constraint:
        return Constraint(self.matcher.fork(), self.strict_json)

    def is_terminated(self) -> bool:
        return self.matcher.is_terminated()


_VOCABS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_COMPILERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_SHARED_LOCK = threading.Lock()


def _vocab_for(tokenizer, vocab_size: int) -> list[bytes]:
    # engines of one tokenizer (tests make many) share its vocabulary and compiler: building them
    # costs ~100 ms of Python
    with _SHARED_LOCK:
        per = _VOCABS.setdefault(tokenizer, {})
        if vocab_size not in per:
            per[vocab_size] = encoded_vocab(tokenizer, vocab_size)
        return per[vocab_size]


def _compiler_for(tokenizer, vocab_size: int, eos: tuple[int, ...]):
    import xgrammar as xgr
    vocab = _vocab_for(tokenizer, vocab_size)
    with _SHARED_LOCK:
        per = _COMPILERS.setdefault(tokenizer, {})
        if (vocab_size, eos) not in per:
            info = xgr.TokenizerInfo(vocab, xgr.VocabType.RAW, vocab_size=vocab_size, stop_token_ids=list(eos))
            # GrammarCache's LRU holds compiled grammars; xgrammar's cache would be a second, unbounded one
            per[vocab_size, eos] = xgr.GrammarCompiler(info, max_threads=2, cache_enabled=False)
        return per[vocab_size, eos]


def _compile(compiler, spec: StructuredOutputs):
    separators = None if spec.any_whitespace else (", ", ": ")
    if spec.json is not None:
        return compiler.compile_json_schema(json.dumps(for_xgrammar(spec.json)),
                                            any_whitespace=spec.any_whitespace, separators=separators)
    if spec.json_object:
        return compiler.compile_json_schema('{"type": "object"}', any_whitespace=spec.any_whitespace,
                                            separators=separators, strict_mode=False)
    if spec.regex is not None:
        return compiler.compile_regex(spec.regex)
    if spec.choice is not None:
        return compiler.compile_grammar("root ::= " + " | ".join(_ebnf_literal(c) for c in spec.choice))
    return compiler.compile_grammar(spec.grammar)


# ---- each step ------------------------------------------------------------------------------

class BitmaskApplier:
    """Fills the bitmasks of a step's constrained rows and sets their disallowed logits to -inf.

    `fill_ahead` fills the masks of the sequences a step will sample on a worker thread while the
    model runs (a matcher only changes when a token is appended, after sampling); `apply` then
    fills only what was not known ahead (children forked this step) and masks with the C kernel
    (native/token_bitmask.c), which reads the rows where the worker left them and ANDs strict
    JSON's json_safe row in as it goes. The worker does nothing but xgrammar's fills: a torch op
    there would start a second OpenMP team on the cores the forward is using."""

    def __init__(self, vocab_size: int, json_safe=None):
        self.vocab_size = vocab_size
        self.json_safe = json_safe  # () -> the bitmask row of GrammarCache.json_safe
        self._ahead_buffer = self._late_buffer = None
        self._worker = None
        self._ahead = None  # future of (constraint id -> row, bitmask) filled during the forward

    def _buffer(self, name: str, rows: int) -> torch.Tensor:
        # uninitialised is fine: xgrammar writes every word of the rows it fills
        buf = getattr(self, name)
        if buf is None or buf.shape[0] < rows:
            buf = torch.empty(max(rows, 8, 0 if buf is None else 2 * buf.shape[0]), -(-self.vocab_size // 32),
                              dtype=torch.int32)
            setattr(self, name, buf)
        return buf

    def fill_ahead(self, constraints: list[Constraint]) -> None:
        if self._ahead is not None:
            self._ahead.result()  # a step that sampled nothing constrained: its fill is dropped
            self._ahead = None
        if not constraints:
            return
        if self._worker is None:
            from concurrent.futures import ThreadPoolExecutor
            self._worker = ThreadPoolExecutor(1, thread_name_prefix="kvserve-bitmask")
        self._ahead = self._worker.submit(self._fill, constraints, self._buffer("_ahead_buffer", len(constraints)))

    def _fill(self, constraints: list[Constraint], bitmask: torch.Tensor):
        for i, c in enumerate(constraints):
            c.matcher.fill_next_token_bitmask(bitmask, i)
        if self.json_safe is not None and any(c.strict_json for c in constraints):
            self.json_safe()  # built once, here rather than in the step
        return {id(c): i for i, c in enumerate(constraints)}, bitmask

    def apply(self, logits: torch.Tensor, rows: list[int], constraints: list[Constraint]) -> None:
        """Masks logits[rows[i]] by constraints[i], in place."""
        known, ahead = self._ahead.result() if self._ahead is not None else ({}, None)
        self._ahead = None
        at = [known.get(id(c)) for c in constraints]
        late = [k for k, i in enumerate(at) if i is None]
        if late:
            buf = self._buffer("_late_buffer", len(late))
            for j, k in enumerate(late):
                constraints[k].matcher.fill_next_token_bitmask(buf, j)
        width = min(self.vocab_size, logits.shape[1])
        for bitmask, picked, mask_rows in ((ahead, [k for k, i in enumerate(at) if i is not None],
                                            [i for i in at if i is not None]),
                                           (self._late_buffer, late, list(range(len(late))))):
            if picked:
                self._mask(logits, bitmask, [rows[k] for k in picked], mask_rows,
                           [constraints[k].strict_json for k in picked], width)
        if logits.shape[1] > width:  # logits wider than the vocabulary: padding ids are never allowed
            logits[rows, width:] = float("-inf")

    def _mask(self, logits, bitmask, rows: list[int], mask_rows: list[int], strict: list[bool], width: int) -> None:
        safe = self.json_safe() if self.json_safe is not None and any(strict) else None
        if apply_token_bitmask(logits, bitmask, rows, width, mask_rows, safe, strict):
            return  # CPU float32: ~40x xgrammar's kernel below
        import xgrammar as xgr
        full = torch.full((logits.shape[0], bitmask.shape[1]), -1, dtype=torch.int32)
        full[rows] = bitmask[mask_rows]  # xgrammar's kernel takes bitmask row r for logits row r
        if safe is not None:
            full[[r for r, s in zip(rows, strict) if s]] &= safe
        if logits.device.type == "cpu" and logits.dtype == torch.float32 and logits.is_contiguous():
            xgr.apply_token_bitmask_inplace(logits, full, vocab_size=width, indices=rows)
        else:  # unpack the bits with torch: any device, any dtype
            bits = full[rows].to(logits.device, non_blocking=True)
            shifts = torch.arange(32, device=logits.device, dtype=torch.int32)
            allowed = ((bits.unsqueeze(-1) >> shifts) & 1).view(len(rows), -1)[:, :width].bool()
            index = torch.tensor(rows, device=logits.device)
            logits[index, :width] = logits[index, :width].masked_fill(~allowed, float("-inf"))
