"""Llama-family decoder (Llama, SmolLM2, Mistral, Qwen2, Qwen3, Phi-3, Mixtral) over a paged KV cache;
the base that other families (model/gemma.py) specialise through class attributes and hooks.

The model never sees requests: it gets a flat batch of tokens with their positions and an
attention backend already planned for the step, and returns hidden states. Sliding windows,
the score scale and softcapping are the attention backend's (built from the config in
engine/executors.py), not the model's.
"""
import torch
from torch import nn

from kvserve.config import ModelConfig
from kvserve.model import moe
from kvserve.model.layers import GatedMLP, RMSNorm, RotaryEmbedding, rope_attention_scaling, rope_inv_freq, rope_kind
from kvserve.model.moe import SparseMoE
from kvserve.model.quant import (GROUP, QuantizedEmbedding, QuantizedLinear, QuantizedTensor, VocabProjection,
                                 quantize)

# bf16 logits are rounded to ~0.1 at typical magnitudes and an int8 lm_head errs by as much,
# enough to swap near-tied tokens: logits within this margin of the best are recomputed in fp32
RESCORE_MARGIN = 1.0
RESCORE_TOP = 8  # off the CPU: the best this many of a row, a fixed shape (no device-to-host wait in a step)
FUSED = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
         "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, norm_cls=RMSNorm):
        super().__init__()
        self.layer = layer
        self.h, self.hkv, self.d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.qkv_proj = nn.Linear(cfg.hidden_size, (self.h + 2 * self.hkv) * self.d, bias=cfg.attention_bias)
        # Llama's attention_bias covers o_proj too; Qwen2's covers q/k/v only
        self.o_proj = nn.Linear(self.h * self.d, cfg.hidden_size,
                                bias=cfg.attention_bias and cfg.architecture != "qwen2")
        # q/k RMSNorm before RoPE: per head (Qwen3, Gemma 3) or over all heads at once (OLMoE)
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm is not None:
            per_head = cfg.qk_norm == "head"
            self.q_norm = norm_cls(self.d if per_head else self.h * self.d, cfg.rms_norm_eps)
            self.k_norm = norm_cls(self.d if per_head else self.hkv * self.d, cfg.rms_norm_eps)
        # which of the model's rotary tables this layer takes: Gemma 3's sliding layers have their own
        self.local_rope = cfg.rope_local_theta is not None and cfg.is_sliding(layer)

    def forward(self, x, rope_tables, attn):
        rope_table = rope_tables[self.local_rope]
        if self.qk_norm is None:  # one rotation over q and k together
            qk, v = self.qkv_proj(x).split([(self.h + self.hkv) * self.d, self.hkv * self.d], -1)
            q, k = RotaryEmbedding.apply(qk.view(-1, self.h + self.hkv, self.d), *rope_table).split([self.h, self.hkv], 1)
        else:
            q, k, v = self.qkv_proj(x).split([self.h * self.d, self.hkv * self.d, self.hkv * self.d], -1)
            if self.qk_norm == "full":
                q, k = self.q_norm(q), self.k_norm(k)
            q, k = q.reshape(-1, self.h, self.d), k.reshape(-1, self.hkv, self.d)
            if self.qk_norm == "head":
                q, k = self.q_norm(q), self.k_norm(k)
            q, k = RotaryEmbedding.apply(q, *rope_table), RotaryEmbedding.apply(k, *rope_table)
        out = attn.run(self.layer, q, k, v.reshape(-1, self.hkv, self.d))
        return self.o_proj(out.reshape(-1, self.h * self.d))


class DecoderLayer(nn.Module):
    norm_cls = RMSNorm

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.input_layernorm = self.norm_cls(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer, self.norm_cls)
        self.post_attention_layernorm = self.norm_cls(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = self.make_mlp(cfg, layer)

    @staticmethod
    def make_mlp(cfg: ModelConfig, layer: int) -> nn.Module:
        """The one place a layer's MLP block is chosen."""
        if cfg.num_experts:
            return SparseMoE(cfg)
        return GatedMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act)

    def forward(self, x, residual, rope_tables, attn):
        """The residual stream is x + residual (residual None: x), carried as two parts so that each
        add fuses with the norm after it: -> (this layer's MLP output, the stream before it)."""
        h, residual = self.input_layernorm.add_norm(x, residual)
        h = self.self_attn(h, rope_tables, attn)
        h, residual = self.post_attention_layernorm.add_norm(h, residual)
        return self.mlp(h), residual


