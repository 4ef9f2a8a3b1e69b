"""The benchmarks a bare GPU host can run (torch, triton and transformers only, no server stack):
`python -m kvserve.bench.standalone throughput --device cuda --random-weights llama-8b`, the same
arguments as `kvserve bench ...`, without importing the server and RAG modules that kvserve's full
command line does."""
import argparse
import importlib
import sys

from kvserve.args import add_engine_args

MODULES = {"throughput": "throughput", "latency": "latency", "profile": "step_profile", "overhead": "overhead",
           "attention": "attention", "longctx": "longctx", "moe": "moe", "nanobatch": "nanobatch"}
WITH_ENGINE_ARGS = {"throughput", "latency", "profile", "longctx", "nanobatch"}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvserve.bench.standalone")
    sub = parser.add_subparsers(dest="bench", required=True)
    for name, file in MODULES.items():
        module = importlib.import_module(f"kvserve.bench.{file}")
        p = sub.add_parser(name)
        if name in WITH_ENGINE_ARGS:
            add_engine_args(p)
        module.add_args(p)
        p.set_defaults(func=module.main)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
