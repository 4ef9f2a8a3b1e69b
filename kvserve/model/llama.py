"""Llama-family decoder (Llama, SmolLM2, Mistral, Qwen2) over a paged KV cache.

The model never sees requests: it gets a flat batch of tokens with their positions and an
attention backend already planned for the step, and returns hidden states.
"""
import torch
from torch import nn

from kvserve.config import ModelConfig
from kvserve.model.layers import GatedMLP, RMSNorm, RotaryEmbedding, rope_inv_freq


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.h, self.hkv, self.d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.qkv_proj = nn.Linear(cfg.hidden_size, (self.h + 2 * self.hkv) * self.d, bias=cfg.attention_bias)
        # Llama's attention_bias covers o_proj too; Qwen2's covers q/k/v only
        self.o_proj = nn.Linear(self.h * self.d, cfg.hidden_size,
                                bias=cfg.attention_bias and cfg.architecture != "qwen2")

    def forward(self, x, rope_table, attn):
        qk, v = self.qkv_proj(x).split([(self.h + self.hkv) * self.d, self.hkv * self.d], -1)
        q, k = RotaryEmbedding.apply(qk.view(-1, self.h + self.hkv, self.d), *rope_table).split([self.h, self.hkv], 1)
        out = attn.run(self.layer, q, k, v.view(-1, self.hkv, self.d))
        return self.o_proj(out.reshape(-1, self.h * self.d))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x, rope_table, attn):
        x = x + self.self_attn(self.input_layernorm(x), rope_table, attn)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        # _weight skips the random init, which is slow even on the meta device
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size,
                                         _weight=torch.empty(cfg.vocab_size, cfg.hidden_size))
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.tie_weights()
        self.rope = None  # set by init_rope once the model is on its device

    @classmethod
    def from_weights(cls, cfg: ModelConfig, weights: dict[str, torch.Tensor], dtype=torch.float32,
                     device="cpu") -> "LlamaForCausalLM":
        """Builds on the meta device first so no memory is spent on random initialization."""
        with torch.device("meta"):
            model = cls(cfg)
        model.to_empty(device=device)
        model.tie_weights()
        model.load_weights(weights)
        model.to(dtype).eval().requires_grad_(False)
        freq_factors = weights.get("rope_freqs.weight")
        inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, freq_factors)
        model.rope = RotaryEmbedding(cfg.max_position_embeddings, inv_freq, device)
        return model

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn) -> torch.Tensor:
        """input_ids, positions [T] -> final hidden states [T, hidden]; K/V go to the cache via attn."""
        x = self.embed_tokens(input_ids)
        rope_table = self.rope.table(positions, x.dtype)
        for layer in self.layers:
            x = layer(x, rope_table, attn)
        return self.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    @torch.no_grad()
    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Takes Hugging Face names (`model.layers.0.self_attn.q_proj.weight`, ...) and fuses
        q/k/v and gate/up as it goes."""
        fused = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
                 "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}
        params = dict(self.named_parameters(remove_duplicate=False))
        loaded = set()
        for name, tensor in weights.items():
            name = name.removeprefix("model.")
            parts = name.split(".")
            if len(parts) >= 2 and parts[-2] in fused:
                target, shard = fused[parts[-2]]
                name = ".".join(parts[:-2] + [target, parts[-1]])
                param = params[name]
                sizes = self._shard_sizes(target)
                start = sum(sizes[:shard])
                param.data[start:start + sizes[shard]].copy_(tensor)
                loaded.add(f"{name}#{shard}")
            elif name == "rope_freqs.weight":
                continue
            elif name in params:
                params[name].data.copy_(tensor)
                loaded.add(name)
        expected = {n for n in params if not (self.config.tie_word_embeddings and n == "lm_head.weight")}
        missing = [n for n in expected if n not in loaded and not any(
            k.startswith(n + "#") for k in loaded)]
        if missing:
            raise ValueError(f"checkpoint lacks {len(missing)} tensors, e.g. {sorted(missing)[0]}")

    def _shard_sizes(self, target: str) -> list[int]:
        c = self.config
        if target == "qkv_proj":
            return [c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.num_kv_heads * c.head_dim]
        return [c.intermediate_size, c.intermediate_size]
