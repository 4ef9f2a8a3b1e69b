"""A request's parameters, state and the outputs the engine streams back."""
import enum
import time
from dataclasses import dataclass, field

from kvserve.attention.policy import FULL, AttentionPolicy, parse_attention
from kvserve.engine.structured import StructuredOutputs


# Below this temperature l/T can overflow float32, and the draw is the argmax anyway (vLLM's threshold).
MIN_TEMPERATURE = 1e-5


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_tokens or the context length
    ABORT = "abort"


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 or 0: off
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None
    seed: int | None = None
    max_tokens: int | None = 16  # None: up to the context length
    min_tokens: int = 0
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False  # keep the matched stop string (or stop_token_ids token's text)
    ignore_eos: bool = False
    logprobs: int | None = None  # number of top alternatives; 0 = only the sampled token's
    # logprobs of the prompt's tokens (the first has none), with this many top alternatives each;
    # such a request skips the prefix cache, whose hits would skip the positions to score (as vLLM)
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    # decode attention: a policy name, "name:key=value,...", a dict or an AttentionPolicy; None: the
    # engine's default (see kvserve.attention.policy)
    attention: AttentionPolicy | str | dict | None = None
    # constrained output: a StructuredOutputs or its fields as a dict (kvserve.engine.structured)
    structured: StructuredOutputs | dict | None = None
    # "cumulative": an output every step (streaming); "final_only": one when the request finishes,
    # which spares a batch's host the per-step outputs (vLLM's RequestOutputKind)
    output_kind: str = "cumulative"
    # prefix-cache isolation: requests share cached pages only when their salts are equal
    cache_salt: str | None = None
    # speculative decoding (when the engine has a proposer): False keeps this request on plain decoding
    speculative: bool = True

    def __post_init__(self):
        if self.structured is not None:
            self.structured = StructuredOutputs.coerce(self.structured)
            if self.ignore_eos or self.min_tokens:  # both would hold back the EOS the grammar ends with
                raise ValueError("structured outputs cannot be combined with ignore_eos or min_tokens")
        if self.attention is not None:
            self.attention = parse_attention(self.attention)
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.output_kind not in ("cumulative", "final_only"):
            raise ValueError(f"output_kind must be 'cumulative' or 'final_only', got {self.output_kind!r}")
        if self.logit_bias:  # keys may come as the OpenAI API's strings of digits
            try:
                self.logit_bias = {int(k): float(v) for k, v in self.logit_bias.items()}
            except (TypeError, ValueError):
                raise ValueError(f"logit_bias maps token ids to numbers, got {self.logit_bias!r:.80}") from None
            if any(not -100 <= v <= 100 for v in self.logit_bias.values()):
                raise ValueError("logit_bias values must be in [-100, 100]")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop strings must be non-empty strings, got {self.stop!r:.80}")
        if any(not _is_int(t) for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be integers, got {self.stop_token_ids!r:.80}")
        _check("n", self.n, int, lambda v: v >= 1, ">= 1")
        _check("temperature", self.temperature, float, lambda v: 0 <= v < float("inf"), ">= 0")
        _check("top_p", self.top_p, float, lambda v: 0 < v <= 1, "in (0, 1]")
        _check("top_k", self.top_k, int, lambda v: v >= -1, "-1 or 0 (off) or >= 1")
        _check("min_p", self.min_p, float, lambda v: 0 <= v <= 1, "in [0, 1]")
        _check("repetition_penalty", self.repetition_penalty, float, lambda v: 0 < v < float("inf"), "> 0")
        _check("presence_penalty", self.presence_penalty, float, lambda v: -2 <= v <= 2, "in [-2, 2]")
        _check("frequency_penalty", self.frequency_penalty, float, lambda v: -2 <= v <= 2, "in [-2, 2]")
        if self.max_tokens is not None:
            _check("max_tokens", self.max_tokens, int, lambda v: v >= 1, ">= 1")
        _check("min_tokens", self.min_tokens, int, lambda v: 0 <= v <= (self.max_tokens or v), "in [0, max_tokens]")
        for name in ("logprobs", "prompt_logprobs"):
            if getattr(self, name) is not None:
                _check(name, getattr(self, name), int, lambda v: v >= 0, ">= 0")
        if self.seed is not None:
            _check("seed", self.seed, int, lambda v: -2**63 <= v < 2**63, "in [-2**63, 2**63)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    @property
    def argmax_only(self) -> bool:
        """A row's token is the argmax of its raw logits: nothing to process, nothing drawn."""
        return self.plain and (self.greedy or self.temperature < MIN_TEMPERATURE)

    @property
    def plain(self) -> bool:
        """No logit processing before sampling: no bias, penalty, min_tokens or logprobs."""
        return self.unprocessed and self.logprobs is None

    @property
    def unprocessed(self) -> bool:
        """The logits are sampled as they are: no bias, penalty or min_tokens (logprobs may be read)."""
        return (not self.logit_bias and not self.min_tokens and self.repetition_penalty == 1
                and not self.presence_penalty and not self.frequency_penalty)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check(name: str, value, kind: type, ok, what: str) -> None:
    """A SamplingParams field: of its kind (an int where a float may be), and ok(value)."""
    fits = _is_int(value) or (kind is float and isinstance(value, float))
    if not fits or not ok(value):
        raise ValueError(f"{name} must be {'an integer' if kind is int else 'a number'} {what}, got {value!r}")


class SequenceStatus(str, enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Logprob:
    token_id: int
    logprob: float
    top_logprobs: list[tuple[int, float]]


class Sequence:
    """One generated continuation. Its `num_computed_tokens` catches up with `len(token_ids)`:
    one rule for prefill, chunked prefill, prefix hits, decode and recompute after preemption."""

    def __init__(self, seq_id: int, request_id: str, index: int, prompt_token_ids: list[int],
                 params: SamplingParams, arrival: float, priority: int = 0):
        self.seq_id = seq_id
        self.request_id = request_id
        self.index = index  # which of the request's n choices
        self.params = params
        self.token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0  # prompt tokens served by the prefix cache
        self.tables: list[list[int]] = [[]]  # one page table per KV group (kvserve/kv/groups.py)
        self.released_until = [0]  # per group: logical pages below this were checked for release
        self.page_hashes: list[bytes] = []  # keys of the full pages published to the prefix cache
        self.page_keys: list[bytes] = []  # keys of full pages computed so far (kv/page_keys.py)
        self.cache_salt = params.cache_salt
        self.status = SequenceStatus.WAITING
        self.arrival = arrival
        self.first_scheduled: float | None = None  # when first admitted to the running batch
        self.priority = priority
        self.finish_reason: FinishReason | None = None
        self.stop_reason: str | int | None = None
        self.text = ""
        self.logprobs: list[Logprob] = []
        self.prompt_logprobs: list[Logprob] = []  # of prompt tokens 1, 2, ... (kvserve.engine.prompt_logprobs)
        self.generator = None
        self.detokenizer = None
        self.attn_state = None  # per-request state of a sparse attention policy (MagicPIG's tables)
        self.offload = None  # OffloadPages: its K/V in MagicPIG's offload pools (kvserve/kv/offload_pools.py)
        self.draft_token_ids: list[int] = []  # proposed this step, verified by its k + 1 rows
        self.spec = None  # speculation state (kvserve.engine.spec.speculator.SpecState)
        self.grammar = None  # xgrammar matcher of a structured request: it has accepted every output token
        self.argmax_only = params.argmax_only  # read by every step's sampling: the params do not change
        # overlapped steps (kvserve/engine/overlap.py): tokens sampled on the device, not appended yet,
        # and the row of the newest in its step's tensor of ids (the next step's input)
        self.num_pending = 0
        self.pending_row = -1

    @property
    def pages(self) -> list[int]:
        """The page table of KV group 0: a plain model's only one."""
        return self.tables[0]

    @pages.setter
    def pages(self, pages: list[int]) -> None:
        self.tables[0] = pages

    @property
    def policy(self) -> AttentionPolicy:
        return self.params.attention or FULL

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_uncomputed(self) -> int:
        return len(self.token_ids) + self.num_pending - self.num_computed_tokens

    @property
    def finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    @property
    def scores_prompt(self) -> bool:
        """Prompt logprobs asked for and not all computed yet."""
        return self.params.prompt_logprobs is not None and len(self.prompt_logprobs) < self.num_prompt_tokens - 1


@dataclass(slots=True)
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    logprobs: list[Logprob] | None = None

    @property
    def cumulative_logprob(self) -> float | None:
        return sum(lp.logprob for lp in self.logprobs) if self.logprobs else None


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0
    metrics: dict = field(default_factory=dict)
    error: str | None = None  # set when this request failed inside the engine; it is finished
    # with SamplingParams.prompt_logprobs: one per prompt token, None for the first (nothing predicts it)
    prompt_logprobs: list[Logprob | None] | None = None


def now() -> float:
    return time.monotonic()
