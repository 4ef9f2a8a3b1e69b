"""Plain dataclasses passed between stages; no behaviour beyond defaults and checks."""
from dataclasses import dataclass, field


@dataclass
class ModelConfig:
    """What the decoder needs to know about a checkpoint, whatever file it came from."""
    architecture: str  # "llama" | "mistral" | "qwen2"
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


@dataclass
class CacheConfig:
    page_size: int = 16
    num_pages: int | None = None  # None: derived from kv_cache_gb
    kv_cache_gb: float | None = None  # None: a share of free memory
    enable_prefix_caching: bool = True


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
    speculative: str | None = None  # ngram | self | draft (kvserve.engine.spec); None: off
    num_speculative_tokens: int = 4  # draft tokens per step and sequence
    speculative_model: str | None = None  # draft: the smaller model's path
    speculative_window: int = 1024  # self: the streaming view's window (sink 4), in tokens
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
