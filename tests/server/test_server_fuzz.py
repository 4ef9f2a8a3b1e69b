"""schemathesis fuzzes the endpoints from the app's own OpenAPI schema, with valid and invalid
inputs, for a bounded number of cases: no input may cause a 5xx, and every error is an OpenAI
error object. It runs in-process (ASGI) on an app sharing the suite's engine, with limits small
enough that valid cases generate little. (schemathesis' pytest plugin does not run on this
pytest, so its strategies drive a plain hypothesis test.)"""
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient

from server_util import wait_idle

VALID, INVALID = schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE
# (a string path parameter has no invalid values, so the model card gets valid ones only)
OPERATIONS = [(method, path, mode) for method, path in [("POST", "/v1/chat/completions"), ("POST", "/v1/completions"),
                                                        ("POST", "/tokenize"), ("POST", "/detokenize")]
              for mode in (VALID, INVALID)] + [("GET", "/v1/models/{model_id}", VALID)]
EXAMPLES = {"POST": 80, "GET": 10}


@pytest.fixture(scope="module")
def fuzz_app(server_engine):
    from kvserve.server.app import build_app
    from kvserve.server.serving import ServerConfig
    engine, async_engine = server_engine
    yield build_app(async_engine, ServerConfig(model_name="tiny", max_tokens_limit=4, max_n=2, max_prompts=4,
                                               max_body_bytes=16 * 1024), shutdown_engine=False)
    wait_idle(engine)
    engine.kv.check_integrity([])


@pytest.fixture(scope="module")
def fuzz_schema(fuzz_app):
    return schemathesis.openapi.from_asgi("/openapi.json", fuzz_app)


def _served_model(case):
    """A random model name is a 404 before anything else is looked at; name the served one so
    that the rest of the body gets fuzzed."""
    if isinstance(case.body, dict) and isinstance(case.body.get("model"), str):
        case.body["model"] = "tiny"
    return case


@pytest.mark.parametrize("method,path,mode", OPERATIONS, ids=[f"{m} {p} {g.value}" for m, p, g in OPERATIONS])
def test_no_server_errors(fuzz_schema, method, path, mode):
    operation = fuzz_schema[path][method]

    @given(case=operation.as_strategy(mode).map(_served_model))
    @settings(max_examples=EXAMPLES[method], deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    def check(case):
        response = case.call()
        assert response.status_code < 500, (case.body, response.text)
        if response.status_code >= 400:
            assert set(response.json()["error"]) == {"message", "type", "param", "code"}, response.text

    check()


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                    max_leaves=6)
GOOD = {"/v1/chat/completions": {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2},
         "/v1/completions": {"model": "tiny", "prompt": "Hi", "max_tokens": 2}}


@pytest.mark.parametrize("path", list(GOOD))
def test_valid_bodies_with_one_field_replaced(fuzz_app, path):
    """Closer to what clients get wrong than random bodies: one known field set to any JSON value."""
    client = TestClient(fuzz_app)
    fields = ["messages", "prompt", "max_tokens", "n", "temperature", "top_p", "stop", "logit_bias", "seed",
              "logprobs", "top_logprobs", "stream", "stream_options", "echo", "top_k", "min_p", "stop_token_ids",
              "min_tokens", "presence_penalty", "repetition_penalty", "response_format", "user", "best_of"]

    @given(field=st.sampled_from(fields), value=JSON)
    @settings(max_examples=80, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    def check(field, value):
        response = client.post(path, json=GOOD[path] | {field: value})
        assert response.status_code < 500, (field, value, response.text)
        if response.status_code != 200:
            assert set(response.json()["error"]) == {"message", "type", "param", "code"}, response.text

    check()

