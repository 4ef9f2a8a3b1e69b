"""Sparse mixture-of-experts MLP (Mixtral, Qwen3-MoE, OLMoE): a router picks k of E SiLU-gated
experts per token, and the token's output is their weighted sum.

Tokens are grouped by expert, so each chosen expert runs once over its own tokens and the experts
nobody chose are never read. Float32 weights on the CPU run in kvserve/native/moe.c, every chosen
expert of the step in one call, up to NATIVE_ROWS_PER_EXPERT; elsewhere PyTorch ops, where a single
token (a one-stream decode step) skips the grouping and runs its k experts directly. Float weights
are stacked ([E, 2I, H] gate and up fused, [E, H, I] down; on 2 MiB pages on the CPU), as moe.c and
the Triton kernel on CUDA read them; quantized ones (CPU) are one pair of QuantizedLinear modules per expert, on the same
int4/int8 kernels as the dense layers.
"""
import functools
import importlib.util
import weakref

import torch
from torch import nn

from kvserve.config import ModelConfig
from kvserve.model import hugepages
from kvserve.model.layers import GatedMLP
from kvserve.model.quant import QuantizedLinear, QuantizedTensor, quantize
from kvserve.native import moe as native_moe

# checkpoint projection name -> (stacked parameter, shards per expert, shard of this projection)
EXPERT_SHARDS = {"w1": ("experts_gate_up", 2, 0), "gate_proj": ("experts_gate_up", 2, 0),
                 "w3": ("experts_gate_up", 2, 1), "up_proj": ("experts_gate_up", 2, 1),
                 "w2": ("experts_down", 1, 0), "down_proj": ("experts_down", 1, 0)}
STACKED = ("experts_gate_up", "experts_down")
# moe.c's products are blocked for the few rows an expert gets in decode steps; from ~32 rows an
# expert on average (prompt chunks), PyTorch's matmuls are faster (4 layers of 8 experts, top-2,
# 512 wide, one thread: 64 tokens 21 ms against 28; 128 tokens 42 against 42; 256 77 against 61)
NATIVE_ROWS_PER_EXPERT = 32


@functools.cache
def _triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


# In a compiled forward (--compile) the experts are one opaque op, as attention is: their loops
# depend on the routing, which a graph would specialize on, and a graph break there would compile
# each layer on its own. The op finds its module by id.
_MODULES: "weakref.WeakValueDictionary[int, SparseMoE]" = weakref.WeakValueDictionary()
_lib = torch.library.Library("kvserve_moe", "DEF")
_lib.define("pair_outputs(Tensor x, Tensor experts, int module) -> Tensor")


def _pair_outputs_op(x: torch.Tensor, experts: torch.Tensor, module: int) -> torch.Tensor:
    return _MODULES[module]._pair_outputs(x, experts)


_lib.impl("pair_outputs", _pair_outputs_op, "CPU")


@torch.library.register_fake("kvserve_moe::pair_outputs")
def _(x, experts, module):
    return x.new_empty(experts.numel(), x.shape[1])


def hf_moe_fields(c: dict) -> dict:
    """ModelConfig's MoE fields from a Hugging Face config.json (empty for a dense model).
    Mixtral and OLMoE size experts with intermediate_size, Qwen3-MoE with moe_intermediate_size;
    Mixtral always renormalises the top-k weights, the others as norm_topk_prob says."""
    experts = c.get("num_local_experts") or c.get("num_experts") or 0
    if not experts:
        return {}
    model_type = c.get("model_type")
    if c.get("mlp_only_layers") or c.get("decoder_sparse_step", 1) != 1:
        raise ValueError("MoE models with dense layers between sparse ones (mlp_only_layers, "
                         "decoder_sparse_step) are not supported")
    width = c.get("moe_intermediate_size") if model_type == "qwen3_moe" else None
    return {"num_experts": int(experts), "num_experts_per_tok": int(c["num_experts_per_tok"]),
            "moe_intermediate_size": int(width or c["intermediate_size"]),
            "norm_topk_prob": model_type == "mixtral" or bool(c.get("norm_topk_prob", False))}


def gguf_moe_fields(meta: dict, arch: str) -> dict:
    """The same from GGUF metadata: llama.cpp writes Mixtral as arch llama with expert_count, and
    sizes qwen3moe's experts with expert_feed_forward_length; both renormalise the top-k weights."""
    experts = meta.get(f"{arch}.expert_count")
    if not experts:
        return {}
    width = meta.get(f"{arch}.expert_feed_forward_length") or meta.get(f"{arch}.feed_forward_length")
    return {"num_experts": int(experts), "num_experts_per_tok": int(meta.get(f"{arch}.expert_used_count", 0)),
            "moe_intermediate_size": int(width or 0), "norm_topk_prob": True}


def checkpoint_target(parts: list[str]) -> tuple[str, int] | None:
    """A checkpoint name's parts (without `model.`) -> (model parameter, shard) for the router and
    the experts of an MoE layer; None for any other tensor. Mixtral's `block_sparse_moe` becomes
    `mlp`; expert e's gate and up are shards 2e and 2e + 1 of the fused stack, its down shard e."""
    if len(parts) < 5 or parts[0] != "layers" or parts[2] not in ("block_sparse_moe", "mlp"):
        return None
    layer, rest = parts[:2] + ["mlp"], parts[3:]
    if rest == ["gate", "weight"]:
        return ".".join(layer + rest), 0
    if len(rest) == 4 and rest[0] == "experts" and rest[1].isdigit() and rest[2] in EXPERT_SHARDS \
            and rest[3] == "weight":
        attr, per_expert, shard = EXPERT_SHARDS[rest[2]]
        return ".".join(layer + [attr]), per_expert * int(rest[1]) + shard
    return None


