"""The one entry point: kvserve generate | chat | serve | index | rag | bench | eval.

Only assembles the parser tree from each subcommand's own add-arguments function and dispatches;
nothing in kvserve imports this module."""
import argparse
import sys

from kvserve import terminal
from kvserve.args import add_engine_args
from kvserve.bench import attention as bench_attention, kv_memory, latency, longctx, moe as bench_moe, overhead
from kvserve.bench import nanobatch
from kvserve.bench import rag as bench_rag
from kvserve.bench import serve as bench_serve, step_profile, structured, throughput
from kvserve.eval import longctx as eval_longctx
from kvserve.distributed.group import RankFailure
from kvserve.model.loader import ModelLoadError
from kvserve.process import tune_gc, tune_malloc
from kvserve.rag import commands as rag_commands
from kvserve.server import launch


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvserve", description="LLM inference and serving engine")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("generate", help="complete one prompt and print the answer")
    terminal.add_generate_args(p)
    p.set_defaults(func=terminal.cmd_generate)
    p = sub.add_parser("chat", help="interactive chat that streams tokens")
    terminal.add_chat_args(p)
    p.set_defaults(func=terminal.cmd_chat)
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server")
    add_engine_args(p)
    launch.add_args(p)
    p.set_defaults(func=launch.main)
    index = sub.add_parser("index", help="RAG collections: build from documents, list")
    rag_commands.add_index_args(index.add_subparsers(dest="index", required=True))
    rag = sub.add_parser("rag", help="retrieval-augmented answers from a collection")
    p = rag.add_subparsers(dest="rag", required=True).add_parser("ask", help="answer one question from a collection")
    rag_commands.add_ask_args(p)
    add_engine_args(p, positional_model=False)
    p.set_defaults(func=rag_commands.cmd_ask)
    bench = sub.add_parser("bench", help="benchmarks that run a peer engine beside kvserve")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    for name, module, help_text, positional_model in (
            ("throughput", throughput, "offline batch throughput vs transformers or vLLM", True),
            ("structured", structured, "JSON-schema-constrained batch vs the same batch unconstrained", True),
            ("latency", latency, "single-stream decode, prompt processing, TTFT and RSS vs llama.cpp", True),
            ("rag", bench_rag, "HyDE RAG latency with lookahead prefetching on vs off", False),
            ("longctx", longctx, "decode cost of each attention policy at 2k-32k contexts", True),
            ("kv-memory", kv_memory, "KV pages a long chat holds with sliding windows' pages given back vs kept", True),
            ("profile", step_profile, "where a decode step's time goes (GPU busy share, kernels)", True),
            ("nanobatch", nanobatch, "a decode step whole against in two halves on two CUDA streams", True)):
        p = bench_sub.add_parser(name, help=help_text)
        add_engine_args(p, positional_model=positional_model)
        module.add_args(p)
        p.set_defaults(func=module.main)
    from kvserve.bench import fuzz_gguf, soak
    for name, module, help_text in (  # no engine flags: no model, or a server's
            ("overhead", overhead, "host time per engine step over a null model, by stage"),
            ("attention", bench_attention, "Triton paged attention vs torch SDPA: decode GB/s, prefill TFLOP/s"),
            ("moe", bench_moe, "decode step of a mixture-of-experts model vs a dense one of the same active size"),
            ("serve", bench_serve, "load generator for any OpenAI-compatible server"),
            ("fuzz-gguf", fuzz_gguf, "corrupted GGUF files against the loader"),
            ("soak", soak, "long mixed traffic with faults against a running server")):
        p = bench_sub.add_parser(name, help=help_text)
        module.add_args(p)
        p.set_defaults(func=module.main)
    ev = sub.add_parser("eval", help="quality evaluations on the real model")
    ev_sub = ev.add_subparsers(dest="eval", required=True)
    p = ev_sub.add_parser("longctx", help="passkey retrieval, agreement and perplexity of each attention policy")
    add_engine_args(p)
    eval_longctx.add_args(p)
    p.set_defaults(func=eval_longctx.main)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    tune_malloc()
    tune_gc()
    try:
        return args.func(args)
    except (ModelLoadError, ValueError) as e:  # a model or settings that cannot run, a prompt that does not fit
        print(f"kvserve: error: {e}", file=sys.stderr)
        return 2
    except RankFailure as e:  # a tensor-parallel start-up that could not complete
        print(f"kvserve: error: {e}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
