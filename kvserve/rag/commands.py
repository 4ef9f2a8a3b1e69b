"""The terminal side of RAG: `kvserve index build|list` and `kvserve rag ask`."""
import argparse
import asyncio
import sys

from kvserve.args import at_least_one


def add_index_args(sub) -> None:
    p = sub.add_parser("build", help="chunk, embed and cluster documents into a collection (adds to an existing one)")
    p.add_argument("docs", nargs="+", help=".txt, .md or .jsonl files (a 'text' field per line), or folders of them")
    p.add_argument("--collection", required=True)
    p.add_argument("--dir", default=None, help="index folder (default: ~/.kvserve/index)")
    p.add_argument("--rebuild", action="store_true", help="train the clusters anew instead of keeping the centroids")
    p.add_argument("--nlist", type=at_least_one, default=None, help="clusters (default: about 4 sqrt(chunks))")
    p.add_argument("--chunk-words", type=at_least_one, default=120)
    p.add_argument("--overlap", type=int, default=30, help="words shared by neighbouring chunks")
    p.add_argument("--batch-size", type=at_least_one, default=64, help="chunks per embedding batch")
    p.add_argument("--embedder", default="minilm", help="minilm (all-MiniLM-L6-v2) or hash-DIM (no weights, tests)")
    p.set_defaults(func=cmd_build)
    p = sub.add_parser("list", help="collections in the index folder")
    p.add_argument("--dir", default=None)
    p.set_defaults(func=cmd_list)


def cmd_build(args) -> int:
    from kvserve.rag.builder import build_collection
    from kvserve.rag.embedder import make_embedder
    from kvserve.rag.index_store import check_name
    try:
        check_name(args.collection)
        existing = _existing_embedder(args.dir, args.collection)
        embedder = make_embedder(existing or args.embedder)
        meta = build_collection(args.docs, args.collection, args.dir, embedder, rebuild=args.rebuild, nlist=args.nlist,
                                chunk_words=args.chunk_words, overlap=args.overlap, batch_size=args.batch_size)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"kvserve: error: {e}", file=sys.stderr)
        return 2
    skipped = f" ({meta['skipped']} already in it skipped)" if meta["skipped"] else ""
    print(f"{args.collection}: {meta['added']} chunks added{skipped}, {meta['num_chunks']} in {meta['nlist']} "
          f"clusters ({meta['embedder']})")
    return 0


def _existing_embedder(root, name) -> str | None:
    import json

    from kvserve.rag.index_store import index_dir
    meta = index_dir(root) / name / "meta.json"
    return json.loads(meta.read_text())["embedder"] if meta.is_file() else None


def cmd_list(args) -> int:
    from kvserve.rag.index_store import IndexStore, index_dir, list_collections
    if not index_dir(args.dir).is_dir():
        print(f"kvserve: no index folder at {index_dir(args.dir)} (`kvserve index build` makes one)", file=sys.stderr)
        return 0 if args.dir is None else 2
    for name in list_collections(args.dir):
        store = IndexStore(index_dir(args.dir) / name)
        print(f"{name}\t{store.num_chunks} chunks\t{store.nlist} clusters\t{store.meta['embedder']}")
        store.close()
    return 0


def _question(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("the question is empty")
    return text


def add_ask_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("question", type=_question)
    p.add_argument("--collection", required=True)
    p.add_argument("--dir", default=None, help="index folder (default: ~/.kvserve/index)")
    p.add_argument("--pipeline", choices=["plain", "hyde"], default="hyde")
    p.add_argument("--top-k", type=at_least_one, default=3)
    p.add_argument("--nprobe", type=at_least_one, default=8)
    p.add_argument("--prefetch-nprobe", type=at_least_one, default=16)
    p.add_argument("--no-lookahead", action="store_true")
    p.add_argument("--cache-mb", type=float, default=256.0)
    p.add_argument("--max-tokens", type=at_least_one, default=256)


def cmd_ask(args) -> int:
    from kvserve import process
    from kvserve.args import engine_config
    from kvserve.engine.async_engine import AsyncEngine
    from kvserve.engine.engine import Engine
    from kvserve.rag.collections import CollectionNotFound, CollectionRegistry
    registry = CollectionRegistry(args.dir, int(args.cache_mb * 2**20))
    try:
        coll = registry.get(args.collection)
    except CollectionNotFound:
        print(f"kvserve: error: no collection {args.collection!r} in {registry.root} "
              f"(have: {', '.join(registry.names()) or 'none'})", file=sys.stderr)
        return 2
    engine = AsyncEngine(Engine(engine_config(args)))
    process.release_openmp_workers()  # the engine thread decodes; this one waits (2x faster decoding)
    try:
        answer, got = asyncio.run(_ask(engine, coll, args))
    finally:
        engine.shutdown()
    print(answer)
    print("\nSources:")
    for i, c in enumerate(got.chunks, 1):
        print(f"[{i}] {c['source']} (chunk {c['id']}, score {c['score']:.3f})")
    return 0


async def _ask(engine, coll, args):
    from kvserve.rag.pipeline import RagOptions, engine_generate, retrieve, with_context
    generate = engine_generate(engine, engine.engine.tokenizer)
    opts = RagOptions(top_k=args.top_k, pipeline=args.pipeline, lookahead=not args.no_lookahead,
                      nprobe=args.nprobe, prefetch_nprobe=args.prefetch_nprobe)
    got = await retrieve(coll, args.question, opts, generate)
    answer = await generate(with_context([{"role": "user", "content": args.question}], got.chunks), args.max_tokens)
    return answer, got
