"""The hardware floor of a workload: the time it cannot beat on this device, from peak matmul
FLOP/s and copy bandwidth measured here, not taken from a datasheet."""
import time
from dataclasses import dataclass

import torch

from kvserve.config import ModelConfig


@dataclass
class Peaks:
    flops: float  # dense matmul FLOP/s in the model's dtype
    bytes_per_s: float  # device-memory copy bandwidth (read + write)


def synchronize(device) -> None:
    """Waits for a GPU's queued work, so a timer read after it covers that work; no-op on the CPU."""
    if str(device).startswith("cuda"):
        torch.cuda.synchronize(device)


def _time(fn, device, repeat: int) -> float:
    fn()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / repeat


def measure_peaks(device, dtype: torch.dtype) -> Peaks:
    gpu = str(device).startswith("cuda")
    n = 8192 if gpu else 1024
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    flops = 2 * n ** 3 / _time(lambda: a @ b, device, 20 if gpu else 3)
    src = torch.empty((2**29 if gpu else 2**26) // 4, dtype=torch.float32, device=device)  # 512 or 64 MiB
    dst = torch.empty_like(src)
    bandwidth = 2 * src.numel() * 4 / _time(lambda: dst.copy_(src), device, 20 if gpu else 3)
    return Peaks(flops, bandwidth)


def _layer_params(cfg: ModelConfig) -> int:
    """Weights of one decoder layer's linear layers (q, k, v, o, gate, up, down)."""
    h, d = cfg.hidden_size, cfg.head_dim
    return h * (cfg.num_heads + 2 * cfg.num_kv_heads) * d + cfg.num_heads * d * h + 3 * h * cfg.intermediate_size


def weight_bytes(cfg: ModelConfig, dtype: torch.dtype) -> int:
    vocab = cfg.vocab_size * cfg.hidden_size * (1 if cfg.tie_word_embeddings else 2)
    return (cfg.num_layers * _layer_params(cfg) + vocab) * torch.finfo(dtype).bits // 8


def matmul_flops_per_token(cfg: ModelConfig) -> int:
    """Linear layers and the lm_head (the embedding lookup is free)."""
    return 2 * (cfg.num_layers * _layer_params(cfg) + cfg.vocab_size * cfg.hidden_size)


def batch_floor(cfg: ModelConfig, dtype: torch.dtype, num_prompts: int, input_len: int, output_len: int,
                max_batch: int, peaks: Peaks) -> float:
    """Seconds: every token's matmuls at peak FLOP/s, or the weights and the KV cache read once per
    decode step at peak bandwidth (whichever bounds a step), plus attention's reads."""
    width = torch.finfo(dtype).bits // 8
    kv_per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * width
    total = 0.0
    for start in range(0, num_prompts, max_batch):
        batch = min(max_batch, num_prompts - start)
        total += batch * input_len * matmul_flops_per_token(cfg) / peaks.flops  # prefill
        for step in range(output_len - 1):
            compute = batch * matmul_flops_per_token(cfg) / peaks.flops
            memory = (weight_bytes(cfg, dtype) + batch * (input_len + step) * kv_per_token) / peaks.bytes_per_s
            total += max(compute, memory)
    return total


def token_floor(cfg: ModelConfig, dtype: torch.dtype, peaks: Peaks) -> float:
    """Seconds per output token of one stream: the weights read once at the copy's rate of bytes
    moved (read plus written); the KV of a short context is negligible beside them."""
    return weight_bytes(cfg, dtype) / peaks.bytes_per_s
