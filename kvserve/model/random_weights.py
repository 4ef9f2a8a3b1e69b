"""Models of a named shape with random weights, made on the target device: GPU benchmarks need
no model file (none travels to a GPU host), and both engines get identical weights."""
import zlib
from collections.abc import Mapping

import torch

from kvserve.config import ModelConfig
from kvserve.model.loader import _quant_kind
from kvserve.model.quant import quantize

SHAPES = {
    # Llama-3.2-1B, Llama-3.1-8B and Qwen2-7B without rope scaling; "tiny" for tests
    "llama-1b": ModelConfig("llama", 128256, 2048, 8192, 16, 32, 8, 64, 1e-5, 500000.0,
                            max_position_embeddings=8192, tie_word_embeddings=True),
    "llama-8b": ModelConfig("llama", 128256, 4096, 14336, 32, 32, 8, 128, 1e-5, 500000.0,
                            max_position_embeddings=8192),
    "qwen2-7b": ModelConfig("qwen2", 152064, 3584, 18944, 28, 28, 4, 128, 1e-6, 1e6,
                            max_position_embeddings=8192, attention_bias=True),
    "tiny": ModelConfig("llama", 512, 64, 128, 2, 4, 2, 16, max_position_embeddings=512),
}


def shape_config(name: str) -> ModelConfig:
    if name not in SHAPES:
        raise ValueError(f"unknown model shape {name!r} (choose from {', '.join(SHAPES)})")
    return SHAPES[name]


def tensor_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Hugging Face names and shapes of a Llama/Qwen2 (or, with experts, MoE) checkpoint of this config."""
    h, d, q, kv = cfg.hidden_size, cfg.head_dim, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, h), "model.norm.weight": (h,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, h)
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        shapes |= {p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                   p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
                   p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q)}
        if cfg.num_experts:  # a router and experts named as Qwen3-MoE's checkpoints name them
            i = cfg.moe_intermediate_size
            shapes[p + "mlp.gate.weight"] = (cfg.num_experts, h)
            for e in range(cfg.num_experts):
                x = f"{p}mlp.experts.{e}."
                shapes |= {x + "gate_proj.weight": (i, h), x + "up_proj.weight": (i, h), x + "down_proj.weight": (h, i)}
        else:
            shapes |= {p + "mlp.gate_proj.weight": (cfg.intermediate_size, h),
                       p + "mlp.up_proj.weight": (cfg.intermediate_size, h),
                       p + "mlp.down_proj.weight": (h, cfg.intermediate_size)}
        if cfg.attention_bias:
            shapes |= {p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                       p + "self_attn.v_proj.bias": (kv,)}
    return shapes


class RandomWeights(Mapping):
    """name -> a tensor made when asked, from a generator seeded by (seed, name): the same weights
    every time, one tensor in memory at a time while a model loads."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device, seed: int = 0, quantization: str = "none"):
        self.shapes, self.dtype, self.device, self.seed = tensor_shapes(cfg), dtype, torch.device(device), seed
        # int8 / int4: linear weights (and int8 vocabulary tables) quantized as a float checkpoint's are
        self.quantization = "none" if quantization == "auto" else quantization

    def __getitem__(self, name: str) -> torch.Tensor:
        g = torch.Generator(self.device).manual_seed(self.seed * 1_000_003 + zlib.crc32(name.encode()))
        x = torch.randn(self.shapes[name], generator=g, device=self.device, dtype=torch.float32)
        # norms near 1, matrices at a typical init scale, so activations stay in range layer after layer
        x = 1 + 0.1 * x if name.endswith("norm.weight") else 0.02 * x
        kind, group = _quant_kind(name, x.shape, self.quantization)
        return quantize(x, kind, group) if kind else x.to(self.dtype)

    def __iter__(self):
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)


def token_tokenizer(vocab_size: int):
    """A tokenizer whose token i is spelled "<i>": decoding and stop checks cost what they cost,
    with no vocabulary file."""
    from tokenizers import Tokenizer as Backend, models, pre_tokenizers

    from kvserve.model.tokenizer import Tokenizer
    backend = Backend(models.WordLevel({f"<{i}>": i for i in range(vocab_size)}, unk_token="<0>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return Tokenizer(backend)
