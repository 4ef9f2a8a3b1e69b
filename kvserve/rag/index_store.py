"""An IVF index on disk, one folder per collection version:

    meta.json        embedder name, dim, number of clusters and chunks
    centroids.npy    (nlist, dim) float32, the coarse quantizer
    offsets.npy      (nlist + 1,) int64: cluster c holds rows offsets[c]:offsets[c+1]
    vectors.f32      (N, dim) float32, raw, rows grouped by cluster: one cluster = one contiguous read
    ids.i64          (N,) int64, the chunk id of each row, same order
    chunks.jsonl     one {"source", "text"} per chunk id; chunk_offsets.npy gives each line's byte offset

`index_dir/NAME` is a symlink to the current version folder `.NAME.<pid>-<random>`. A build writes a
new folder and then replaces the link in one rename, so a crash mid-build leaves the previous
index as it was; readers that opened the old version keep their file descriptors.
"""
import json
import os
import re
import shutil
import sys
import uuid
import weakref
from collections.abc import Iterable
from pathlib import Path

import numpy as np

DEFAULT_INDEX_DIR = "~/.kvserve/index"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


def index_dir(path: str | Path | None) -> Path:
    return Path(path or DEFAULT_INDEX_DIR).expanduser()


def check_name(name: str) -> str:
    if not NAME_RE.fullmatch(name):
        raise ValueError(f"collection name {name!r}: use letters, digits, '_', '-', '.' (not first), at most 128")
    return name


def list_collections(root: str | Path | None) -> list[str]:
    root = index_dir(root)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if not p.name.startswith(".") and (p / "meta.json").is_file())


class IndexStore:
    """Read side of one collection version: cluster reads by `pread`, which releases the GIL,
    so a thread pool reads several missed clusters at once."""

    def __init__(self, path: str | Path):
        self.path = Path(path).resolve()  # pin the version: a rebuild swaps the link, not our files
        self.meta = json.loads((self.path / "meta.json").read_text())
        self.dim, self.num_chunks = self.meta["dim"], self.meta["num_chunks"]
        self.centroids = np.load(self.path / "centroids.npy")
        self.offsets = np.load(self.path / "offsets.npy")
        self.nlist = len(self.centroids)
        self._vec_fd = os.open(self.path / "vectors.f32", os.O_RDONLY)
        self._ids_fd = os.open(self.path / "ids.i64", os.O_RDONLY)
        # a version replaced by a rebuild is dropped, not closed (searches may still run on it):
        # its descriptors go when the last of them lets go
        self._release = weakref.finalize(self, _close_all, self._vec_fd, self._ids_fd)
        self.chunks = ChunkStore(self.path)

    def cluster_rows(self, c: int) -> int:
        return int(self.offsets[c + 1] - self.offsets[c])

    def cluster_bytes(self, c: int) -> int:
        return self.cluster_rows(c) * (self.dim * 4 + 8)

    @property
    def total_bytes(self) -> int:
        return self.num_chunks * (self.dim * 4 + 8)

    def read_cluster(self, c: int) -> tuple[np.ndarray, np.ndarray]:
        start, n = int(self.offsets[c]), self.cluster_rows(c)
        row = self.dim * 4
        vecs = np.frombuffer(_pread_all(self._vec_fd, n * row, start * row), np.float32).reshape(n, self.dim)
        ids = np.frombuffer(_pread_all(self._ids_fd, n * 8, start * 8), np.int64)
        return vecs, ids

    def all_vectors(self) -> tuple[np.memmap, np.memmap]:
        """Every row (cluster order) and its chunk id, memory-mapped: for exact search and rebuilds."""
        vecs = np.memmap(self.path / "vectors.f32", np.float32, "r", shape=(self.num_chunks, self.dim))
        ids = np.memmap(self.path / "ids.i64", np.int64, "r", shape=(self.num_chunks,))
        return vecs, ids

    def drop_page_cache(self) -> None:
        """Asks the OS to forget the cached pages of the vector files, so the next miss is a real
        disk read (benchmarks: otherwise 'disk' is RAM and prefetching looks useless)."""
        for fd in (self._vec_fd, self._ids_fd):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)

    def close(self) -> None:
        self._release()
        self.chunks.close()


