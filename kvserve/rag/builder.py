"""`kvserve index build`: documents -> chunks -> embeddings -> IVF clusters -> a new collection
version on disk. Adding to an existing collection keeps its centroids (the new chunks go to
their nearest cluster, no re-embedding of the old ones); --rebuild trains the clusters anew."""
import math
import sys
from pathlib import Path

import numpy as np

from kvserve.rag.chunking import chunk_documents, read_documents
from kvserve.rag.embedder import embed_in_batches
from kvserve.rag.index_store import IndexStore, check_name, index_dir, write_collection


def _faiss():
    try:
        import faiss
    except ImportError:
        raise RuntimeError("building an index needs faiss: pip install 'kvserve[rag]'") from None
    return faiss


def default_nlist(n: int) -> int:
    """About 4 sqrt(N) clusters (the usual IVF rule), but at least 8 rows each so k-means is sane."""
    return max(1, min(int(4 * math.sqrt(n)), n // 8))


def train_centroids(vectors: np.ndarray, nlist: int, seed: int = 0, max_train: int = 256, progress: bool = True):
    """Spherical k-means (faiss) on at most max_train rows per cluster."""
    faiss = _faiss()
    n, dim = vectors.shape
    nlist = max(1, min(nlist, n))
    rng = np.random.default_rng(seed)
    take = min(n, nlist * max_train)
    sample = vectors[np.sort(rng.choice(n, take, replace=False))] if take < n else vectors
    if progress:
        print(f"training {nlist} clusters on {take} vectors", file=sys.stderr)
    km = faiss.Kmeans(dim, nlist, niter=20, seed=seed, spherical=True, min_points_per_centroid=1,
                      max_points_per_centroid=max_train)
    km.train(np.ascontiguousarray(sample, np.float32))
    return km.centroids.astype(np.float32)


def assign_clusters(vectors: np.ndarray, centroids: np.ndarray, progress: bool = True) -> np.ndarray:
    from tqdm import tqdm
    faiss = _faiss()
    index = faiss.IndexFlatIP(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids, np.float32))
    out = np.empty(len(vectors), np.int64)
    block = 65536
    with tqdm(total=len(vectors), desc="assigning", unit="row", file=sys.stderr, disable=not progress) as bar:
        for s in range(0, len(vectors), block):
            _, nearest = index.search(np.ascontiguousarray(vectors[s:s + block], np.float32), 1)
            out[s:s + block] = nearest[:, 0]
            bar.update(min(block, len(vectors) - s))
    return out


def build_collection(paths: list[str | Path], name: str, root: str | Path | None, embedder, *,
                     rebuild: bool = False, nlist: int | None = None, chunk_words: int = 120, overlap: int = 30,
                     batch_size: int = 64, progress: bool = True) -> dict:
    """Adds the documents under `paths` to collection `name` (creating it); returns its metadata."""
    check_name(name)
    root = index_dir(root)
    chunks = chunk_documents(read_documents(paths), chunk_words, overlap)
    if not chunks:
        raise ValueError("no text found in the given documents")
    old_vecs, old_chunks, centroids = _existing(root / name, embedder.name)
    # a document indexed again adds nothing: its chunks would come back twice, taking answer slots
    seen = set(old_chunks)
    new_chunks = [k for k in ((c.source, c.text) for c in chunks) if k not in seen and not seen.add(k)]
    skipped = len(chunks) - len(new_chunks)
    if not new_chunks and not rebuild:
        return {"num_chunks": len(old_vecs), "nlist": len(centroids), "added": 0, "skipped": skipped,
                "embedder": embedder.name}
    if new_chunks:
        new_vecs = embed_in_batches(embedder, [text for _, text in new_chunks], batch_size, progress)
        vectors = np.concatenate([old_vecs, new_vecs]) if len(old_vecs) else new_vecs
    else:
        vectors = old_vecs
    all_chunks = old_chunks + new_chunks
    if centroids is None or rebuild:
        centroids = train_centroids(vectors, nlist or default_nlist(len(vectors)), progress=progress)
    assign = assign_clusters(vectors, centroids, progress)
    meta = {"embedder": embedder.name, "chunk_words": chunk_words, "overlap": overlap}
    write_collection(root, name, vectors, assign, centroids, all_chunks, meta, progress)
    return meta | {"num_chunks": len(vectors), "nlist": len(centroids), "added": len(new_chunks), "skipped": skipped}


def _existing(path: Path, embedder_name: str):
    """Vectors (in chunk id order), chunks and centroids of the current version, if any."""
    if not (path / "meta.json").is_file():
        return np.zeros((0, 0), np.float32), [], None
    store = IndexStore(path)
    try:
        if store.meta["embedder"] != embedder_name:
            raise ValueError(f"collection {path.name} was built with {store.meta['embedder']}, not {embedder_name}")
        rows, ids = store.all_vectors()
        vectors = np.empty((store.num_chunks, store.dim), np.float32)
        vectors[np.asarray(ids)] = rows
        chunks = [(c["source"], c["text"]) for c in map(store.chunks.get, range(store.num_chunks))]
        return vectors, chunks, store.centroids.copy()
    finally:
        store.close()
