"""The official openai client (sync and async, streamed and not) against the live server: every
parameter round-trips, and usage counts match the tokens actually returned."""
import asyncio

import pytest

from server_util import ALIAS, MODEL

MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name three colors."}]


def prompt_tokens(http, messages=None, prompt=None) -> int:
    body = {"messages": messages} if messages is not None else {"prompt": prompt}
    return http.post("/tokenize", json=body).json()["count"]


def greedy_chat(client, max_tokens=12, **kw):
    return client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=max_tokens, temperature=0, **kw)


def test_models_health_metrics(client, http):
    assert [m.id for m in client.models.list().data] == [MODEL, ALIAS]  # --served-model-name MODEL ALIAS
    assert client.models.retrieve(MODEL).id == MODEL and client.models.retrieve(ALIAS).id == ALIAS
    r = client.completions.create(model=ALIAS, prompt="x", max_tokens=2)
    assert r.model == MODEL  # responses carry the first name, as vLLM's
    assert http.get("/health").status_code == 200
    text = http.get("/metrics").text
    for name in ("kvserve_http_requests_total", "kvserve_time_to_first_token_seconds_bucket",
                 "kvserve_time_per_output_token_seconds_bucket", "kvserve_kv_pages_total",
                 "kvserve_kv_pages_used", "kvserve_requests_running", "kvserve_requests_waiting",
                 "kvserve_prefix_cache_hit_rate", "kvserve_prompt_tokens_total", "kvserve_generation_tokens_total"):
        assert name in text, name


def test_chat_usage_matches_tokens(client, http):
    r = greedy_chat(client, max_tokens=9, logprobs=True, user="someone")
    choice = r.choices[0]
    assert r.object == "chat.completion" and r.model == MODEL and r.id.startswith("chatcmpl-")
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("length", "stop")
    assert r.usage.completion_tokens == len(choice.logprobs.content) <= 9
    assert r.usage.prompt_tokens == prompt_tokens(http, MESSAGES)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_max_completion_tokens_and_text_parts(client):
    parts = [{"role": "user", "content": [{"type": "text", "text": "Name three"}, {"type": "text", "text": "colors."}]}]
    r = client.chat.completions.create(model=MODEL, messages=parts, max_completion_tokens=5, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 5 and r.choices[0].finish_reason == "length"


def test_chat_n_choices(client):
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, n=3, max_tokens=6, seed=1,
                                       extra_body={"ignore_eos": True})
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert r.usage.completion_tokens == 18
    assert len({c.message.content for c in r.choices}) > 1  # sampled independently


def test_seed_reproducible(client):
    def run(seed):
        return client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=10, temperature=1.0,
                                              seed=seed).choices[0].message.content
    assert run(7) == run(7)
    assert run(7) != run(8)


def test_stop_string_truncates(client):
    full = greedy_chat(client, max_tokens=16, extra_body={"ignore_eos": True}).choices[0].message.content
    stop = full[len(full) // 2:len(full) // 2 + 3]
    assert stop.strip(), full
    cut = full[:full.find(stop)]
    r = greedy_chat(client, max_tokens=16, stop=[stop, "never-seen-here"], extra_body={"ignore_eos": True})
    assert r.choices[0].message.content == cut
    assert r.choices[0].finish_reason == "stop"
    r = greedy_chat(client, max_tokens=16, stop=[stop], extra_body={"ignore_eos": True,
                                                                     "include_stop_str_in_output": True})
    assert r.choices[0].message.content == cut + stop  # vLLM's option


def test_sampling_knobs(client):
    greedy = greedy_chat(client, extra_body={"ignore_eos": True}).choices[0].message.content
    top_k_1 = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=12, temperature=1.0,
                                             extra_body={"top_k": 1, "ignore_eos": True})
    assert top_k_1.choices[0].message.content == greedy
    r = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=8, temperature=0.7, top_p=0.9, presence_penalty=0.5,
        frequency_penalty=0.5, seed=3, extra_body={"min_p": 0.05, "repetition_penalty": 1.2, "top_k": 50})
    assert r.usage.completion_tokens <= 8 and r.choices[0].finish_reason in ("stop", "length")


