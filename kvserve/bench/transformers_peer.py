"""The transformers peer: the checkpoint's weights in a plain transformers model, same dtype.

Loaded through kvserve's own loader (GGUF dequantized), so both engines run the same dense
weights; transformers' GGUF path would instead keep them packed and compute in float32."""
import time

import torch

from kvserve.bench.common import ThroughputResult
from kvserve.bench.floor import synchronize
from kvserve.config import ModelConfig

HF_ARCHITECTURE = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}


def hf_config_dict(cfg: ModelConfig, dtype: torch.dtype) -> dict:
    """A transformers config.json for a kvserve ModelConfig."""
    return {
        "architectures": [HF_ARCHITECTURE[cfg.architecture]],
        "model_type": cfg.architecture,
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim, "rms_norm_eps": cfg.rms_norm_eps, "rope_theta": cfg.rope_theta,
        "rope_scaling": cfg.rope_scaling, "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings, "attention_bias": cfg.attention_bias,
        "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_ids[0] if cfg.eos_token_ids else None,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def load_transformers_model(model: str | None, dtype: torch.dtype, device="cpu", random_weights: str | None = None,
                            seed: int = 0):  # seed 0: EngineConfig's default
    """The checkpoint's weights, or the same random weights kvserve made (same shape, seed and device)."""
    import transformers
    if random_weights:
        from kvserve.model.random_weights import RandomWeights, shape_config
        cfg = shape_config(random_weights)
        weights = RandomWeights(cfg, dtype, device, seed)
    else:
        from kvserve.model.loader import load_checkpoint
        cfg, weights = load_checkpoint(model)
    config = transformers.AutoConfig.for_model(**hf_config_dict(cfg, dtype))
    with torch.device(device):  # initialised where it runs: a CPU init of 8B parameters takes minutes
        hf = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    params = dict(hf.named_parameters())
    with torch.no_grad():
        for name in weights:  # one tensor at a time
            if name in params:
                params[name].copy_(weights[name])
    if cfg.tie_word_embeddings:
        hf.tie_weights()
    return hf.to(dtype).eval()


def run_transformers(args, prompts, dtype: torch.dtype, device="cpu") -> ThroughputResult:
    from tqdm import tqdm
    model = load_transformers_model(args.model, dtype, device, args.random_weights)
    out_tokens = 0
    start = time.perf_counter()
    for i in tqdm(range(0, len(prompts), args.peer_batch_size), desc="transformers generate", unit="batch"):
        batch = prompts[i:i + args.peer_batch_size]
        width = max(map(len, batch))  # left padding, as generate() expects
        ids = torch.tensor([[0] * (width - len(p)) + p for p in batch], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=device)
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=args.output_len,
                                 min_new_tokens=args.output_len, do_sample=False, pad_token_id=0)
        out_tokens += (out.shape[1] - width) * len(batch)
    synchronize(device)
    return ThroughputResult(f"transformers generate (bs {args.peer_batch_size})", len(prompts),
                            sum(map(len, prompts)), out_tokens, time.perf_counter() - start)
