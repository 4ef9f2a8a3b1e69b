"""kvserve's own GGUF parser reads what gguf-py's reader reads."""
import numpy as np
import pytest
from gguf import GGUFReader

from kvserve.model.gguf_file import GGUFFile
from tiny_models import make_hf_model, write_gguf


@pytest.fixture(params=["F32", "Q4_1", "Q8_0"])
def gguf_path(request, tmp_path):
    return write_gguf(make_hf_model("llama"), tmp_path / "tiny.gguf", request.param)


def test_metadata_and_tensors_match_gguf_py(gguf_path, smollm2_path):
    for path in (gguf_path, smollm2_path):
        ours, ref = GGUFFile(path), GGUFReader(path)
        expected = {k: f.contents() for k, f in ref.fields.items() if not k.startswith("GGUF.")}
        assert ours.fields == expected
        assert [t.name for t in ours.tensors] == [t.name for t in ref.tensors]
        for a, b in zip(ours.tensors, ref.tensors):
            assert a.shape == tuple(int(d) for d in b.shape) and a.tensor_type == b.tensor_type, a.name
            assert a.data.dtype == b.data.dtype and np.array_equal(a.data, b.data), a.name


def test_released_tensors_read_back_the_same(gguf_path):
    f = GGUFFile(gguf_path)
    before = [t.data.copy() for t in f.tensors]
    for t in f.tensors:
        f.release(t)
    assert all(np.array_equal(t.data, b) for t, b in zip(f.tensors, before))