class ChunkStore:
    def __init__(self, path: Path):
        self.offsets = np.load(path / "chunk_offsets.npy")
        self._fd = os.open(path / "chunks.jsonl", os.O_RDONLY)
        self.close = weakref.finalize(self, os.close, self._fd)  # called or collected: closed once

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def get(self, chunk_id: int) -> dict:
        start, end = int(self.offsets[chunk_id]), int(self.offsets[chunk_id + 1])
        return json.loads(_pread_all(self._fd, end - start, start))


def _close_all(*fds: int) -> None:
    for fd in fds:
        os.close(fd)


def _pread_all(fd: int, n: int, offset: int) -> bytes:
    parts, done = [], 0
    while done < n:
        b = os.pread(fd, n - done, offset + done)
        if not b:
            raise IOError(f"index file truncated at byte {offset + done}")
        parts.append(b)
        done += len(b)
    return b"".join(parts) if len(parts) != 1 else parts[0]


def _remove_crashed_builds(root: Path, name: str) -> None:
    """Leftovers of builds whose process is gone (the pid is in the name); a build still
    running in another process is left alone."""
    current = (root / name).resolve() if (root / name).is_symlink() else None
    for p in root.glob(f".{name}.*-*"):
        pid = p.name[len(name) + 2:].split("-", 1)[0]
        if not pid.isdigit() or p.resolve() == current or _alive(int(pid)):
            continue
        if p.is_symlink():
            p.unlink()
        else:
            shutil.rmtree(p, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_collection(root: str | Path, name: str, vectors: np.ndarray, assign: np.ndarray, centroids: np.ndarray,
                     chunks: Iterable[tuple[str, str]], meta: dict, progress: bool = True) -> Path:
    """Writes a new version of `name` (rows = chunk ids 0..N-1, `assign` = cluster of each row)
    and makes it current by an atomic symlink swap; returns the collection path."""
    from tqdm import tqdm
    root = index_dir(root)
    check_name(name)
    root.mkdir(parents=True, exist_ok=True)
    n, dim = vectors.shape
    _remove_crashed_builds(root, name)
    tmp = root / f".{name}.{os.getpid()}-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()
    try:
        nlist = len(centroids)
        order = np.argsort(assign, kind="stable")
        offsets = np.zeros(nlist + 1, np.int64)
        offsets[1:] = np.cumsum(np.bincount(assign, minlength=nlist))
        np.save(tmp / "centroids.npy", np.ascontiguousarray(centroids, np.float32))
        np.save(tmp / "offsets.npy", offsets)
        order.astype(np.int64).tofile(tmp / "ids.i64")
        block = 65536
        with open(tmp / "vectors.f32", "wb") as f, \
                tqdm(total=n, desc="writing vectors", unit="row", file=sys.stderr, disable=not progress) as bar:
            for s in range(0, n, block):
                f.write(np.ascontiguousarray(vectors[order[s:s + block]], np.float32).tobytes())
                bar.update(min(block, n - s))
            f.flush()
            os.fsync(f.fileno())
        line_offsets = np.zeros(n + 1, np.int64)
        written = count = 0
        with open(tmp / "chunks.jsonl", "wb") as f:
            for source, text in chunks:
                if count == n:
                    raise ValueError(f"more chunks than the {n} vectors")
                line = json.dumps({"source": source, "text": text}, ensure_ascii=False).encode() + b"\n"
                f.write(line)
                written += len(line)
                count += 1
                line_offsets[count] = written
        if count != n:
            raise ValueError(f"{count} chunks for {n} vectors")
        np.save(tmp / "chunk_offsets.npy", line_offsets)
        (tmp / "meta.json").write_text(json.dumps(meta | {"dim": dim, "nlist": nlist, "num_chunks": n}, indent=1))
        link, staged = root / name, root / f".{name}.{os.getpid()}-link"
        previous = link.resolve() if link.is_symlink() else None
        if link.exists() and not link.is_symlink():
            raise FileExistsError(f"{link} exists and is not a kvserve collection link")
        os.symlink(tmp.name, staged)
        os.replace(staged, link)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if previous is not None and previous != tmp.resolve():
        shutil.rmtree(previous, ignore_errors=True)  # open readers keep their descriptors
    return link
