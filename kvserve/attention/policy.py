"""Per-request attention policies for decode steps: what each decode token attends to.

A policy comes as a name (`"magicpig"`), a name with parameters (`"magicpig:K=8,L=100"`, handy on a
command line) or an object (`{"policy": "magicpig", "K": 10, "L": 150}`); prefill is always full."""
import json
from dataclasses import dataclass, field, fields

POLICIES = ("full", "streaming", "magicpig", "topk")
# streaming keeps StreamingLLM's 4 + 1020 cache; magicpig/topk densely attend MagicPIG's 4 + 64
DEFAULT_WINDOW = {"full": 0, "streaming": 1020, "magicpig": 64, "topk": 64}
# topk's default budget as a share of the sampled keys: about what magicpig picks at K=10, L=150
TOPK_DEFAULT_FRACTION = 0.02


def _flag(value) -> bool:
    """offload=true / 1 / false / 0 (the key=value form gives strings and ints)."""
    if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no"):
        return value.lower() in ("true", "yes")
    if value in (0, 1):  # True and False too
        return bool(value)
    raise ValueError(f"attention offload must be true or false, got {value!r}")


@dataclass(frozen=True)
class AttentionPolicy:
    policy: str = "full"
    sink: int = 4
    window: int | None = None  # None: DEFAULT_WINDOW of the policy
    K: int = 10  # magicpig: bits per hash table
    L: int = 150  # magicpig: hash tables
    k: int | None = None  # topk: keys kept per query head; None: TOPK_DEFAULT_FRACTION of them
    dense_layers: tuple[int, ...] = field(default=(0,))  # magicpig/topk: layers kept full
    seed: int = 0  # magicpig: seed of the hash projections
    offload: bool = False  # magicpig: sampled layers' K/V in CPU memory, their attention by the CPU (offload.py)
    # magicpig: a sampled layer whose keys would carry less than this share of its first decode's attention
    # (expected, from their inclusion probabilities) attends densely for the request: LSH does not tell
    # that layer's keys apart (Gemma 3's global layers at K=10: 0.02-0.07; SmolLM2's layers 0.13-0.89)
    min_coverage: float = 0.1

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise ValueError(f"attention policy must be one of {', '.join(POLICIES)}, got {self.policy!r}")
        if self.window is None:
            object.__setattr__(self, "window", DEFAULT_WINDOW[self.policy])
        object.__setattr__(self, "dense_layers", tuple(self.dense_layers))
        object.__setattr__(self, "offload", _flag(self.offload))
        try:
            object.__setattr__(self, "min_coverage", float(self.min_coverage))
        except (TypeError, ValueError):
            raise ValueError(f"attention min_coverage must be a number in [0, 1], got {self.min_coverage!r}") from None
        if not 0 <= self.min_coverage <= 1:
            raise ValueError(f"attention min_coverage must be a number in [0, 1], got {self.min_coverage!r}")
        if self.offload and self.policy != "magicpig":
            raise ValueError(f"attention offload is for magicpig, not {self.policy}")
        for name in ("sink", "window"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"attention {name} must be an integer >= 0, got {getattr(self, name)!r}")
        if self.policy == "streaming" and self.sink + self.window < 1:
            raise ValueError("streaming attention needs sink + window >= 1")
        if not isinstance(self.K, int) or not 1 <= self.K <= 15:
            raise ValueError(f"attention K must be an integer in [1, 15], got {self.K!r}")
        if not isinstance(self.L, int) or not 1 <= self.L <= 4096:
            raise ValueError(f"attention L must be an integer in [1, 4096], got {self.L!r}")
        if self.k is not None and (not isinstance(self.k, int) or self.k < 1):
            raise ValueError(f"attention k must be an integer >= 1, got {self.k!r}")
        if any(not isinstance(i, int) or i < 0 for i in self.dense_layers):
            raise ValueError(f"attention dense_layers must be layer indices, got {self.dense_layers!r}")

    @property
    def is_full(self) -> bool:
        return self.policy == "full"

    @property
    def label(self) -> str:
        """The policy's name in reports: magicpig+offload for the CPU-GPU split."""
        return self.policy + ("+offload" if self.offload else "")

    @property
    def unbounded(self) -> bool:
        """A request under this policy may run past the model's context length."""
        return self.policy == "streaming"


FULL = AttentionPolicy()
_FIELDS = {f.name: f.type for f in fields(AttentionPolicy)}


def parse_attention(value) -> AttentionPolicy:
    """A policy from a name, "name:key=value,...", a JSON object string, a dict or a policy;
    raises ValueError on anything else."""
    if value is None:
        return FULL
    if isinstance(value, AttentionPolicy):
        return value
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("{"):
            try:
                value = json.loads(text)
            except json.JSONDecodeError as e:
                raise ValueError(f"attention is not valid JSON: {e}") from None
        else:
            name, _, rest = text.partition(":")
            value = {"policy": name.strip()}
            for item in filter(None, (s.strip() for s in rest.split(","))):
                key, eq, raw = item.partition("=")
                if not eq:
                    raise ValueError(f"attention parameter {item!r} is not key=value")
                value[key.strip()] = _number_or_list(raw.strip())
    if not isinstance(value, dict):
        raise ValueError(f"attention must be a policy name or an object, got {type(value).__name__}")
    unknown = set(value) - set(_FIELDS)
    if unknown:
        raise ValueError(f"unknown attention parameters: {', '.join(sorted(unknown))} "
                         f"(known: {', '.join(_FIELDS)})")
    if "policy" not in value:
        raise ValueError("attention object needs a 'policy'")
    if isinstance(value.get("dense_layers"), int):
        value = value | {"dense_layers": (value["dense_layers"],)}
    if isinstance(value.get("dense_layers"), (list, tuple)):
        value = value | {"dense_layers": tuple(value["dense_layers"])}
    elif "dense_layers" in value:
        raise ValueError("attention dense_layers must be a list of layer indices")
    return AttentionPolicy(**value)


def _number_or_list(raw: str):
    """"8" -> 8, "0;16" -> (0, 16) (a list inside the comma-separated form), else the string."""
    parts = raw.split(";")
    try:
        nums = tuple(int(p) for p in parts if p)
    except ValueError:
        return raw
    return nums if len(parts) > 1 or raw == "" else nums[0]
