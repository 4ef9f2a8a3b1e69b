"""Corrupted GGUF files: each loads or gives ModelLoadError, within a second, with bounded memory.
CI runs 1000 cases (~10 s); KVSERVE_FUZZ_CASES=10000 (or `kvserve bench fuzz-gguf --cases 10000`)
runs more."""
import os
import struct

import pytest

from kvserve.bench.fuzz_gguf import load, run, write_seed
from kvserve.model.loader import ModelLoadError


def test_fuzzed_gguf_files_give_model_load_error_or_load():
    report = run(int(os.environ.get("KVSERVE_FUZZ_CASES", 1000)), seed=int(os.environ.get("KVSERVE_FUZZ_SEED", 0)),
                 hang_seconds=5.0)
    assert report["num_crashes"] == 0, report["crashes"]
    assert report["outcomes"].get("ModelLoadError", 0) > report["cases"] // 2  # the mutations do bite
    assert report["slowest_s"][0][0] < 1.0, report["slowest_s"]
    assert report["peak_rss_growth_mib"] < 200


@pytest.mark.parametrize("offset,value,message", [
    (8, 2**63, "tensors cannot fit"),  # n_tensors
    (16, 2**64 - 1, "metadata entries cannot fit"),  # n_fields
    (24, 2**62, "string bytes cannot fit"),  # the first key's length
])
def test_huge_counts_are_refused_before_any_allocation(tmp_path, offset, value, message):
    seed = tmp_path / "seed.gguf"
    write_seed(seed)
    data = bytearray(seed.read_bytes())
    data[offset:offset + 8] = struct.pack("<Q", value)
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(bytes(data))
    with pytest.raises(ModelLoadError, match=message):
        load(bad)


def test_duplicate_and_missing_tensors_are_reported(tmp_path):
    seed = tmp_path / "seed.gguf"
    write_seed(seed)
    data = seed.read_bytes()
    # renaming one tensor to another's name: a duplicate; to an unknown name: unexpected (and missing)
    dup = data.replace(b"blk.1.ffn_up.weight", b"blk.1.attn_q.weight", 1)
    assert len(dup) == len(data)
    (tmp_path / "dup.gguf").write_bytes(dup)
    with pytest.raises(ModelLoadError, match="appears twice"):
        load(tmp_path / "dup.gguf")
    (tmp_path / "odd.gguf").write_bytes(data.replace(b"blk.1.ffn_up.weight", b"blk.1.ffn_xx.weight", 1))
    with pytest.raises(ModelLoadError, match="unexpected tensor"):
        load(tmp_path / "odd.gguf")
    (tmp_path / "short.gguf").write_bytes(data[:-100])
    with pytest.raises(ModelLoadError, match="run past the end"):
        load(tmp_path / "short.gguf")


def test_a_huge_token_does_not_make_merge_derivation_quadratic():
    import time
    from kvserve.model.tokenizer import _merges_from_scores
    start = time.perf_counter()
    merges = _merges_from_scores(["a", "b", "ab", "a" * 300_000], [0.0, -1.0, -2.0, -3.0])
    assert merges == [("a", "b")] and time.perf_counter() - start < 1.0
