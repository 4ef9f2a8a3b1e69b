"""Command-line flags shared by the subcommands, and the configs built from them.

Below every subcommand module (bench, eval, rag, server) so that each imports downward;
`kvserve.cli` only assembles the parser tree and dispatches."""
import argparse
import os


def add_engine_args(p: argparse.ArgumentParser, positional_model: bool = True) -> None:
    model_help = "GGUF file or Hugging Face directory (default: the packaged SmolLM2-135M-Instruct)"
    if positional_model:  # `serve MODEL` or `serve --model MODEL`, as vLLM takes either
        p.add_argument("model", nargs="?", default=None, action=_ModelOnce, metavar="MODEL", help=model_help)
        model_help = "the same as MODEL"
    p.add_argument("--model", default=None, action=_ModelOnce, help=model_help)
    p.add_argument("--random-weights", default=None, choices=["llama-1b", "llama-8b", "qwen2-7b", "tiny"],
                   help="instead of a model file: random weights of this shape, made on the device")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="activations and KV cache; auto = bfloat16 where the hardware has it, else float32")
    p.add_argument("--quantization", default="auto", choices=["auto", "none", "int8", "int4"],
                   help="weights held quantized in memory (CPU); auto = the GGUF's own (4-bit -> int4, "
                        "other quantized types -> int8), none for float checkpoints and other devices")
    p.add_argument("--device", type=_device_arg, default="auto",
                   help="cpu, cuda, cuda:N; auto = cuda where a GPU is visible, else cpu")
    p.add_argument("--threads", type=at_least_one, default=None, help="torch intra-op threads")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decoder: faster steps after a compile of ~1 min at the first requests")
    p.add_argument("--enforce-eager", action="store_true",
                   help="CUDA: run every step op by op instead of replaying CUDA graphs for decode steps")
    p.add_argument("--overlap-schedule", action=argparse.BooleanOptionalAction, default=None,
                   help="schedule and launch each step before the previous one's tokens reach the host, hiding "
                        "the host's work behind the device's (default: on for a GPU, off for the CPU)")
    p.add_argument("--page-size", type=at_least_one, default=16)
    p.add_argument("--kv-cache-gb", type=positive, default=None, help="KV cache size (default: from free memory)")
    p.add_argument("--num-pages", type=at_least_one, default=None,
                   help="KV cache size in pages (overrides --kv-cache-gb)")
    p.add_argument("--max-num-batched-tokens", type=at_least_one, default=2048, help="token budget of one step")
    p.add_argument("--max-num-seqs", type=at_least_one, default=64)
    p.add_argument("--no-prefix-caching", action="store_true")
    p.add_argument("--tensor-parallel-size", "-tp", type=at_least_one, default=None,
                   help="ranks sharing each layer: spawned on this machine (gloo on CPUs, NCCL where every rank "
                        "has a GPU), or the processes of torchrun (default there: its WORLD_SIZE; else 1)")
    p.add_argument("--attention", type=_attention_arg, default="full",
                   help="default decode attention: full | streaming | magicpig | topk, optionally with "
                        "parameters, e.g. magicpig:K=10,L=150,sink=4,window=64 or a JSON object; "
                        "magicpig:offload=true keeps the sampled layers' K/V in CPU memory, attended by the CPU")
    p.add_argument("--offload-kv-gb", type=positive, default=None,
                   help="CPU memory for offloaded MagicPIG K/V (default: half the available RAM, at most 64)")
    p.add_argument("--speculative", default=None, choices=["ngram", "self", "draft"],
                   help="speculative decoding: ngram = prompt lookup, self = the model over a streaming "
                        "view of its KV (long contexts), draft = --speculative-model; off for large batches")
    p.add_argument("--num-speculative-tokens", type=at_least_one, default=4, help="draft tokens per step")
    p.add_argument("--speculative-model", default=None,
                   help="--speculative draft: a smaller model with the same vocabulary (GGUF or HF directory)")
    p.add_argument("--speculative-window", type=at_least_one, default=1024,
                   help="--speculative self: tokens the draft passes attend to (4 sink tokens + the window)")


class _ModelOnce(argparse.Action):
    """MODEL or --model: an absent MODEL leaves --model's value alone; both given is an error."""

    def __call__(self, parser, namespace, values, option_string=None):
        if values is None:
            return
        if getattr(namespace, self.dest, None) not in (None, values):
            parser.error("give the model once: as MODEL or as --model")
        setattr(namespace, self.dest, values)


def _attention_arg(value: str):
    from kvserve.attention.policy import parse_attention
    try:
        return parse_attention(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def engine_config(args):
    from kvserve.config import CacheConfig, EngineConfig, SchedulerConfig
    return EngineConfig(
        model=args.model, random_weights=args.random_weights, dtype=args.dtype, quantization=args.quantization, device=args.device,
        threads=args.threads, compile=args.compile, enforce_eager=args.enforce_eager,
        overlap_schedule=args.overlap_schedule, attention=args.attention,
        tensor_parallel_size=args.tensor_parallel_size or int(os.environ.get("WORLD_SIZE", "1")),
        speculative=args.speculative, num_speculative_tokens=args.num_speculative_tokens,
        speculative_model=args.speculative_model, speculative_window=args.speculative_window,
        cache=CacheConfig(args.page_size, args.num_pages, args.kv_cache_gb, not args.no_prefix_caching,
                          offload_kv_gb=args.offload_kv_gb),
        scheduler=SchedulerConfig(args.max_num_batched_tokens, args.max_num_seqs))


def add_sampling_args(p: argparse.ArgumentParser, max_tokens: int) -> None:
    p.add_argument("--max-tokens", type=at_least_one, default=max_tokens)
    p.add_argument("--temperature", type=non_negative, default=0.0)
    p.add_argument("--top-p", type=_probability, default=1.0, help="in (0, 1]")
    p.add_argument("--top-k", type=int, default=-1)
    p.add_argument("--seed", type=int, default=None)


def sampling_params(args):
    from kvserve.engine.request import SamplingParams
    return SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                          seed=args.seed, max_tokens=args.max_tokens)


def at_least_one(value: str) -> int:
    """argparse type of counts such as --rounds"""
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n


def positive(value: str) -> float:
    """argparse type of sizes such as --kv-cache-gb"""
    x = float(value)
    if not x > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return x


def non_negative(value: str) -> float:
    """argparse type of amounts where 0 means none, such as --burst-every"""
    x = float(value)
    if not x >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return x


def _probability(value: str) -> float:
    x = float(value)
    if not 0 < x <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value}")
    return x


def _device_arg(value: str) -> str:
    from kvserve.config import check_device
    try:
        return check_device(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("device: ")) from None


def token_lengths(value: str) -> list[int]:
    """argparse type of comma-separated context lengths such as --lengths ('' for none)"""
    try:
        return [at_least_one(x) for x in value.split(",") if x]
    except (ValueError, argparse.ArgumentTypeError):
        raise argparse.ArgumentTypeError(f"must be comma-separated counts >= 1, got {value!r}") from None
