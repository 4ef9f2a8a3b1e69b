"""A GGUF checkpoint's config and tensor list checked against each other before anything is
built: every config number that sizes an allocation (layers, widths, vocabulary, context) must be
sane and borne out by tensors that exist in the file with exactly the shapes it implies, so a
hostile header cannot make the model allocate what the file does not hold."""
import math

MAX_CONTEXT = 1 << 20  # positions: the rotary table is built for all of them at load


class CheckpointError(ValueError):
    pass


def check_config(cfg, num_tensors: int) -> None:
    sizes = {"embedding_length": cfg.hidden_size, "feed_forward_length": cfg.intermediate_size,
             "block_count": cfg.num_layers, "attention.head_count": cfg.num_heads,
             "attention.head_count_kv": cfg.num_kv_heads, "attention.key_length": cfg.head_dim,
             "vocab_size": cfg.vocab_size, "context_length": cfg.max_position_embeddings}
    for key, value in sizes.items():
        if value < 1:
            raise CheckpointError(f"{key} must be >= 1, got {value}")
    if cfg.num_layers > num_tensors:
        raise CheckpointError(f"block_count {cfg.num_layers} is more than the file's {num_tensors} tensors")
    if cfg.num_heads % cfg.num_kv_heads or cfg.head_dim % 2:
        raise CheckpointError(f"{cfg.num_heads} heads, {cfg.num_kv_heads} KV heads and head size {cfg.head_dim} "
                              f"do not fit (heads a multiple of KV heads, an even head size)")
    if cfg.num_experts and not (1 <= cfg.num_experts_per_tok <= cfg.num_experts and cfg.moe_intermediate_size >= 1):
        raise CheckpointError(f"expert_used_count {cfg.num_experts_per_tok} must be 1 to expert_count "
                              f"{cfg.num_experts}, with an expert width >= 1 (got {cfg.moe_intermediate_size})")
    if cfg.max_position_embeddings > MAX_CONTEXT:
        raise CheckpointError(f"context_length {cfg.max_position_embeddings} is above {MAX_CONTEXT}")
    for key, value in (("rope.freq_base", cfg.rope_theta), ("attention.layer_norm_rms_epsilon", cfg.rms_norm_eps),
                       ("rope.scaling.factor", (cfg.rope_scaling or {}).get("factor", 1.0))):
        if not (math.isfinite(value) and value > 0):
            raise CheckpointError(f"{key} must be a positive number, got {value}")
    if cfg.rotary_dim < 2 or cfg.rotary_dim % 2 or cfg.rotary_dim > cfg.head_dim:
        raise CheckpointError(f"rope.dimension_count {cfg.rotary_dim} must be even and within the head size")
    if cfg.sliding_window is not None and cfg.sliding_window < 1:
        raise CheckpointError(f"attention.sliding_window must be >= 1, got {cfg.sliding_window}")
    if cfg.layer_types is not None and len(cfg.layer_types) != cfg.num_layers:
        raise CheckpointError(f"attention.sliding_window_pattern has {len(cfg.layer_types)} layers, not {cfg.num_layers}")
    for key, value in (("attn_logit_softcapping", cfg.attn_softcap), ("final_logit_softcapping", cfg.final_softcap)):
        if value is not None and not (math.isfinite(value) and value > 0):
            raise CheckpointError(f"{key} must be a positive number, got {value}")
    for tid in [cfg.bos_token_id, *cfg.eos_token_ids]:
        if tid is not None and not (type(tid) is int and 0 <= tid < cfg.vocab_size):
            raise CheckpointError(f"special token id {tid!r} is not in [0, {cfg.vocab_size})")


def expected_shapes(cfg) -> tuple[dict[str, tuple], dict[str, tuple]]:
    """GGUF tensor name -> shape (outermost first) that the model needs, and those it may have."""
    d, h, kv = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    ff = cfg.intermediate_size
    required = {"token_embd.weight": (cfg.vocab_size, d), "output_norm.weight": (d,)}
    optional = {"output.weight": (cfg.vocab_size, d), "rope_freqs.weight": (cfg.rotary_dim // 2,)}
    if cfg.architecture == "phi3":
        optional |= {"rope_factors_long.weight": (cfg.rotary_dim // 2,), "rope_factors_short.weight": (cfg.rotary_dim // 2,)}
    for i in range(cfg.num_layers):
        b = f"blk.{i}."
        required |= {b + "attn_norm.weight": (d,), b + "ffn_norm.weight": (d,), b + "attn_output.weight": (d, h)}
        if cfg.architecture == "phi3":  # q/k/v and gate/up fused
            required |= {b + "attn_qkv.weight": (h + 2 * kv, d), b + "ffn_up.weight": (2 * ff, d),
                         b + "ffn_down.weight": (d, ff)}
        else:
            required |= {b + "attn_q.weight": (h, d), b + "attn_k.weight": (kv, d), b + "attn_v.weight": (kv, d)}
        if cfg.num_experts:  # the router, and each projection's experts stacked
            e, ffe = cfg.num_experts, cfg.moe_intermediate_size
            required |= {b + "ffn_gate_inp.weight": (e, d), b + "ffn_gate_exps.weight": (e, ffe, d),
                         b + "ffn_up_exps.weight": (e, ffe, d), b + "ffn_down_exps.weight": (e, d, ffe)}
        elif cfg.architecture != "phi3":
            required |= {b + "ffn_gate.weight": (ff, d), b + "ffn_up.weight": (ff, d), b + "ffn_down.weight": (d, ff)}
        if cfg.qk_norm is not None:
            per_head = cfg.qk_norm == "head"
            required |= {b + "attn_q_norm.weight": (cfg.head_dim if per_head else h,),
                         b + "attn_k_norm.weight": (cfg.head_dim if per_head else kv,)}
        if cfg.architecture in ("gemma2", "gemma3"):
            required |= {b + "post_attention_norm.weight": (d,), b + "post_ffw_norm.weight": (d,)}
        optional |= {b + "attn_q.bias": (h,), b + "attn_k.bias": (kv,), b + "attn_v.bias": (kv,),
                     b + "attn_output.bias": (d,)}
    return required, optional


def check_tensors(cfg, tensors) -> None:
    """tensors: GGUFTensors (shape innermost first). Missing, unknown or misshapen -> error."""
    required, optional = expected_shapes(cfg)
    present = {}
    for t in tensors:
        shape = tuple(reversed(t.shape))
        want = required.get(t.name, optional.get(t.name))
        if want is None:
            raise CheckpointError(f"unexpected tensor {t.name!r} for a {cfg.num_layers}-layer model")
        if shape != want:
            raise CheckpointError(f"tensor {t.name} has shape {list(shape)}, the config implies {list(want)}")
        present[t.name] = t
    missing = sorted(set(required) - set(present))
    if missing:
        raise CheckpointError(f"the file lacks {len(missing)} tensors the config needs, e.g. {missing[0]}")
