"""Gemma 2 and Gemma 3 (text): Llama's decoder with Gemma's differences.

- RMSNorm as x * (1 + w) in fp32 (layers.OffsetRMSNorm), q/k norms (Gemma 3) included;
- a norm before and after both attention and MLP ("sandwich" norms);
- GeGLU MLP (cfg.hidden_act "gelu_tanh"), embeddings scaled by sqrt(hidden) in the activation dtype;
- final logits softcapped (Gemma 2).
Attention's scale (query_pre_attn_scalar), softcap and sliding windows are the attention backend's,
and Gemma 3's local RoPE base is LlamaForCausalLM's local_rope: both come from the config.
"""
import torch

from kvserve.model.layers import OffsetRMSNorm
from kvserve.model.llama import DecoderLayer, LlamaForCausalLM


class GemmaDecoderLayer(DecoderLayer):
    norm_cls = OffsetRMSNorm

    def __init__(self, cfg, layer: int):
        super().__init__(cfg, layer)
        # post_attention_layernorm (the base's name) normalizes attention's output here
        self.pre_feedforward_layernorm = OffsetRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_feedforward_layernorm = OffsetRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, residual, rope_tables, attn):
        """DecoderLayer's, with Gemma's norms after attention and after the MLP as well."""
        h, residual = self.input_layernorm.add_norm(x, residual)
        h = self.post_attention_layernorm(self.self_attn(h, rope_tables, attn))
        h, residual = self.pre_feedforward_layernorm.add_norm(h, residual)
        return self.post_feedforward_layernorm(self.mlp(h)), residual


class GemmaForCausalLM(LlamaForCausalLM):
    layer_cls = GemmaDecoderLayer
    norm_cls = OffsetRMSNorm

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        # transformers rounds the scale to the activation dtype before multiplying
        return x * torch.tensor(self.config.hidden_size ** 0.5, dtype=x.dtype)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = super().compute_logits(hidden)
        cap = self.config.final_softcap
        return logits if cap is None else torch.tanh(logits / cap) * cap
