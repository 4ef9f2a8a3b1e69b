"""A model that costs nothing: the engine around it is all that a step measures (`bench overhead`)."""
import torch

from kvserve.config import ModelConfig


class NullModel(torch.nn.Module):
    """Takes the decoder's call signature, writes no K/V, and returns logits drawn from a fixed random
    table, so sampling sees varied rows without paying for a random number generator."""

    def __init__(self, vocab_size: int = 512, num_layers: int = 1, num_heads: int = 4, num_kv_heads: int = 4,
                 head_dim: int = 16, max_len: int = 4096, device="cpu", seed: int = 0,
                 allowed: list[int] | None = None):
        super().__init__()
        self.config = ModelConfig("llama", vocab_size, num_heads * head_dim, 4 * num_heads * head_dim, num_layers,
                                  num_heads, num_kv_heads, head_dim, max_position_embeddings=max_len)
        g = torch.Generator().manual_seed(seed)
        table = torch.randn(257, vocab_size, generator=g)  # 257: rows do not repeat in lockstep
        if allowed is not None:  # e.g. tokens of whole characters, as most of a real text's are
            keep = torch.zeros(vocab_size, dtype=torch.bool)
            keep[allowed] = True
            table[:, ~keep] = -1e4
        self.register_buffer("table", table.to(device))
        self.calls = 0

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn) -> torch.Tensor:
        return positions.unsqueeze(1)  # the "hidden state" of a row is its position

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        rows = (hidden.flatten() * 31 + self.calls) % self.table.shape[0]
        return self.table[rows]
