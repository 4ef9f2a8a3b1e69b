"""Tile sizes and launch settings of the kernels. The defaults are guesses for Hopper/Ampere, not
yet tuned on a GPU: `kvserve bench attention --sweep` times the alternatives."""
from dataclasses import dataclass, fields, replace

import torch


@dataclass(frozen=True)
class Tiles:
    decode_block_n: int = 64  # KV positions per step of a decode program
    decode_warps: int = 4
    decode_stages: int = 2
    prefill_block_m: int = 128  # query rows of a prefill program
    prefill_block_n: int = 64
    prefill_warps: int = 8
    prefill_stages: int = 3

    @classmethod
    def default(cls, dtype: torch.dtype, head_dim: int) -> "Tiles":
        """Half-size tiles where elements or heads are twice as large: fp32 or a 256 head dim at
        the 16-bit sizes would pass the shared memory of most GPUs."""
        if dtype == torch.float32 or head_dim > 128:
            return cls(decode_block_n=32, prefill_block_m=64, prefill_block_n=32, prefill_warps=4,
                       prefill_stages=2)
        return cls()

    def with_(self, text: str) -> "Tiles":
        """These tiles with "name=value,..." changed (a benchmark's command line)."""
        names = {f.name for f in fields(self)}
        changes = {}
        for item in filter(None, (s.strip() for s in text.split(","))):
            name, _, value = item.partition("=")
            if name not in names or not value.isdigit():
                raise ValueError(f"tiles: expected name=int with name in {', '.join(sorted(names))}, got {item!r}")
            changes[name] = int(value)
        return replace(self, **changes)
