"""kvserve bench rag: HyDE RAG end to end (embed, HyDE passage, IVF retrieval, answer) with
TeleRAG's lookahead prefetching off and then on, over a collection four times the cache.

Between requests the vector file is dropped from the OS page cache (posix_fadvise DONTNEED), so
a cluster that is not in the cluster cache costs a real disk read: without that, 'disk' would be
RAM and prefetching could not show anything. Both runs start with an empty cluster cache and
ask the same questions, interleaved; the chunks each returns are compared, and recall@k is measured against
exact search (faiss IndexFlatIP) over every row."""
import argparse
import asyncio
import sys
import time
from pathlib import Path

import numpy as np


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--num-chunks", type=int, default=1_000_000, help="rows in the collection (real + synthetic)")
    p.add_argument("--nlist", type=int, default=None, help="IVF clusters (default: num_chunks / 1000)")
    p.add_argument("--nprobe", type=int, default=16)
    p.add_argument("--prefetch-nprobe", type=int, default=32)
    p.add_argument("--top-k", type=int, default=10, help="chunks retrieved (recall@k); the prompt gets the first 3")
    p.add_argument("--cache-fraction", type=float, default=0.25, help="cluster cache budget / index size")
    p.add_argument("--num-queries", type=int, default=24)
    p.add_argument("--concurrency", type=int, default=1, help="requests in flight at once")
    p.add_argument("--hyde-tokens", type=int, default=48)
    p.add_argument("--answer-tokens", type=int, default=32)
    p.add_argument("--index-dir", default="~/.cache/kvserve/bench-rag", help="where the collection is built (reused)")
    p.add_argument("--keep-page-cache", action="store_true", help="do not evict the index from the OS page cache")
    p.add_argument("--embedder", default="minilm", help="minilm, or hash-DIM for a run without the model weights")


