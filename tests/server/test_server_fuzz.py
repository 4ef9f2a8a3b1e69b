"""schemathesis fuzzes every endpoint from the app's own OpenAPI schema, valid and invalid bodies
alike, for a bounded number of cases: no input may cause a 5xx. It runs in-process (ASGI) on an
app sharing the suite's engine, with limits small enough that valid cases generate little."""
import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from server_util import wait_idle


@pytest.fixture(scope="module")
def fuzz_schema(server_engine):
    from kvserve.server.app import build_app
    from kvserve.server.serving import ServerConfig
    engine, async_engine = server_engine
    app = build_app(async_engine, ServerConfig(model_name="tiny", max_tokens_limit=4, max_n=2, max_prompts=4,
                                               max_body_bytes=16 * 1024), shutdown_engine=False)
    yield schemathesis.openapi.from_asgi("/openapi.json", app)
    wait_idle(engine)
    engine.kv.check_integrity([])


schema = schemathesis.pytest.from_fixture("fuzz_schema")


@schema.parametrize()
@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
def test_no_server_errors(case):
    response = case.call()
    assert response.status_code < 500, (case.body, response.text)
    if response.status_code >= 400:
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}
