"""The benchmark's collection: this repository's own text (docs and source, embedded with
MiniLM) plus synthetic neighbours of those chunks up to the requested size. Synthetic rows are
noisy copies of real embeddings, so they crowd the same neighbourhoods the questions land in
and every probed cluster is full-sized, as in a large real corpus."""
import json
import sys
from pathlib import Path

import numpy as np

from kvserve.rag.builder import assign_clusters, train_centroids
from kvserve.rag.chunking import chunk_documents
from kvserve.rag.embedder import embed_in_batches
from kvserve.rag.index_store import write_collection

NOISE = 0.9  # relative to a unit vector: synthetic rows keep cos ~0.75 with their parent

QUESTIONS = [
    "How does kvserve share KV cache pages between requests with a common prefix?",
    "What is chunked prefill and why does the scheduler use a token budget?",
    "How are attention sinks used for long conversations?",
    "Which quantization formats can kvserve keep in memory?",
    "How does the server report errors to OpenAI clients?",
    "What does the page pool do when a request finishes?",
    "How is the page table laid out for the attention backends?",
    "How does MagicPIG sample keys with locality sensitive hashing?",
    "What happens when a client disconnects during streaming?",
    "How fast is llama.cpp on this machine compared with kvserve?",
    "How do I run the benchmark against vLLM?",
    "What does torch.compile change in the decoder?",
    "How is the tokenizer chat template applied?",
    "What is the default model and where does it come from?",
    "How does preemption work when the KV cache is full?",
    "How are logprobs returned in chat completions?",
    "What limits does the server put on max_tokens and n?",
    "How does the sampler apply temperature, top-p and penalties?",
    "Which models and architectures can be loaded from GGUF files?",
    "How does TeleRAG prefetch IVF clusters during generation?",
    "How are prometheus metrics exposed by the server?",
    "What is cascade attention for shared prefixes?",
    "How does the engine detokenize incrementally and check stop strings?",
    "How is the radix tree prefix cache evicted?",
]


def repo_documents(repo: Path) -> list[tuple[str, str]]:
    files = [repo / "README.md", repo / "BENCHMARKS.md", *sorted((repo / "docs").glob("*.md"))]
    files += sorted((repo / "kvserve").rglob("*.py"))
    return [(str(f.relative_to(repo.parent)), f.read_text(errors="replace")) for f in files if f.is_file()]


def build_bench_collection(root: Path, name: str, num_chunks: int, nlist: int, embedder, seed: int = 0) -> Path:
    """Builds (or reuses, when its parameters match) the collection; returns its path."""
    path = root / name
    want = {"bench": {"num_chunks": num_chunks, "nlist": nlist, "seed": seed, "noise": NOISE}}
    meta_file = path / "meta.json"
    if meta_file.is_file() and json.loads(meta_file.read_text()).get("bench") == want["bench"]:
        print(f"reusing the collection at {path}", file=sys.stderr)
        return path
    repo = Path(__file__).resolve().parents[2]
    chunks = chunk_documents(repo_documents(repo))
    real = embed_in_batches(embedder, [c.text for c in chunks])
    num_chunks = max(num_chunks, len(real))
    rng = np.random.default_rng(seed)
    vectors = np.empty((num_chunks, real.shape[1]), np.float32)
    vectors[:len(real)] = real
    parents = rng.integers(0, len(real), num_chunks - len(real))
    block = 65536
    from tqdm import tqdm
    with tqdm(total=num_chunks - len(real), desc="synthetic rows", unit="row", file=sys.stderr) as bar:
        for s in range(0, len(parents), block):
            p = parents[s:s + block]
            noise = rng.standard_normal((len(p), real.shape[1]), np.float32) * (NOISE / np.sqrt(real.shape[1]))
            rows = real[p] + noise
            vectors[len(real) + s:len(real) + s + len(p)] = rows / np.linalg.norm(rows, axis=1, keepdims=True)
            bar.update(len(p))
    centroids = train_centroids(vectors, nlist, seed, max_train=64)
    assign = assign_clusters(vectors, centroids)
    texts = ((c.source, c.text) for c in chunks)
    synthetic = ((f"synthetic (near chunk {int(j)})", "") for j in parents)
    meta = {"embedder": embedder.name} | want

    def all_chunks():
        yield from texts
        yield from synthetic
    return write_collection(root, name, vectors, assign, centroids, all_chunks(), meta)