def main(args) -> int:
    from kvserve.bench.rag_collection import QUESTIONS, build_bench_collection
    from kvserve import process
    from kvserve.args import engine_config
    from kvserve.engine.async_engine import AsyncEngine
    from kvserve.engine.engine import Engine
    from kvserve.rag.collections import CollectionRegistry
    from kvserve.rag.embedder import make_embedder

    root = Path(args.index_dir).expanduser()
    nlist = args.nlist or max(1, args.num_chunks // 1000)
    name = f"bench-{args.num_chunks}-{nlist}"
    embedder = make_embedder(args.embedder)
    build_bench_collection(root, name, args.num_chunks, nlist, embedder)
    questions = [QUESTIONS[i % len(QUESTIONS)] for i in range(args.num_queries)]
    args.no_prefix_caching = True  # both modes send the same prompts: the second must not get them cached
    engine = AsyncEngine(Engine(engine_config(args)))
    process.release_openmp_workers()  # the engine thread decodes; this one waits (2x faster decoding)
    try:
        registries = {mode: CollectionRegistry(root, 1, embedder_factory=lambda _: embedder) for mode in (False, True)}
        colls = {mode: r.get(name) for mode, r in registries.items()}
        store = colls[False].store
        budget = int(args.cache_fraction * store.total_bytes)
        for coll in colls.values():
            coll.cache.budget = coll.prefetcher.budget = budget
        print(f"collection: {store.num_chunks} chunks x {store.dim} dims, {store.nlist} clusters, "
              f"{store.total_bytes / 2**20:.0f} MiB on disk; cluster cache {budget / 2**20:.0f} MiB "
              f"({args.cache_fraction:.0%}); nprobe {args.nprobe}, prefetch_nprobe {args.prefetch_nprobe}, "
              f"top_k {args.top_k}; page cache {'kept' if args.keep_page_cache else 'dropped before each request'}")
        runs = asyncio.run(_run(engine, colls, questions, args))
        recall = _recall(store, runs[False], args.top_k)
    finally:
        engine.shutdown()
    _report(runs, recall, args)
    return 0


async def _run(engine, colls: dict, questions, args) -> dict:
    """Both modes over the same questions, interleaved batch by batch (which one goes first
    alternates), so that drift in the machine's speed falls on both alike."""
    from tqdm import tqdm

    from kvserve.rag.pipeline import RagOptions, engine_generate, retrieve, with_context
    generate = engine_generate(engine, engine.engine.tokenizer)
    await generate([{"role": "user", "content": "Hi"}], 4)  # warm-up
    results = {mode: [None] * len(questions) for mode in colls}
    walls = dict.fromkeys(colls, 0.0)

    async def one(i: int, question: str, lookahead: bool):
        coll = colls[lookahead]
        opts = RagOptions(top_k=args.top_k, pipeline="hyde", lookahead=lookahead, nprobe=args.nprobe,
                          prefetch_nprobe=args.prefetch_nprobe, hyde_max_tokens=args.hyde_tokens)
        start = time.perf_counter()
        got = await retrieve(coll, question, opts, generate)
        answer = time.perf_counter()
        await generate(with_context([{"role": "user", "content": question}], got.chunks[:3]), args.answer_tokens)
        got.timings["answer_s"] = time.perf_counter() - answer
        results[lookahead][i] = (time.perf_counter() - start, got)

    with tqdm(total=2 * len(questions), desc="requests (lookahead off and on)", unit="req", file=sys.stderr) as bar:
        for b, s in enumerate(range(0, len(questions), args.concurrency)):
            batch = list(enumerate(questions))[s:s + args.concurrency]
            for lookahead in ((False, True) if b % 2 == 0 else (True, False)):
                if not args.keep_page_cache:
                    colls[lookahead].store.drop_page_cache()
                wall = time.perf_counter()
                await asyncio.gather(*(one(i, q, lookahead) for i, q in batch))
                walls[lookahead] += time.perf_counter() - wall
                bar.update(len(batch))
    return {mode: {"latency": np.array([r[0] for r in res]), "wall": walls[mode], "cache": colls[mode].cache.stats(),
                   "search": np.array([r[1].timings["search_s"] for r in res]),
                   "stages": {k: np.array([r[1].timings[k] for r in res]) for k in ("embed_s", "hyde_s", "answer_s")},
                   "ids": [[c["id"] for c in r[1].chunks] for r in res],
                   "queries": np.stack([r[1].query for r in res])}
            for mode, res in results.items()}


def _recall(store, run: dict, k: int) -> float:
    from kvserve.rag.search import exact_search
    print("exact search (faiss IndexFlatIP) over every row for recall", file=sys.stderr)
    vectors, ids = store.all_vectors()
    exact = exact_search(vectors, ids, run["queries"], k)
    return float(np.mean([len(set(a) & set(b.tolist())) / k for a, b in zip(run["ids"], exact)]))


def _report(runs: dict, recall: float, args) -> None:
    print(f"\n{'lookahead':<11}{'p50 s':>8}{'p99 s':>8}{'mean s':>8}{'req/s':>8}{'hit rate':>10}"
          f"{'search p50 ms':>15}")
    for lookahead, r in runs.items():
        lat = r["latency"]
        print(f"{'on' if lookahead else 'off':<11}{np.percentile(lat, 50):>8.3f}{np.percentile(lat, 99):>8.3f}"
              f"{lat.mean():>8.3f}{len(lat) / r['wall']:>8.2f}{r['cache']['hit_rate']:>10.1%}"
              f"{1000 * np.percentile(r['search'], 50):>15.1f}")
    off, on = runs[False], runs[True]
    same = off["ids"] == on["ids"]
    print(f"lookahead speedup: p50 {np.percentile(off['latency'], 50) / np.percentile(on['latency'], 50):.2f}x, "
          f"p99 {np.percentile(off['latency'], 99) / np.percentile(on['latency'], 99):.2f}x, "
          f"throughput {off['wall'] / on['wall']:.2f}x, retrieval p50 "
          f"{np.percentile(off['search'], 50) / max(np.percentile(on['search'], 50), 1e-9):.2f}x")
    # lookahead can at best take the search off a request's path: the ceiling of its speedup
    p50 = {k: np.percentile(v, 50) for k, v in off["stages"].items()}
    lat, search = np.percentile(off["latency"], 50), np.percentile(off["search"], 50)
    print(f"a request without lookahead (p50): question embedded {1000 * p50['embed_s']:.0f} ms, HyDE passage "
          f"written and embedded {p50['hyde_s']:.2f} s, search {1000 * search:.0f} ms, answer {p50['answer_s']:.2f} s; "
          f"a search taking no time at all would make it {lat / max(lat - search, 1e-9):.2f}x faster")
    print(f"recall@{args.top_k} vs exact search at nprobe {args.nprobe}: {recall:.3f}; "
          f"same chunks with and without lookahead: {'yes' if same else 'NO'}")
