"""kvserve index build|list and rag ask from the terminal; bad input is one line and exit 2."""
import pytest

from cli_util import kvserve, kvserve_here
from rag_util import write_docs

pytest.importorskip("faiss")


def test_index_build_list_and_ask(tmp_path, smollm2_path):
    docs, index = write_docs(tmp_path / "docs"), str(tmp_path / "index")
    r = kvserve("index", "build", str(docs / "fruit.txt"), "--collection", "kb", "--dir", index,
                "--embedder", "hash-64", "--chunk-words", "12", "--overlap", "4")
    assert r.returncode == 0, r.stderr
    assert "kb:" in r.stdout and "embedding" in r.stderr  # the progress bar went to stderr
    r = kvserve("index", "build", str(docs), "--collection", "kb", "--dir", index, "--chunk-words", "12",
                "--overlap", "4")
    assert r.returncode == 0 and "hash-64" in r.stdout, r.stderr  # keeps the collection's embedder
    r = kvserve("index", "list", "--dir", index)
    assert r.stdout.startswith("kb\t")
    r = kvserve("rag", "ask", "Which planet has two moons?", "--collection", "kb", "--dir", index,
                "--max-tokens", "8", "--top-k", "2")
    assert r.returncode == 0, r.stderr
    assert "Sources:" in r.stdout and "space.md" in r.stdout


@pytest.mark.parametrize("args,message", [
    (["index", "build", "nope.txt", "--collection", "kb"], "no such file"),
    (["index", "build", "README.md", "--collection", "../kb"], "collection name"),
    (["rag", "ask", "q", "--collection", "missing"], "no collection"),
    (["rag", "ask", " ", "--collection", "kb"], "the question is empty"),
    (["rag", "ask", "q", "--collection", "kb", "--top-k", "0"], "must be >= 1"),
    (["index", "list", "--dir", "/nonexistent/kvserve-index"], "no index folder"),
])
def test_bad_input_is_one_line(tmp_path, args, message):
    r = kvserve_here(*args, *([] if "--dir" in args else ["--dir", str(tmp_path)]))
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr


def test_bench_rag_runs_small(tmp_path, smollm2_path):
    """The benchmark end to end at toy size (hashing embedder): it must keep working, not be fast."""
    r = kvserve("bench", "rag", "--num-chunks", "3000", "--nlist", "30", "--nprobe", "4", "--prefetch-nprobe", "8",
                "--num-queries", "3", "--hyde-tokens", "4", "--answer-tokens", "2", "--embedder", "hash-64",
                "--index-dir", str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert "lookahead speedup" in r.stdout and "same chunks with and without lookahead: yes" in r.stdout
    assert "recall@10" in r.stdout and "a search taking no time at all would make it" in r.stdout
