"""Tiny random checkpoints built with transformers (the reference) and written by the test itself
as a Hugging Face directory and as GGUF with the `gguf` writer, the way llama.cpp's converter does."""
from pathlib import Path

import numpy as np
import torch

GGUF_NAMES = {
    "model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output",
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def make_hf_model(arch: str = "llama", vocab_size: int = 256, seed: int = 0, **overrides):
    """A random transformers model; every weight (biases and norms too) is random so that
    nothing passes by being zero or one."""
    import transformers
    kwargs = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
                  bos_token_id=1, eos_token_id=2)
    kwargs.update(overrides)
    if arch == "qwen2":
        config, cls = transformers.Qwen2Config(**kwargs), transformers.Qwen2ForCausalLM
    else:
        config, cls = transformers.LlamaConfig(**kwargs), transformers.LlamaForCausalLM
    torch.manual_seed(seed)
    model = cls(config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.05 * torch.randn_like(p))
    return model


def save_hf_dir(model, path: Path, tokenizer=None) -> Path:
    model.save_pretrained(path, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path


def _permute_rope_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of q/k rows (the inverse of what loaders undo)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(model, path: Path, qtype: str = "F32") -> Path:
    """Writes model as GGUF; 2-D weights in qtype (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0), norms F32."""
    import gguf
    cfg = model.config
    arch = "qwen2" if cfg.model_type == "qwen2" else "llama"
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(getattr(cfg, "rope_theta", None) or cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_vocab_size(cfg.vocab_size)
    w.add_bos_token_id(cfg.bos_token_id)
    w.add_eos_token_id(cfg.eos_token_id)
    qt = gguf.GGMLQuantizationType[qtype]
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        base, kind = name.rsplit(".", 1)
        if base.startswith("model.layers."):
            _, _, i, sub = base.split(".", 3)
            gname = f"blk.{i}.{GGUF_NAMES[sub]}.{kind}"
        else:
            gname = f"{GGUF_NAMES[base]}.{kind}"
        a = t.float().numpy()
        if arch == "llama" and gname.endswith(("attn_q.weight", "attn_k.weight")):
            heads = cfg.num_attention_heads if "attn_q" in gname else cfg.num_key_value_heads
            a = _permute_rope_rows(a, heads)
        if a.ndim == 2 and qtype != "F32":
            w.add_tensor(gname, gguf.quants.quantize(a, qt), raw_dtype=qt)
        else:
            w.add_tensor(gname, np.ascontiguousarray(a))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


FAMILY_CLASSES = {"qwen3": ("Qwen3Config", "Qwen3ForCausalLM"), "gemma2": ("Gemma2Config", "Gemma2ForCausalLM"),
                  "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM"), "phi3": ("Phi3Config", "Phi3ForCausalLM"),
                  "mistral": ("MistralConfig", "MistralForCausalLM")}


def make_family_model(arch: str, seed: int = 0, **overrides):
    """make_hf_model for the families beyond Llama/Qwen2, on transformers' eager attention (the
    one that softcaps scores); every weight random, norms around 1."""
    import transformers
    config_name, model_name = FAMILY_CLASSES[arch]
    kwargs = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    kwargs.update(overrides)
    config = getattr(transformers, config_name)(**kwargs)
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)._from_config(config, attn_implementation="eager").float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.05 * torch.randn_like(p))
    return model


def write_family_gguf(model, path: Path, qtype: str = "F32") -> Path:
    """Writes a Qwen3, Gemma 2/3 or Phi-3 model as GGUF the way llama.cpp's convert_hf_to_gguf does:
    gguf's own tensor-name table, Gemma norms stored as 1 + w, Phi-3's fused tensors as they are and
    its longrope factors as tensors."""
    import gguf
    cfg = model.config
    arch = {"gemma3_text": "gemma3"}.get(cfg.model_type, cfg.model_type)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], cfg.num_hidden_layers)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    rope = cfg.rope_parameters.get("full_attention", cfg.rope_parameters)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_freq_base(rope["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_bos_token_id(cfg.bos_token_id)
    w.add_eos_token_id(cfg.eos_token_id)
    if rope.get("rope_type") == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rope["factor"])
    if arch in ("gemma2", "gemma3"):
        w.add_sliding_window(cfg.sliding_window)
    if arch == "gemma2":
        w.add_attn_logit_softcapping(cfg.attn_logit_softcapping)
        w.add_final_logit_softcapping(cfg.final_logit_softcapping)
    if arch == "phi3":
        rope_dims = int(head_dim * rope.get("partial_rotary_factor", 1.0))
        w.add_rope_dimension_count(rope_dims)
        w.add_sliding_window(cfg.sliding_window or 0)
        original = rope.get("original_max_position_embeddings", cfg.original_max_position_embeddings)
        w.add_rope_scaling_orig_ctx_len(original)
        if rope.get("rope_type") == "longrope":
            from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
            w.add_rope_scaling_attn_factors(ROPE_INIT_FUNCTIONS["longrope"](cfg, "cpu")[1])
            w.add_tensor("rope_factors_long.weight", np.array(rope["long_factor"], dtype=np.float32))
            w.add_tensor("rope_factors_short.weight", np.array(rope["short_factor"], dtype=np.float32))
    qt = gguf.GGMLQuantizationType[qtype]
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        a = t.float().numpy()
        if arch in ("gemma2", "gemma3") and name.endswith("norm.weight"):
            a = a + 1
        gname = names.get_name(name, try_suffixes=(".weight", ".bias"))
        assert gname is not None, f"no GGUF name for {name} in {arch}"
        if a.ndim == 2 and qtype != "F32":
            w.add_tensor(gname, gguf.quants.quantize(a, qt), raw_dtype=qt)
        else:
            w.add_tensor(gname, np.ascontiguousarray(a))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