class LlamaForCausalLM(nn.Module):
    layer_cls = DecoderLayer
    norm_cls = RMSNorm

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        # _weight skips the random init, which is slow even on the meta device
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size,
                                         _weight=torch.empty(cfg.vocab_size, cfg.hidden_size))
        self.layers = nn.ModuleList(self.layer_cls(cfg, i) for i in range(cfg.num_layers))
        self.norm = self.norm_cls(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.lm_head_rows: QuantizedEmbedding | None = None  # the int8 (or 4-bit) table of a quantized lm_head
        self.tie_weights()
        self.rope = None  # set by from_weights once the model is on its device
        self.local_rope = None  # the sliding layers' table where it differs (Gemma 3)

    @classmethod
    def from_weights(cls, cfg: ModelConfig, weights: dict[str, torch.Tensor | QuantizedTensor],
                     dtype=torch.float32, device="cpu") -> "LlamaForCausalLM":
        """Builds on the meta device, so no memory goes to random initialization or to float
        copies of weights that stay quantized. QuantizedTensors use CPU kernels."""
        if device != "cpu" and any(isinstance(w, QuantizedTensor) for w in weights.values()):
            raise ValueError("quantized weights run on the CPU only; use --quantization none on "
                             f"device {device}")
        with torch.device("meta"):
            model = cls(cfg)
        model.load_weights(weights, dtype, device)
        model.eval().requires_grad_(False)
        model.rope = make_rope(cfg, cfg.rope_theta, cfg.rope_scaling, weights.get("rope_freqs.weight"), device)
        if cfg.rope_local_theta is not None:
            model.local_rope = make_rope(cfg, cfg.rope_local_theta, None, None, device)
        return model

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings and self.lm_head_rows is None:
            self.lm_head.weight = self.embed_tokens.weight

    @property
    def dtype(self) -> torch.dtype:
        """The activation dtype (quantized modules hold int weights)."""
        return self.norm.weight.dtype

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn) -> torch.Tensor:
        """input_ids, positions [T] -> final hidden states [T, hidden]; K/V go to the cache via attn."""
        x = self.embed(input_ids)
        rope_table = self.rope.table(positions, x.dtype)
        local_table = rope_table
        if self.local_rope is not None:
            self.local_rope.ensure(len(self.rope.cos))  # callers grow self.rope only
            local_table = self.local_rope.table(positions, x.dtype)
        residual = None
        for layer in self.layers:
            x, residual = layer(x, residual, (rope_table, local_table), attn)
        return self.norm.add_norm(x, residual)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden).float()
        if self.lm_head_rows is not None or self.dtype != torch.float32:
            rescore = rescore_near_best if logits.device.type == "cpu" else rescore_top
            rescore(logits, hidden, self._vocab_rows)
        return logits

    def _vocab_rows(self, tokens: torch.Tensor) -> torch.Tensor:
        """fp32 rows of the output projection (exact GGUF values for quantized tables)."""
        if self.lm_head_rows is not None:
            return self.lm_head_rows.rows(tokens)
        return self.lm_head.weight[tokens].float()

    @torch.no_grad()
    def load_weights(self, weights, dtype: torch.dtype, device="cpu") -> None:
        """Takes Hugging Face names (`model.layers.0.self_attn.q_proj.weight`, ...), fuses q/k/v
        and gate/up, and swaps in quantized modules where weights are QuantizedTensors. Values are
        taken from `weights` one parameter at a time, so a lazy mapping (the GGUF loader's) never
        holds more than one converted."""
        params = dict(self.named_parameters(remove_duplicate=False))
        names: dict[str, dict[int, str]] = {}  # parameter -> {shard: checkpoint name}
        for name in weights:
            parts = name.removeprefix("model.").split(".")
            target, shard = FUSED.get(parts[-2], (parts[-2], 0)) if len(parts) >= 2 else (None, 0)
            if target in ("qkv_proj", "gate_up_proj") and target == parts[-2]:
                shard = -1  # a checkpoint that fuses them too (Phi-3): the whole parameter
            param = ".".join(parts[:-2] + [target, parts[-1]]) if target else ".".join(parts)
            param, shard = moe.checkpoint_target(parts) or (param, shard)
            if param in params:
                names.setdefault(param, {})[shard] = name
        expected = {n for n in params if not (self.config.tie_word_embeddings and n == "lm_head.weight")}
        missing = [n for n in expected
                   if len(names.get(n, ())) != self._num_shards(n) and -1 not in names.get(n, ())]
        if missing:
            raise ValueError(f"checkpoint lacks {len(missing)} tensors, e.g. {sorted(missing)[0]}")
        for param, shards in names.items():
            parts = [weights[shards[i]] for i in sorted(shards)]
            module_name, _, attr = param.rpartition(".")
            if attr in moe.STACKED:
                self.get_submodule(module_name).load_experts(attr, parts, dtype, device)
                continue
            if any(isinstance(v, QuantizedTensor) for v in parts):
                kind = next(v.kind for v in parts if isinstance(v, QuantizedTensor))
                qt = QuantizedTensor.cat([v if isinstance(v, QuantizedTensor) else quantize(v, kind) for v in parts])
                self._install_quantized(param.removesuffix(".weight"), qt, dtype)
                continue
            value = torch.cat(parts) if len(parts) > 1 else parts[0]
            if value.shape != params[param].shape:
                raise ValueError(f"{param}: the checkpoint's shape {tuple(value.shape)} is not the model's "
                                 f"{tuple(params[param].shape)}")
            # a bias of a module already quantized is set on the quantized module
            setattr(self.get_submodule(module_name), attr, nn.Parameter(
                value.to(device=device, dtype=dtype, copy=True).contiguous(), requires_grad=False))
        self.tie_weights()

    def _num_shards(self, name: str) -> int:
        """Checkpoint tensors that make the parameter: q/k/v and gate/up are fused here, experts stacked."""
        return moe.num_shards(name, self.config) or {"qkv_proj": 3, "gate_up_proj": 2}.get(name.split(".")[-2], 1)

    def _install_quantized(self, module_name: str, qt: QuantizedTensor, dtype: torch.dtype) -> None:
        parent_name, _, attr = module_name.rpartition(".")
        parent = self.get_submodule(parent_name)
        if attr in ("embed_tokens", "lm_head"):
            if qt.kind != "int8" and not QuantizedEmbedding.int4_fits(qt):
                qt = qt.requantize("int8", GROUP)
            table = QuantizedEmbedding(qt, dtype)
            if attr == "embed_tokens":
                self.embed_tokens = table
            if attr == "lm_head" or self.config.tie_word_embeddings:
                self.lm_head = VocabProjection(table) if table.native else QuantizedLinear(qt)
                self.lm_head_rows = table
        else:
            # its bias, if still on meta, is set on the new module when the loader reaches it
            setattr(parent, attr, QuantizedLinear(qt, getattr(parent, attr).bias))


