"""Bad input: each gets an OpenAI error object with the right status while a good streaming
request runs beside it and still finishes with the usage it asked for."""
import asyncio
import json

import httpx
import pytest

from server_util import API_KEY, MAX_BODY_BYTES, MAX_N, MAX_TOKENS_LIMIT, MODEL

USER = [{"role": "user", "content": "Hi"}]
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
GOOD_TOKENS = 48


def chat(**kw) -> dict:
    return {"model": MODEL, "messages": USER, "max_tokens": 4} | kw


def completion(**kw) -> dict:
    return {"model": MODEL, "prompt": "Hi", "max_tokens": 4} | kw


async def _chunked_large():
    for _ in range(MAX_BODY_BYTES // 1000 + 2):
        yield b" " * 1000


# id: (method, path, body: dict | bytes | callable, extra headers, status, param, code)
CASES = {
    "malformed json": ("POST", CHAT, b'{"model": "tiny", "messages": [', {}, 400, None, None),
    "body not an object": ("POST", CHAT, b"[1, 2]", {}, 400, None, None),
    "NaN": ("POST", CHAT, b'{"messages": [{"role": "user", "content": "Hi"}], "temperature": NaN}', {}, 400,
            "temperature", None),
    "invalid utf-8": ("POST", CHAT, b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}', {}, 400, None, None),
    "not json content type": ("POST", CHAT, b"hello", {"Content-Type": "text/plain"}, 400, None, None),
    "lone surrogate": ("POST", CHAT, b'{"messages": [{"role": "user", "content": "a\\ud800"}]}', {}, 400, "messages",
                       "invalid_value"),
    "lone surrogate in a prompt": ("POST", COMPLETIONS, b'{"prompt": ["ok", "a\\udc00b"], "max_tokens": 4}', {}, 400,
                                   "prompt", "invalid_value"),
    "max_tokens boolean": ("POST", CHAT, chat(max_tokens=True), {}, 400, "max_tokens", None),
    "stream not a boolean": ("POST", CHAT, chat(stream="yes"), {}, 400, "stream", None),
    "temperature as a string": ("POST", CHAT, chat(temperature="0.5"), {}, 400, "temperature", None),
    "messages wrong type": ("POST", CHAT, chat(messages="Hi"), {}, 400, "messages", None),
    "max_tokens wrong type": ("POST", CHAT, chat(max_tokens="many"), {}, 400, "max_tokens", None),
    "temperature wrong type": ("POST", CHAT, chat(temperature="hot"), {}, 400, "temperature", None),
    "temperature out of range": ("POST", CHAT, chat(temperature=5), {}, 400, "temperature", None),
    "unknown field": ("POST", CHAT, chat(foo=1), {}, 400, "foo", "unknown_parameter"),
    "unknown message field": ("POST", CHAT, chat(messages=[{"role": "user", "content": "Hi", "x": 1}]), {}, 400,
                              "messages", "unknown_parameter"),
    "image part": ("POST", CHAT, chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]),
                   {}, 400, "messages", None),
    "empty messages": ("POST", CHAT, chat(messages=[]), {}, 400, "messages", None),
    "bad role": ("POST", CHAT, chat(messages=[{"role": "robot", "content": "Hi"}]), {}, 400, "messages", None),
    "chat beyond context": ("POST", CHAT, chat(messages=[{"role": "user", "content": "word " * 2100}]), {}, 400,
                            "messages", "context_length_exceeded"),
    "prompt + max_tokens beyond context": ("POST", COMPLETIONS, completion(prompt=[100] * 2000, max_tokens=100), {},
                                           400, "prompt", "context_length_exceeded"),
    "n above limit": ("POST", CHAT, chat(n=MAX_N + 1), {}, 400, "n", None),
    "huge n": ("POST", CHAT, chat(n=10**30), {}, 400, "n", None),
    "max_tokens above limit": ("POST", CHAT, chat(max_tokens=MAX_TOKENS_LIMIT + 1), {}, 400, "max_tokens", None),
    "max_tokens zero": ("POST", COMPLETIONS, completion(max_tokens=0), {}, 400, "max_tokens", None),
    "logit_bias key not a number": ("POST", CHAT, chat(logit_bias={"abc": 1}), {}, 400, "logit_bias", None),
    "logit_bias key negative": ("POST", CHAT, chat(logit_bias={"-1": 1}), {}, 400, "logit_bias", None),
    "logit_bias key beyond vocab": ("POST", CHAT, chat(logit_bias={"49152": 1}), {}, 400, "logit_bias", None),
    "logit_bias value": ("POST", CHAT, chat(logit_bias={"5": 1000}), {}, 400, "logit_bias", None),
    "seed out of range": ("POST", CHAT, chat(seed=2**70), {}, 400, "seed", None),
    "empty stop": ("POST", CHAT, chat(stop=[""]), {}, 400, "stop", None),
    "stop_token_ids beyond vocab": ("POST", CHAT, chat(stop_token_ids=[10**6]), {}, 400, "stop_token_ids", None),
    "min_tokens above max_tokens": ("POST", CHAT, chat(min_tokens=10), {}, 400, None, None),
    "stream_options without stream": ("POST", CHAT, chat(stream_options={"include_usage": True}), {}, 400,
                                      "stream_options", None),
    "top_logprobs without logprobs": ("POST", CHAT, chat(top_logprobs=2), {}, 400, "top_logprobs", None),
    "top_logprobs too many": ("POST", CHAT, chat(logprobs=True, top_logprobs=21), {}, 400, "top_logprobs", None),
    "tools": ("POST", CHAT, chat(tools=[{"type": "function", "function": {"name": "f"}}]), {}, 400, "tools", None),
    "invalid json schema": ("POST", CHAT, chat(response_format={"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "nope"}}}), {}, 400, "response_format", "invalid_value"),
    "malformed regex": ("POST", COMPLETIONS, completion(structured_outputs={"regex": "[a-"}), {}, 400,
                        "structured_outputs", "invalid_value"),
    "malformed ebnf": ("POST", CHAT, chat(structured_outputs={"grammar": "root ::= ("}), {}, 400,
                       "structured_outputs", "invalid_value"),
    "unknown tool in tool_choice": ("POST", CHAT, chat(tools=[{"type": "function", "function": {"name": "f"}}],
                                                       tool_choice={"type": "function", "function": {"name": "g"}}),
                                    {}, 400, "tool_choice", "invalid_value"),
    "prompt token beyond vocab": ("POST", COMPLETIONS, completion(prompt=[1, 49152]), {}, 400, "prompt", None),
    "empty prompt": ("POST", COMPLETIONS, completion(prompt=""), {}, 400, "prompt", None),
    "empty prompt list": ("POST", COMPLETIONS, completion(prompt=[]), {}, 400, "prompt", None),
    "empty token list": ("POST", COMPLETIONS, completion(prompt=[[]]), {}, 400, "prompt", None),
    "mixed prompt list": ("POST", COMPLETIONS, completion(prompt=["a", 1]), {}, 400, "prompt", None),
    "suffix": ("POST", COMPLETIONS, completion(suffix="x"), {}, 400, "suffix", None),
    "body over the limit": ("POST", CHAT, chat(messages=[{"role": "user", "content": "a" * MAX_BODY_BYTES}]), {},
                            413, None, "request_too_large"),
    "chunked body over the limit": ("POST", CHAT, _chunked_large, {}, 413, None, "request_too_large"),
    "unknown model": ("POST", CHAT, chat(model="gpt-4"), {}, 404, "model", "model_not_found"),
    "unknown model card": ("GET", "/v1/models/gpt-4", None, {}, 404, "model", "model_not_found"),
    "missing api key": ("POST", CHAT, chat(), {"Authorization": ""}, 401, None, "invalid_api_key"),
    "wrong api key": ("POST", CHAT, chat(), {"Authorization": "Bearer nope"}, 401, None, "invalid_api_key"),
    "key check comes before the body": ("POST", CHAT, b"{", {"Authorization": "Bearer nope"}, 401, None,
                                        "invalid_api_key"),
    "unknown path": ("POST", "/v1/nope", chat(), {}, 404, None, None),
    "wrong method": ("GET", CHAT, None, {}, 405, None, None),
    "detokenize beyond vocab": ("POST", "/detokenize", {"tokens": [-1]}, {}, 400, "tokens", None),
    "tokenize neither": ("POST", "/tokenize", {}, {}, 400, "prompt", None),
    "unknown attention policy": ("POST", CHAT, chat(attention="sparse"), {}, 400, "attention", "invalid_value"),
    "attention parameter out of range": ("POST", COMPLETIONS, completion(attention={"policy": "magicpig", "K": 99}),
                                         {}, 400, "attention", "invalid_value"),
    "unknown attention parameter": ("POST", CHAT, chat(attention={"policy": "topk", "budget": 3}), {}, 400,
                                    "attention", "invalid_value"),
    "attention wrong type": ("POST", CHAT, chat(attention=[1]), {}, 400, "attention", None),
}


async def good_stream(client: httpx.AsyncClient, started: asyncio.Event) -> dict:
    body = chat(max_tokens=GOOD_TOKENS, stream=True, stream_options={"include_usage": True}, ignore_eos=True)
    usage, text = None, ""
    async with client.stream("POST", CHAT, json=body, headers={"Authorization": f"Bearer {API_KEY}"}) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            assert "error" not in event, event
            for c in event["choices"]:
                text += c["delta"].get("content") or ""
                started.set()
            usage = event.get("usage") or usage
    return usage


async def send_bad(client: httpx.AsyncClient, method, path, body, headers) -> httpx.Response:
    if callable(body):
        content = body()
    elif isinstance(body, bytes):
        content = body
    else:
        content = None if body is None else json.dumps(body).encode()
    hdrs = {"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"} | headers
    if hdrs.get("Authorization") == "":
        del hdrs["Authorization"]
    return await client.request(method, path, content=content, headers=hdrs)


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input(live_server, case):
    method, path, body, headers, status, param, code = CASES[case]

    async def run():
        async with httpx.AsyncClient(base_url=live_server.url, timeout=60) as c:
            started = asyncio.Event()
            good = asyncio.create_task(good_stream(c, started))
            await asyncio.wait_for(started.wait(), 30)
            r = await send_bad(c, method, path, body, headers)
            usage = await good
        return r, usage

    r, usage = asyncio.run(run())
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert error["type"] == ("server_error" if status >= 500 else "invalid_request_error")
    if param is not None:
        assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    assert usage["completion_tokens"] == GOOD_TOKENS


@pytest.mark.parametrize("prompt,message", [
    (5, "Invalid value for 'prompt': expected str or list[str] or list[int] or list[list[int]]"),
    (["a", [1, 2]], "Invalid value for 'prompt[1]': Input should be a valid string"),
    ([1, "a"], "Invalid value for 'prompt[1]': Input should be a valid integer")])
def test_a_value_of_no_accepted_type_is_named_plainly(http, prompt, message):
    """pydantic's per-type attempts (prompt.str, prompt.list[int] ...) come out as one message."""
    r = http.post(COMPLETIONS, json=completion(prompt=prompt))
    assert r.status_code == 400 and r.json()["error"]["message"] == message


def test_an_internal_error_is_a_500_that_keeps_the_connection(live_server, monkeypatch):
    """An unexpected exception gets an OpenAI error object, and the kept-alive connection serves the
    client's next request (an app-wide handler would have the server drop it after the 500)."""
    import socket
    from urllib.parse import urlsplit
    tokenizer = live_server.engine.tokenizer

    def broken(text, add_special_tokens=True):
        if text == "break":
            raise RuntimeError("boom")
        return type(tokenizer).encode(tokenizer, text, add_special_tokens)
    monkeypatch.setattr(tokenizer, "encode", broken)
    url = urlsplit(live_server.url)

    def request(sock, prompt: str) -> bytes:
        body = json.dumps({"prompt": prompt}).encode()
        sock.sendall(b"POST /tokenize HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Authorization: Bearer " + API_KEY.encode() + b"\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        data = b""
        while b"\r\n\r\n" not in data or len(data.partition(b"\r\n\r\n")[2]) < _length(data):
            chunk = sock.recv(65536)
            assert chunk, f"the server closed the connection after {data!r}"
            data += chunk
        return data

    with socket.create_connection((url.hostname, url.port), timeout=30) as sock:
        first = request(sock, "break")
        assert first.startswith(b"HTTP/1.1 500") and b'"server_error"' in first and b"RuntimeError" in first
        assert request(sock, "hello").startswith(b"HTTP/1.1 200")


def _length(response: bytes) -> int:
    head = response.partition(b"\r\n\r\n")[0].lower()
    return int(head.partition(b"content-length:")[2].split(b"\r\n")[0])
