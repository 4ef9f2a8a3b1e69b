"""Tiny collections for the RAG tests: a synthetic clustered set of vectors, and a few text
documents indexed with the hashing embedder (no weights to load)."""
from pathlib import Path

import numpy as np

DOCS = {
    "fruit.txt": "Apples and pears grow on trees in the orchard. The orchard keeper picks ripe apples in autumn. "
                 "Pears ripen after picking, stored in a cool cellar.",
    "space.md": "# Planets\nMars is the red planet with two small moons, Phobos and Deimos. Jupiter is the largest "
                "planet and has a great red spot, a storm bigger than Earth.",
    "cooking.jsonl": '{"text": "Bread needs flour, water, salt and yeast. Knead the dough and let it rise."}\n'
                     '{"text": "Pasta is boiled in salted water until al dente.", "source": "pasta-notes"}\n',
    "music.txt": "A violin has four strings tuned in fifths. The cello is larger and plays an octave lower "
                 "than the viola. Orchestras tune to the oboe's A.",
}


def write_docs(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in DOCS.items():
        (folder / name).write_text(text)
    return folder


def clustered(n: int, dim: int, centers: int, seed: int = 0, noise: float = 0.2):
    """Unit rows around `centers` random directions, and queries drawn the same way."""
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centers, dim)).astype(np.float32)
    c /= np.linalg.norm(c, axis=1, keepdims=True)

    def sample(m):
        x = c[rng.integers(0, centers, m)] + noise * rng.standard_normal((m, dim)).astype(np.float32) / np.sqrt(dim) * 4
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    return sample(n), sample(50)


def write_synthetic(root: Path, name: str, vectors: np.ndarray, nlist: int) -> Path:
    from kvserve.rag.builder import assign_clusters, train_centroids
    from kvserve.rag.index_store import write_collection
    centroids = train_centroids(vectors, nlist, progress=False)
    assign = assign_clusters(vectors, centroids, progress=False)
    chunks = ((f"synthetic-{i}", f"row {i}") for i in range(len(vectors)))
    return write_collection(root, name, vectors, assign, centroids, chunks, {"embedder": f"hash-{vectors.shape[1]}"},
                            progress=False)
