"""Plain dataclasses passed between stages; no behaviour beyond defaults and checks."""
from dataclasses import dataclass, field


@dataclass
class ModelConfig:
    """What the decoder needs to know about a checkpoint, whatever file it came from."""
    architecture: str  # "llama" | "mistral" | "qwen2" | "qwen3" | "gemma2" | "gemma3" | "phi3" | "mixtral"
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
    # per-family differences from Llama (defaults are Llama's)
    qk_norm: str | None = None  # RMSNorm of q and k before RoPE: "head" (over head_dim: Qwen3, Gemma 3)
    #                             or "full" (over all heads' q / k at once: OLMoE)
    hidden_act: str = "silu"  # of the gated MLP: "silu" or "gelu_tanh" (Gemma)
    partial_rotary_factor: float = 1.0  # share of each head's dims that RoPE rotates (the first ones)
    query_scale: float | None = None  # attention score scale; None: head_dim ** -0.5
    attn_softcap: float | None = None  # scores -> softcap * tanh(scores / softcap) (Gemma 2)
    final_softcap: float | None = None  # the same on the logits (Gemma 2)
    sliding_window: int | None = None  # W: a query at position p sees keys p-W+1..p (on its layers)
    layer_types: list[str] | None = None  # per layer "sliding_attention" | "full_attention";
    #                                       None: every layer slides when sliding_window is set
    rope_local_theta: float | None = None  # RoPE base of sliding layers (Gemma 3), unscaled

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    def is_sliding(self, layer: int) -> bool:
        if self.sliding_window is None:
            return False
        return self.layer_types is None or self.layer_types[layer] == "sliding_attention"

    def layer_windows(self) -> list[int | None]:
        """Per layer, the attention backends' `windows` argument: the window, or None for full."""
        return [self.sliding_window if self.is_sliding(i) else None for i in range(self.num_layers)]

    @property
    def attention_scale(self) -> float:
        return self.query_scale if self.query_scale is not None else self.head_dim ** -0.5


@dataclass
class CacheConfig:
    page_size: int = 16
    num_pages: int | None = None  # None: derived from kv_cache_gb
    kv_cache_gb: float | None = None  # None: a share of free memory
    enable_prefix_caching: bool = True
    # MagicPIG with offload (the engine's default attention): CPU memory for the sampled layers' K/V
    offload_pages: int | None = None  # None: derived from offload_kv_gb
    offload_kv_gb: float | None = None  # None: half the available RAM, at most 64 GiB

    def __post_init__(self):
        _at_least("page_size", self.page_size, 1)
        for name in ("num_pages", "offload_pages"):
            if getattr(self, name) is not None:
                _at_least(name, getattr(self, name), 1)
        for name in ("kv_cache_gb", "offload_kv_gb"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and value > 0):
                raise ValueError(f"{name} must be > 0, got {value!r}")


@dataclass
class SchedulerConfig:
    max_num_batched_tokens: int = 2048  # per step: all decodes plus prefill chunks up to this
    max_num_seqs: int = 64
    enable_chunked_prefill: bool = True

    def __post_init__(self):
        _at_least("max_num_batched_tokens", self.max_num_batched_tokens, 1)
        _at_least("max_num_seqs", self.max_num_seqs, 1)


def _at_least(name: str, value, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def check_device(device: str) -> str:
    """auto, cpu, cuda or cuda:N, refused when this machine has no such device."""
    if device == "auto":
        return device
    import torch
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError):
        d = None
    if d is None or d.type not in ("cpu", "cuda"):
        raise ValueError(f"device: expected auto, cpu, cuda or cuda:N, got {device!r}")
    if d.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device: no CUDA device here (a CPU build of torch, or no GPU visible)")
        if d.index is not None and d.index >= torch.cuda.device_count():
            raise ValueError(f"device {device}: this machine has {torch.cuda.device_count()} CUDA devices")
    return device


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
    overlap_schedule: bool | None = None  # launch step N+1 before step N's ids land (engine/overlap.py); None: on a GPU
    seed: int = 0
    max_model_len: int | None = None  # a context length below the model's own; None: the model's
    attention: object = "full"  # default decode attention policy (kvserve.attention.policy)
    speculative: str | None = None  # ngram | self | draft (kvserve.engine.spec); None: off
    num_speculative_tokens: int = 4  # draft tokens per step and sequence
    speculative_model: str | None = None  # draft: the smaller model's path
    speculative_window: int = 1024  # self: the streaming view's window (sink 4), in tokens
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    tensor_parallel_size: int = 1  # ranks sharing each layer (kvserve.distributed)

    def __post_init__(self):
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        check_device(self.device)
        _at_least("tensor_parallel_size", self.tensor_parallel_size, 1)
        _at_least("num_speculative_tokens", self.num_speculative_tokens, 1)
        if self.max_model_len is not None:
            _at_least("max_model_len", self.max_model_len, 2)