def make_rope(cfg: ModelConfig, theta: float, scaling: dict | None, freq_factors: torch.Tensor | None,
              device) -> RotaryEmbedding:
    """The rotary table of cfg's rotated dims; longrope takes its long factors from the original
    context length on and scales cos/sin by its attention factor."""
    inv_freq = rope_inv_freq(cfg.rotary_dim, theta, scaling, freq_factors)
    if rope_kind(scaling) != "longrope":
        return RotaryEmbedding(cfg.max_position_embeddings, inv_freq, device)
    return RotaryEmbedding(cfg.max_position_embeddings, inv_freq, device,
                           long_inv_freq=rope_inv_freq(cfg.rotary_dim, theta, scaling, long=True),
                           long_from=scaling["original_max_position_embeddings"],
                           scaling=rope_attention_scaling(scaling, cfg.max_position_embeddings))


def rescore_near_best(logits: torch.Tensor, hidden: torch.Tensor, vocab_rows) -> None:
    """Every logit within RESCORE_MARGIN of its row's best, recomputed in fp32 from vocab_rows(tokens)."""
    best = logits.amax(-1, keepdim=True)
    rows, tokens = torch.nonzero(logits >= best - RESCORE_MARGIN, as_tuple=True)  # waits for the device
    logits[rows, tokens] = (hidden[rows].float() * vocab_rows(tokens)).sum(-1)


def rescore_top(logits: torch.Tensor, hidden: torch.Tensor, vocab_rows) -> None:
    """rescore_near_best within each row's RESCORE_TOP best logits: fixed shapes, so a GPU step queues
    it without waiting (and a CUDA graph could hold it); the same unless more are near the best."""
    vals, tokens = logits.topk(min(RESCORE_TOP, logits.shape[-1]), dim=-1)
    rows = vocab_rows(tokens.flatten()).view(*tokens.shape, -1).float()
    exact = torch.bmm(rows, hidden.float().unsqueeze(-1)).squeeze(-1)
    logits.scatter_(1, tokens, torch.where(vals >= vals[:, :1] - RESCORE_MARGIN, exact, vals))
