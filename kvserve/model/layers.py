"""Building blocks of Llama-family decoders."""
import math

import torch
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # one fused kernel; it accumulates in fp32 as transformers does (identical in fp32)
        return nn.functional.rms_norm(x, self.weight.shape, self.weight, self.eps)


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None,
                  freq_factors: torch.Tensor | None = None) -> torch.Tensor:
    """Inverse frequencies of rotary embedding, with `linear` or `llama3` scaling."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if freq_factors is not None:  # llama.cpp stores llama3 scaling as per-frequency divisors
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
    raise ValueError(f"unsupported rope scaling type {kind!r} (supported: linear, llama3)")


class RotaryEmbedding:
    """Non-interleaved (rotate-half) rotary embedding with a precomputed fp32 cos/sin table.
    A plain object, not a module, so that casting the model's dtype leaves the table in fp32."""

    def __init__(self, max_positions: int, inv_freq: torch.Tensor, device="cpu"):
        self.inv_freq, self.device = inv_freq, device
        self._fill(max_positions)

    def _fill(self, max_positions: int) -> None:
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), self.inv_freq).to(self.device)
        self.cos, self.sin = freqs.cos(), freqs.sin()

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
        (elementwise ops on strided half-width views are several times slower on CPU)."""
        half = x.shape[-1] // 2
        return x * cos + torch.cat((x[..., half:], x[..., :half]), -1) * signed_sin


class GatedMLP(nn.Module):
    """SiLU-gated MLP with gate and up fused into one matmul."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_up_proj = nn.Linear(hidden, 2 * intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        # a contiguous gate: SiLU over a strided view is ~3x slower on CPU than copy + SiLU
        return self.down_proj(nn.functional.silu(gate.contiguous()) * up)
