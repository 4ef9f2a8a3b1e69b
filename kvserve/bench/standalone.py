"""The benchmarks a bare GPU host can run (torch, triton and transformers only, no server stack):
`python -m kvserve.bench.standalone throughput --device cuda --random-weights llama-8b`, the same
arguments as `kvserve bench ...`, without importing the server and RAG modules that kvserve's full
command line does."""
import argparse
import importlib
import sys

from kvserve.args import add_engine_args

MODULES = {"throughput": True, "latency": True, "profile": True, "overhead": None, "attention": None}
FILES = {"profile": "step_profile"}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvserve.bench.standalone")
    sub = parser.add_subparsers(dest="bench", required=True)
    for name, engine_args in MODULES.items():
        module = importlib.import_module(f"kvserve.bench.{FILES.get(name, name)}")
        p = sub.add_parser(name)
        if engine_args:
            add_engine_args(p)
        module.add_args(p)
        p.set_defaults(func=module.main)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