def test_logit_bias_forces_token(client, http):
    token = http.post("/tokenize", json={"prompt": " blue", "add_special_tokens": False}).json()["tokens"][0]
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4, temperature=0,
                                       logit_bias={str(token): 100}, logprobs=True,
                                       extra_body={"ignore_eos": True})
    assert [t.token for t in r.choices[0].logprobs.content] == [" blue"] * 4
    assert r.choices[0].message.content == " blue" * 4


def test_chat_logprobs_shape(client):
    r = greedy_chat(client, max_tokens=6, logprobs=True, top_logprobs=3, extra_body={"ignore_eos": True})
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 6
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)  # greedy: the best one
        assert entry.top_logprobs[0].token == entry.token
        assert [t.logprob for t in entry.top_logprobs] == sorted((t.logprob for t in entry.top_logprobs),
                                                                 reverse=True)
    assert bytes(b for e in content for b in e.bytes).decode("utf-8", "replace") == r.choices[0].message.content


def test_chat_stream_matches_whole(client):
    whole = greedy_chat(client, max_tokens=10, extra_body={"ignore_eos": True})
    chunks = list(greedy_chat(client, max_tokens=10, stream=True, stream_options={"include_usage": True},
                              logprobs=True, extra_body={"ignore_eos": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert sum(len(c.choices[0].logprobs.content) for c in chunks if c.choices and c.choices[0].logprobs) == 10
    assert all(c.usage is None for c in chunks[:-1])


def test_chat_stream_n(client):
    stream = client.chat.completions.create(model=MODEL, messages=MESSAGES, n=2, max_tokens=5, stream=True,
                                            seed=5, stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True})
    texts, finished, usage = {0: "", 1: ""}, set(), None
    for c in stream:
        usage = c.usage or usage
        for ch in c.choices:
            texts[ch.index] += ch.delta.content or ""
            if ch.finish_reason:
                finished.add(ch.index)
    assert finished == {0, 1} and usage.completion_tokens == 10


def test_completions_prompt_forms(client, http):
    ids = http.post("/tokenize", json={"prompt": "The sky is"}).json()["tokens"]
    by_text = client.completions.create(model=MODEL, prompt="The sky is", max_tokens=5, temperature=0)
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=5, temperature=0)
    assert by_text.choices[0].text == by_ids.choices[0].text
    assert by_text.usage.prompt_tokens == len(ids)

    many = client.completions.create(model=MODEL, prompt=["The sky is", "Grass is"], n=2, max_tokens=4,
                                     temperature=0, extra_body={"ignore_eos": True})
    assert [c.index for c in many.choices] == [0, 1, 2, 3]
    assert many.choices[0].text == many.choices[1].text == by_text.choices[0].text[:len(many.choices[0].text)]
    assert many.usage.prompt_tokens == len(ids) + prompt_tokens(http, prompt="Grass is")
    assert many.usage.completion_tokens == 16

    lists = client.completions.create(model=MODEL, prompt=[ids, ids[:2]], max_tokens=3, temperature=0,
                                      extra_body={"ignore_eos": True})
    assert len(lists.choices) == 2 and lists.usage.prompt_tokens == len(ids) + 2

    default = client.completions.create(model=MODEL, prompt=ids, extra_body={"ignore_eos": True})
    assert default.usage.completion_tokens == 16  # OpenAI's default max_tokens


def test_completions_echo_and_logprobs(client, http):
    r = client.completions.create(model=MODEL, prompt="The sky is", max_tokens=4, temperature=0, echo=True)
    assert r.choices[0].text.startswith("The sky is")
    ids = http.post("/tokenize", json={"prompt": "Grass is"}).json()["tokens"]
    r = client.completions.create(model=MODEL, prompt=ids, max_tokens=4, temperature=0, echo=True)
    assert r.choices[0].text.startswith("Grass is")

    r = client.completions.create(model=MODEL, prompt="The sky is", max_tokens=6, temperature=0, logprobs=2,
                                  extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == r.usage.completion_tokens == 6
    assert all(len(t) <= 2 for t in lp.top_logprobs)
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    assert "".join(lp.tokens) == r.choices[0].text


def test_completions_stream(client):
    whole = client.completions.create(model=MODEL, prompt="The sky is", max_tokens=8, temperature=0,
                                      extra_body={"ignore_eos": True})
    chunks = list(client.completions.create(model=MODEL, prompt="The sky is", max_tokens=8, temperature=0,
                                            stream=True, echo=True, stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == "The sky is" + whole.choices[0].text
    assert chunks[-1].usage.completion_tokens == 8
    # vLLM's continuous_usage_stats: the usage so far in every chunk
    chunks = list(client.completions.create(model=MODEL, prompt="The sky is", max_tokens=8, temperature=0,
                                            stream=True, extra_body={"ignore_eos": True},
                                            stream_options={"include_usage": True, "continuous_usage_stats": True}))
    counts = [c.usage.completion_tokens for c in chunks]
    assert counts == sorted(counts) and counts[-1] == 8 and len(set(counts)) > 2


def test_stop_token_ids_and_min_tokens(client, http):
    token = http.post("/tokenize", json={"prompt": " blue", "add_special_tokens": False}).json()["tokens"][0]
    r = client.completions.create(model=MODEL, prompt="x", max_tokens=10, temperature=0,
                                  logit_bias={str(token): 100}, extra_body={"stop_token_ids": [token]})
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens == 1
    assert r.choices[0].text == ""  # a stop token's text is left out, as vLLM leaves it
    r = client.completions.create(model=MODEL, prompt="x", max_tokens=10, temperature=0,
                                  logit_bias={str(token): 100},
                                  extra_body={"stop_token_ids": [token], "min_tokens": 3})
    assert r.usage.completion_tokens == 4 and r.choices[0].text and " blue" not in r.choices[0].text
    r = client.completions.create(model=MODEL, prompt="x", max_tokens=10, temperature=0, logit_bias={str(token): 100},
                                  extra_body={"stop_token_ids": [token], "include_stop_str_in_output": True})
    assert r.choices[0].text == " blue"


def test_tokenize_detokenize(http):
    r = http.post("/tokenize", json={"prompt": "Hello world", "return_token_strs": True}).json()
    assert r["count"] == len(r["tokens"]) == len(r["token_strs"]) and r["max_model_len"] == 2048
    assert http.post("/detokenize", json={"tokens": r["tokens"]}).json() == {"prompt": "Hello world"}
    chat = http.post("/tokenize", json={"messages": MESSAGES}).json()
    assert chat["count"] > r["count"]


def test_async_client(aclient):
    asyncio.run(_async_client(aclient))


async def _async_client(aclient):
    async def chat_stream():
        text = ""
        stream = await aclient.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=6,
                                                       temperature=0, stream=True,
                                                       extra_body={"ignore_eos": True})
        async for chunk in stream:
            text += "".join(c.delta.content or "" for c in chunk.choices)
        return text

    whole, streamed, completion = await asyncio.gather(
        aclient.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=6, temperature=0,
                                        extra_body={"ignore_eos": True}),
        chat_stream(),
        aclient.completions.create(model=MODEL, prompt="The sky is", max_tokens=3))
    assert whole.choices[0].message.content == streamed
    assert completion.usage.completion_tokens <= 3


def test_max_model_len_above_the_model_s_is_refused(server_engine):
    """serve --max-model-len past the model's context length fails at start, as vLLM's does."""
    from kvserve.server.app import build_app
    from kvserve.server.serving import ServerConfig
    engine, async_engine = server_engine
    too_long = engine.model.config.max_position_embeddings + 1
    with pytest.raises(ValueError, match=f"--max-model-len {too_long} is above the model's context length"):
        build_app(async_engine, ServerConfig(model_name=MODEL, max_model_len=too_long), shutdown_engine=False)
