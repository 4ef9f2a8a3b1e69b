"""Tiny random mixture-of-experts checkpoints built with transformers, and Mixtral written as GGUF
the way llama.cpp's converter does (arch llama, experts stacked in `ffn_*_exps` tensors)."""
from pathlib import Path

import numpy as np
import torch

from tiny_models import GGUF_NAMES, _permute_rope_rows

FAMILIES = {"mixtral": ("MixtralConfig", "MixtralForCausalLM"),
            "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM"),
            "olmoe": ("OlmoeConfig", "OlmoeForCausalLM")}


def make_moe_model(family: str = "mixtral", seed: int = 0, **overrides):
    """8 experts, top-2, 2 layers, hidden 64; every weight random (the router's at a scale that
    makes routing decisive, so no near-ties flip an expert between two implementations)."""
    import transformers
    config_cls, model_cls = (getattr(transformers, n) for n in FAMILIES[family])
    kwargs = dict(vocab_size=256, hidden_size=64, intermediate_size=64, moe_intermediate_size=32,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=512, rms_norm_eps=1e-5, tie_word_embeddings=False,
                  num_local_experts=8, num_experts=8, num_experts_per_tok=2,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
    kwargs.update(overrides)
    kwargs["head_dim"] = overrides.get("head_dim", kwargs["hidden_size"] // kwargs["num_attention_heads"])
    torch.manual_seed(seed)
    model = model_cls(config_cls(**kwargs)).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 0.5 if name.endswith("gate.weight") else 0.05
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else scale * torch.randn_like(p))
    return model


def write_mixtral_gguf(model, path: Path, qtype: str = "F32") -> Path:
    """Mixtral as llama.cpp writes it: arch llama, expert_count / expert_used_count, the router as
    `ffn_gate_inp` and each projection's experts stacked in one [E, rows, cols] tensor."""
    import gguf
    cfg = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_vocab_size(cfg.vocab_size)
    w.add_expert_count(cfg.num_local_experts)
    w.add_expert_used_count(cfg.num_experts_per_tok)
    w.add_bos_token_id(cfg.bos_token_id)
    w.add_eos_token_id(cfg.eos_token_id)
    qt = gguf.GGMLQuantizationType[qtype]

    def add(name: str, a: np.ndarray) -> None:
        a = np.ascontiguousarray(a, dtype=np.float32)
        if a.ndim >= 2 and qtype != "F32":
            w.add_tensor(name, gguf.quants.quantize(a, qt), raw_dtype=qt)
        else:
            w.add_tensor(name, a)

    for name, t in model.state_dict().items():
        a = t.float().numpy()
        base, kind = name.rsplit(".", 1)
        if not base.startswith("model.layers."):
            add(f"{GGUF_NAMES[base]}.{kind}", a)
            continue
        _, _, i, sub = base.split(".", 3)
        if sub == "mlp.gate":  # the router
            add(f"blk.{i}.ffn_gate_inp.weight", a)
        elif sub == "mlp.experts":  # transformers holds them stacked: gate_up_proj [E, 2I, H], down_proj [E, H, I]
            if kind == "gate_up_proj":
                gate, up = np.split(a, 2, axis=1)
                add(f"blk.{i}.ffn_gate_exps.weight", gate)
                add(f"blk.{i}.ffn_up_exps.weight", up)
            else:
                add(f"blk.{i}.ffn_down_exps.weight", a)
        else:
            gname = f"blk.{i}.{GGUF_NAMES[sub]}.{kind}"
            if gname.endswith(("attn_q.weight", "attn_k.weight")):
                heads = cfg.num_attention_heads if "attn_q" in gname else cfg.num_key_value_heads
                a = _permute_rope_rows(a, heads)
            add(gname, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
