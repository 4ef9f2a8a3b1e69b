"""Plain dataclasses passed between stages; no behaviour beyond defaults and checks."""
from dataclasses import dataclass, field


@dataclass
class ModelConfig:
    """What the decoder needs to know about a checkpoint, whatever file it came from."""
    architecture: str  # "llama" | "mistral" | "qwen2" | "mixtral"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    # mixture of experts (model/moe.py); 0 experts: every layer has a dense MLP
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0  # each expert's intermediate width
    norm_topk_prob: bool = True  # renormalise the chosen experts' softmax weights to sum to 1


@dataclass
class CacheConfig:
    page_size: int = 16
    num_pages: int | None = None  # None: derived from kv_cache_gb
    kv_cache_gb: float | None = None  # None: a share of free memory
    enable_prefix_caching: bool = True
    # MagicPIG with offload (the engine's default attention): CPU memory for the sampled layers' K/V
    offload_pages: int | None = None  # None: derived from offload_kv_gb
    offload_kv_gb: float | None = None  # None: half the available RAM, at most 64 GiB


@dataclass
class SchedulerConfig:
    max_num_batched_tokens: int = 2048  # per step: all decodes plus prefill chunks up to this
    max_num_seqs: int = 64
    enable_chunked_prefill: bool = True


@dataclass
class EngineConfig:
    model: str | None = None  # path; None = the packaged SmolLM2
    random_weights: str | None = None  # a shape of kvserve.model.random_weights.SHAPES instead of a file
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    quantization: str = "auto"  # auto (a GGUF's own) | none | int8 | int4; weight-only, CPU
    device: str = "auto"  # auto: CUDA where a GPU is visible, else the CPU
    threads: int | None = None
    compile: bool = False  # torch.compile the decoder (CPU); the first steps compile it
    enforce_eager: bool = False  # CUDA: no graphs, every step runs op by op
    seed: int = 0
    attention: object = "full"  # default decode attention policy (kvserve.attention.policy)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    tensor_parallel_size: int = 1  # ranks sharing each layer (kvserve.distributed)
