"""The one entry point: kvserve generate | chat | serve | index | rag | bench."""
import argparse
import sys

from kvserve.model.loader import ModelLoadError
from kvserve.process import tune_malloc


def add_engine_args(p: argparse.ArgumentParser, positional_model: bool = True) -> None:
    model_help = "GGUF file or Hugging Face directory (default: the packaged SmolLM2-135M-Instruct)"
    if positional_model:
        p.add_argument("model", nargs="?", default=None, help=model_help)
    else:
        p.add_argument("--model", default=None, help=model_help)
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="activations and KV cache; auto = bfloat16 where the hardware has it, else float32")
    p.add_argument("--quantization", default="auto", choices=["auto", "none", "int8", "int4"],
                   help="weights held quantized in memory (CPU); auto = the GGUF's own (4-bit -> int4, "
                        "other quantized types -> int8), none for float checkpoints and other devices")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decoder: faster steps after a compile of ~1 min at the first requests")
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--kv-cache-gb", type=float, default=None, help="KV cache size (default: from free memory)")
    p.add_argument("--num-pages", type=int, default=None, help="KV cache size in pages (overrides --kv-cache-gb)")
    p.add_argument("--max-num-batched-tokens", type=int, default=2048, help="token budget of one step")
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--no-prefix-caching", action="store_true")
    p.add_argument("--attention", type=_attention_arg, default="full",
                   help="default decode attention: full | streaming | magicpig | topk, optionally with "
                        "parameters, e.g. magicpig:K=10,L=150,sink=4,window=64 or a JSON object")


def _attention_arg(value: str):
    from kvserve.attention.policy import parse_attention
    try:
        return parse_attention(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def engine_config(args):
    from kvserve.config import CacheConfig, EngineConfig, SchedulerConfig
    return EngineConfig(
        model=args.model, dtype=args.dtype, quantization=args.quantization, device=args.device,
        threads=args.threads, compile=args.compile, attention=args.attention,
        cache=CacheConfig(args.page_size, args.num_pages, args.kv_cache_gb, not args.no_prefix_caching),
        scheduler=SchedulerConfig(args.max_num_batched_tokens, args.max_num_seqs))


def add_sampling_args(p: argparse.ArgumentParser, max_tokens: int) -> None:
    p.add_argument("--max-tokens", type=int, default=max_tokens)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=-1)
    p.add_argument("--seed", type=int, default=None)


def sampling_params(args):
    from kvserve.engine.request import SamplingParams
    return SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                          seed=args.seed, max_tokens=args.max_tokens)


def cmd_generate(args) -> int:
    from kvserve.engine.engine import Engine
    from kvserve.llm import LLM
    llm = LLM(engine=Engine(engine_config(args)))
    params = sampling_params(args)
    if args.raw or not llm.tokenizer.chat_template:
        out = llm.generate(args.prompt, params, use_tqdm=False)
    else:
        out = llm.chat([{"role": "user", "content": args.prompt}], params, use_tqdm=False)
    print(out[0].outputs[0].text)
    return 0


def cmd_chat(args) -> int:
    from kvserve.engine.engine import Engine
    engine = Engine(engine_config(args))
    tok = engine.tokenizer
    messages = [{"role": "system", "content": args.system}] if args.system else []
    print("kvserve chat: type a message, Ctrl-D or /exit to quit, /reset to start over.", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return 0
        if line.strip() == "/exit":
            return 0
        if line.strip() == "/reset":
            messages = messages[:1] if args.system else []
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        rid = engine.add_request(prompt, sampling_params(args))
        shown = ""
        try:
            while engine.has_unfinished():
                for out in engine.step():
                    text = out.outputs[0].text
                    print(text[len(shown):], end="", flush=True)
                    shown = text
        except KeyboardInterrupt:
            engine.abort(rid)
        print()
        messages.append({"role": "assistant", "content": shown})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvserve", description="LLM inference and serving engine")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("generate", help="complete one prompt and print the answer")
    p.add_argument("prompt")
    p.add_argument("--raw", action="store_true", help="plain completion, no chat template")
    add_engine_args(p, positional_model=False)
    add_sampling_args(p, max_tokens=128)
    p.set_defaults(func=cmd_generate)
    p = sub.add_parser("chat", help="interactive chat that streams tokens")
    add_engine_args(p)
    add_sampling_args(p, max_tokens=512)
    p.add_argument("--system", default=None, help="system prompt")
    p.set_defaults(func=cmd_chat)
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server")
    add_engine_args(p)
    from kvserve.server import launch
    launch.add_args(p)
    p.set_defaults(func=launch.main)
    from kvserve.rag import commands as rag_commands
    index = sub.add_parser("index", help="RAG collections: build from documents, list")
    rag_commands.add_index_args(index.add_subparsers(dest="index", required=True))
    rag = sub.add_parser("rag", help="retrieval-augmented answers from a collection")
    p = rag.add_subparsers(dest="rag", required=True).add_parser("ask", help="answer one question from a collection")
    rag_commands.add_ask_args(p)
    add_engine_args(p, positional_model=False)
    p.set_defaults(func=rag_commands.cmd_ask)
    bench = sub.add_parser("bench", help="benchmarks that run a peer engine beside kvserve")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    from kvserve.bench import latency, longctx, rag as bench_rag, throughput
    for name, module, help_text, positional_model in (
            ("throughput", throughput, "offline batch throughput vs transformers or vLLM", True),
            ("latency", latency, "single-stream decode, prompt processing, TTFT and RSS vs llama.cpp", True),
            ("rag", bench_rag, "HyDE RAG latency with lookahead prefetching on vs off", False),
            ("longctx", longctx, "decode cost of each attention policy at 2k-32k contexts", True)):
        p = bench_sub.add_parser(name, help=help_text)
        add_engine_args(p, positional_model=positional_model)
        module.add_args(p)
        p.set_defaults(func=module.main)
    p = bench_sub.add_parser("serve", help="load generator for any OpenAI-compatible server")
    from kvserve.bench import serve as bench_serve
    bench_serve.add_args(p)
    p.set_defaults(func=bench_serve.main)
    from kvserve.bench import fuzz_gguf, soak
    for name, module, help_text in (("fuzz-gguf", fuzz_gguf, "corrupted GGUF files against the loader"),
                                    ("soak", soak, "long mixed traffic with faults against a running server")):
        p = bench_sub.add_parser(name, help=help_text)
        module.add_args(p)
        p.set_defaults(func=module.main)
    ev = sub.add_parser("eval", help="quality evaluations on the real model")
    ev_sub = ev.add_subparsers(dest="eval", required=True)
    p = ev_sub.add_parser("longctx", help="passkey retrieval, agreement and perplexity of each attention policy")
    add_engine_args(p)
    from kvserve.eval import longctx as eval_longctx
    eval_longctx.add_args(p)
    p.set_defaults(func=eval_longctx.main)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    tune_malloc()
    try:
        return args.func(args)
    except ModelLoadError as e:
        print(f"kvserve: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
