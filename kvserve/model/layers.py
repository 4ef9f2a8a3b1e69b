"""Building blocks of Llama-family decoders."""
import math

import torch
from torch import nn


class RMSNorm(nn.Module):
    offset = 0.0  # what the weight is added to before it multiplies (OffsetRMSNorm: 1)

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # one fused kernel; it accumulates in fp32 as transformers does (identical in fp32)
        return nn.functional.rms_norm(x, self.weight.shape, self.weight, self.eps)

    def add_norm(self, x: torch.Tensor, residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm of x + residual, x + residual): a residual add and the norm after it, which a GPU
        runs as one kernel (model/pointwise_triton.py); residual None: (norm of x, x)."""
        if residual is not None:
            x = x + residual
        return self(x), x


class OffsetRMSNorm(RMSNorm):
    """Gemma's RMSNorm: x * (1 + w), computed in fp32 and cast back (transformers' Gemma order:
    the weight multiplies before the cast, where Llama's multiplies after)."""
    offset = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.rms_norm(x.float(), self.weight.shape, 1.0 + self.weight.float(), self.eps).to(x.dtype)


def rope_kind(scaling: dict | None) -> str:
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    return "longrope" if kind == "su" else kind  # "su" is longrope's old name (Phi-3)


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None,
                  freq_factors: torch.Tensor | None = None, long: bool = False) -> torch.Tensor:
    """Inverse frequencies of rotary embedding over head_dim (the rotated dims), with `linear`,
    `llama3` or `longrope` scaling (long: longrope's long factors, else its short ones)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    kind = rope_kind(scaling)
    if freq_factors is not None:  # llama.cpp stores llama3 and longrope scaling as per-frequency divisors
        return (inv_freq / freq_factors.double()).float()
    if kind == "default":
        return inv_freq.float()
    if kind == "linear":
        return (inv_freq / scaling["factor"]).float()
    if kind == "llama3":
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_ctx = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_ctx / wavelen - low) / (high - low)
        mid = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        out = torch.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
        is_mid = (wavelen <= old_ctx / low) & (wavelen >= old_ctx / high)
        return torch.where(is_mid, mid, out).float()
    if kind == "longrope":
        factors = torch.tensor(scaling["long_factor" if long else "short_factor"], dtype=torch.float64)
        return (inv_freq / factors).float()
    raise ValueError(f"unsupported rope scaling type {kind!r} (supported: linear, llama3, longrope)")


def rope_attention_scaling(scaling: dict | None, max_positions: int) -> float:
    """The factor on cos and sin that longrope asks for, as transformers computes it: given, or
    from the context extension ratio (Phi-3 extends max_position_embeddings past the original)."""
    if rope_kind(scaling) != "longrope":
        return 1.0
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    original = scaling["original_max_position_embeddings"]
    factor = scaling.get("factor") or max_positions / original
    return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))


class RotaryEmbedding:
    """Non-interleaved (rotate-half) rotary embedding with a precomputed fp32 cos/sin table.
    A plain object, not a module, so that casting the model's dtype leaves the table in fp32."""

    def __init__(self, max_positions: int, inv_freq: torch.Tensor, device="cpu", *,
                 long_inv_freq: torch.Tensor | None = None, long_from: int | None = None, scaling: float = 1.0):
        """long_inv_freq: frequencies of positions >= long_from
        (longrope's long factors, which transformers takes once a sequence passes the original
        context). scaling: longrope's factor on cos and sin."""
        self.inv_freq, self.device = inv_freq, device
        self.long_inv_freq, self.long_from, self.scaling = long_inv_freq, long_from, scaling
        self._fill(max_positions)

    def _fill(self, max_positions: int) -> None:
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), self.inv_freq)
        if self.long_inv_freq is not None and max_positions > self.long_from:
            long = torch.arange(self.long_from, max_positions, dtype=torch.float32)
            freqs[self.long_from:] = torch.outer(long, self.long_inv_freq)
        freqs = freqs.to(self.device)
        self.cos, self.sin = freqs.cos() * self.scaling, freqs.sin() * self.scaling

    def ensure(self, num_positions: int) -> None:
        """Grows the table (doubling) for requests that run past the context length (streaming)."""
        if num_positions > len(self.cos):
            self._fill(max(num_positions, 2 * len(self.cos)))

    def table(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sign-folded sin [T, 1, D] for a step's positions, looked up once and shared by
        all layers; in the activation dtype, as transformers applies them."""
        cos, sin = self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)
        return torch.cat((cos, cos), -1).to(dtype), torch.cat((-sin, sin), -1).to(dtype)

    @staticmethod
    def apply(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
        """x [T, heads, D]: x * cos + rotate_half(x) * sin, with full-width contiguous operands
        (elementwise ops on strided half-width views are several times slower on CPU). A table
        narrower than x (partial rotary) rotates x's first dims and passes the rest through."""
        rot = cos.shape[-1]
        if rot < x.shape[-1]:
            return torch.cat((RotaryEmbedding.apply(x[..., :rot], cos, signed_sin), x[..., rot:]), -1)
        half = rot // 2
        return x * cos + torch.cat((x[..., half:], x[..., :half]), -1) * signed_sin


ACTIVATIONS = {"silu": nn.functional.silu,
               "gelu_tanh": lambda x: nn.functional.gelu(x, approximate="tanh")}


class GatedMLP(nn.Module):
    """Gated MLP (SwiGLU, or GeGLU with act "gelu_tanh") with gate and up fused into one matmul."""

    def __init__(self, hidden: int, intermediate: int, act: str = "silu"):
        super().__init__()
        self.gate_up_proj = nn.Linear(hidden, 2 * intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)
        self.act = ACTIVATIONS[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_mul(self.gate_up_proj(x)))

    def act_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """act(gate) * up; one kernel on a GPU (model/pointwise_triton.py)."""
        gate, up = gate_up.chunk(2, dim=-1)
        # a contiguous gate: SiLU over a strided view is ~3x slower on CPU than copy + SiLU
        return self.act(gate.contiguous()) * up