def num_shards(param: str, cfg: ModelConfig) -> int | None:
    """Checkpoint tensors that make up a stacked expert parameter; None for other parameters."""
    attr = param.rpartition(".")[2]
    return {"experts_gate_up": 2 * cfg.num_experts, "experts_down": cfg.num_experts}.get(attr)


def route(logits: torch.Tensor, k: int, normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits [T, E] -> (fp32 weights [T, k], expert ids [T, k]): softmax over all experts,
    the k largest, renormalised to sum to 1 if asked (for Mixtral the same as a softmax over the
    top-k logits)."""
    weights, experts = torch.softmax(logits, -1, dtype=torch.float32).topk(k, -1)
    if normalize:
        weights = weights / weights.sum(-1, keepdim=True)
    return weights, experts


class SparseMoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        e, h, i = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.num_experts, self.top_k, self.normalize = e, cfg.num_experts_per_tok, cfg.norm_topk_prob
        self.gate = nn.Linear(h, e, bias=False)  # the router
        self.experts_gate_up = nn.Parameter(torch.empty(e, 2 * i, h))
        self.experts_down = nn.Parameter(torch.empty(e, h, i))
        self.experts: nn.ModuleList | None = None  # per-expert quantized MLPs, which replace the stacks
        _MODULES[id(self)] = self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, H] -> [T, H]"""
        weights, experts = route(self.gate(x), self.top_k, self.normalize)
        if x.is_cuda and self.experts is None and _triton_available():
            from kvserve.model.moe_triton import fused_moe
            return fused_moe(x, weights, experts, self.experts_gate_up, self.experts_down)
        if torch.compiler.is_compiling():
            out = torch.ops.kvserve_moe.pair_outputs(x, experts, id(self))
        else:
            out = self._pair_outputs(x, experts)
        # the weighted sum of each token's k outputs, one op: [T, 1, k] @ [T, k, H]
        return torch.bmm(weights.to(out.dtype).unsqueeze(1), out.view(*experts.shape, -1)).squeeze(1)

    def _pair_outputs(self, x: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """Each (token, expert) pair's expert output, [T * k, H] in the pairs' row-major order."""
        if (self.experts is None and x.shape[0] * self.top_k <= NATIVE_ROWS_PER_EXPERT * self.num_experts
                and native_moe.available(x, self.experts_gate_up, self.experts_down)):
            return native_moe.pair_outputs(x, experts, self.experts_gate_up, self.experts_down)
        if x.shape[0] == 1:  # one token: its k experts directly, no grouping
            return torch.cat([self._expert(e, x) for e in experts[0].tolist()])
        return self._grouped(x, experts)

    def _grouped(self, x: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """Each (token, expert) pair's expert output, [T * k, H] in the pairs' row-major order:
        the pairs are sorted by expert so that each expert runs once over a contiguous slice."""
        flat = experts.flatten()
        order = flat.argsort(stable=True)
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        rows = x[order // self.top_k]
        out = torch.empty_like(rows)
        start = 0
        for e, n in enumerate(counts):
            if n:
                out[start:start + n] = self._expert(e, rows[start:start + n])
                start += n
        return torch.empty_like(out).index_copy_(0, order, out)

    def _expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        if self.experts is not None:
            return self.experts[e](x)
        gate, up = nn.functional.linear(x, self.experts_gate_up[e]).chunk(2, dim=-1)
        return nn.functional.linear(nn.functional.silu(gate.contiguous()) * up, self.experts_down[e])

    def load_experts(self, attr: str, parts: list, dtype: torch.dtype, device) -> None:
        """Sets a stacked parameter from its checkpoint shards (see checkpoint_target); quantized
        shards become per-expert QuantizedLinear modules instead."""
        if any(isinstance(p, QuantizedTensor) for p in parts):
            kind = next(p.kind for p in parts if isinstance(p, QuantizedTensor))
            parts = [p if isinstance(p, QuantizedTensor) else quantize(p, kind) for p in parts]
            if self.experts is None:
                with torch.device("meta"):
                    self.experts = nn.ModuleList(GatedMLP(1, 1) for _ in range(self.num_experts))
            per_expert = len(parts) // self.num_experts
            for e, mlp in enumerate(self.experts):
                qt = QuantizedTensor.cat(parts[e * per_expert:(e + 1) * per_expert])
                setattr(mlp, "gate_up_proj" if attr == "experts_gate_up" else "down_proj", QuantizedLinear(qt))
            setattr(self, attr, None)
            return
        stack = getattr(self, attr)
        value = torch.cat(parts)
        if value.numel() != stack.numel() or value.shape[-1] != stack.shape[-1]:
            per_expert = tuple(parts[0].shape)
            raise ValueError(f"{attr}: the checkpoint's experts have shape {per_expert}, the model's "
                             f"{tuple(stack.shape[1:])} ({len(parts)} tensors)")
        if torch.device(device or "cpu").type == "cpu":  # moe.c reads each expert's rows: keep TLB misses few
            value = hugepages.empty(tuple(stack.shape), dtype).copy_(value.view(stack.shape))
        else:
            value = value.view(stack.shape).to(device=device, dtype=dtype, copy=True)
        setattr(self, attr, nn.Parameter(value, requires_grad=False))
