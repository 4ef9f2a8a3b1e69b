"""Structured outputs and tool calls through the OpenAI API, with the official client, on the tiny
random model behind the live server (SmolLM2's template, which renders no tools)."""
import json
import re
from typing import Literal

import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from kvserve.bench.schemas import SCHEMAS
from server_util import MODEL

USER = [{"role": "user", "content": "Answer in JSON."}]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome", "Oslo"]},
                                                    "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                   "required": ["city", "days"], "additionalProperties": False}}}
CLOCK = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"utc": {"type": "boolean"}},
                                       "required": ["utc"], "additionalProperties": False}}}


class Booking(BaseModel):
    city: Literal["Paris", "Rome"]
    nights: int = Field(ge=1, le=9)
    code: str = Field(max_length=5)
    breakfast: bool


def test_parse_with_a_pydantic_model(client):
    for temperature in (0, 1):
        r = client.beta.chat.completions.parse(model=MODEL, messages=USER, response_format=Booking,
                                               max_tokens=64, temperature=temperature)
        choice = r.choices[0]
        assert choice.finish_reason == "stop", choice.message.content
        assert isinstance(choice.message.parsed, Booking)


def test_json_schema_and_json_object(client):
    for schema in SCHEMAS[:6]:
        r = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=96, temperature=1, n=2,
                                           response_format={"type": "json_schema",
                                                            "json_schema": {"name": "x", "schema": schema,
                                                                            "strict": True}})
        for c in r.choices:
            assert c.finish_reason == "stop"
            jsonschema.validate(json.loads(c.message.content), schema)
    r = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=24, temperature=0,
                                       response_format={"type": "json_object"})
    text = r.choices[0].message.content
    assert text.startswith("{")
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)
    else:  # it could not finish within max_tokens: what was generated, cut
        assert r.choices[0].finish_reason == "length"


def test_vllm_fields_on_chat_and_completions(client):
    cases = [({"structured_outputs": {"regex": r"[0-9]{3}-[a-z]{2}"}}, lambda t: re.fullmatch(r"[0-9]{3}-[a-z]{2}", t)),
             ({"structured_outputs": {"choice": ["left", "right"]}}, lambda t: t in ("left", "right")),
             ({"structured_outputs": {"grammar": 'root ::= "x" [a-c] "y"'}}, lambda t: re.fullmatch("x[a-c]y", t)),
             ({"structured_outputs": {"json": SCHEMAS[0]}}, lambda t: jsonschema.validate(json.loads(t), SCHEMAS[0])
              or True),
             ({"guided_choice": ["up", "down"]}, lambda t: t in ("up", "down")),
             ({"guided_regex": "[A-Z]{4}", "guided_decoding_backend": "xgrammar"},
              lambda t: re.fullmatch("[A-Z]{4}", t))]
    for extra, check in cases:
        chat = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=64, temperature=1,
                                              extra_body=extra)
        assert check(chat.choices[0].message.content), (extra, chat.choices[0].message.content)
        text = client.completions.create(model=MODEL, prompt="Say:", max_tokens=64, temperature=1, extra_body=extra)
        assert check(text.choices[0].text), (extra, text.choices[0].text)
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt="Say:", max_tokens=64, stream=True, extra_body=cases[0][0]) if c.choices)
    assert cases[0][1](streamed)
    fmt = {"type": "json_schema", "json_schema": {"name": "s", "schema": SCHEMAS[0]}}  # on completions, as vLLM
    text = client.completions.create(model=MODEL, prompt="Say:", max_tokens=200, temperature=0,
                                     extra_body={"response_format": fmt}).choices[0].text
    jsonschema.validate(json.loads(text), SCHEMAS[0])


def _check_call(call, tools=(WEATHER, CLOCK)):
    assert call.id.startswith("call_") and call.type == "function"
    fn = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    jsonschema.validate(json.loads(call.function.arguments), fn[call.function.name])


def test_required_and_named_tool_choices_always_parse(client):
    for temperature, parallel in ((0, True), (1, True), (1, False)):
        # seeded: unseeded, a random model at temperature 1 chains calls past max_tokens ~10% of the time
        r = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=128, temperature=temperature,
                                           seed=1, tools=[WEATHER, CLOCK], tool_choice="required",
                                           parallel_tool_calls=parallel)
        c = r.choices[0]
        assert c.finish_reason == "tool_calls" and c.message.content is None
        assert c.message.tool_calls and (parallel or len(c.message.tool_calls) == 1)
        for call in c.message.tool_calls:
            _check_call(call)
    r = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=64, temperature=1, tools=[WEATHER, CLOCK],
                                       tool_choice={"type": "function", "function": {"name": "get_time"}})
    [call] = r.choices[0].message.tool_calls
    assert call.function.name == "get_time" and r.choices[0].finish_reason == "tool_calls"
    _check_call(call)


class Place(BaseModel):
    city: Literal["Paris", "Rome"]
    country: Literal["FR", "IT"]


class Trip(BaseModel):
    origin: Place
    destination: Place


def test_required_tool_with_nested_models_and_refs(client):
    """A pydantic tool puts its nested models under $defs, referred to from the root: under "required"
    the calls' array wraps the parameters, and their references must still resolve."""
    tools = [openai.pydantic_function_tool(Trip), WEATHER]
    for stream in (False, True):
        kwargs = dict(model=MODEL, messages=USER, max_tokens=200, temperature=0, tools=tools, tool_choice="required")
        if stream:
            calls = {}
            for chunk in client.chat.completions.create(stream=True, **kwargs):
                for d in chunk.choices[0].delta.tool_calls or []:
                    calls.setdefault(d.index, ["", ""])
                    calls[d.index][0] += d.function.name or ""
                    calls[d.index][1] += d.function.arguments or ""
            calls = list(calls.values())
        else:
            message = client.chat.completions.create(**kwargs).choices[0].message
            calls = [(c.function.name, c.function.arguments) for c in message.tool_calls]
        assert calls
        for name, arguments in calls:
            schema = next(t["function"]["parameters"] for t in tools if t["function"]["name"] == name)
            jsonschema.validate(json.loads(arguments), schema)


def test_tool_call_round_trip(client):
    messages = [{"role": "user", "content": "Weather in Oslo?"}]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=64, temperature=0, tools=[WEATHER],
                                       tool_choice={"type": "function", "function": {"name": "get_weather"}})
    call = r.choices[0].message.tool_calls[0]
    messages += [r.choices[0].message.model_dump(),  # as clients send it back: refusal, annotations, ... too
                 {"role": "tool", "tool_call_id": call.id, "content": '{"temp": 3}'}]
    answer = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0,
                                            tools=[WEATHER], tool_choice="none")
    assert answer.choices[0].message.tool_calls is None and answer.choices[0].message.content
    without_tools = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0)
    assert without_tools.choices[0].finish_reason in ("stop", "length")


def test_streamed_tool_call_deltas_reassemble(client):
    with client.beta.chat.completions.stream(model=MODEL, messages=USER, max_tokens=128, temperature=1,
                                             seed=1, tools=[WEATHER, CLOCK], tool_choice="required") as stream:
        final = stream.get_final_completion()
    c = final.choices[0]
    assert c.finish_reason == "tool_calls" and c.message.tool_calls
    for call in c.message.tool_calls:
        _check_call(call)
    chunks = list(client.chat.completions.create(model=MODEL, messages=USER, max_tokens=64, stream=True,
                                                 tools=[WEATHER], tool_choice={"type": "function",
                                                                               "function": {"name": "get_weather"}}))
    deltas = [d for ch in chunks for d in (ch.choices[0].delta.tool_calls or []) if ch.choices]
    assert deltas[0].id.startswith("call_") and deltas[0].function.name == "get_weather"
    assert json.loads("".join(d.function.arguments or "" for d in deltas))["city"] in ("Paris", "Rome", "Oslo")
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert not any(ch.choices[0].delta.content for ch in chunks if ch.choices)


@pytest.mark.parametrize("kwargs, param, words", [
    (dict(tools=[WEATHER]), "tools", "tool_choice 'auto'"),
    (dict(tools=[WEATHER], tool_choice="auto"), "tool_choice", "Hermes"),
    (dict(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "nope"}}), "tool_choice", "nope"),
    (dict(tool_choice="required"), "tool_choice", "only allowed"),
    (dict(tools=[{"type": "function", "function": {"name": "bad name!"}}], tool_choice="required"), "tools", "name"),
    (dict(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}),
     "response_format", "nope"),
    (dict(response_format={"type": "xml"}), "response_format", "xml"),
    (dict(extra_body={"structured_outputs": {"regex": "(ab"}}), "structured_outputs", "parenthesis"),
    (dict(extra_body={"structured_outputs": {"grammar": "root ::= undefined_rule"}}), "structured_outputs",
     "undefined_rule"),
    (dict(extra_body={"structured_outputs": {"regex": "a", "choice": ["a"]}}), "structured_outputs", "exactly one"),
    (dict(extra_body={"structured_outputs": {"jsonn": {}}}), "structured_outputs", "jsonn"),
    (dict(extra_body={"guided_json": {"type": "object"}, "guided_regex": "a"}), "guided_regex", "only one"),
    (dict(extra_body={"structured_outputs": {"json_object": True}, "ignore_eos": True}), "structured_outputs",
     "ignore_eos"),
    (dict(response_format={"type": "json_object"}, tools=[WEATHER], tool_choice="required"), "response_format",
     "combined"),
    (dict(extra_body={"guided_regex": "a", "guided_decoding_backend": "outlines"}), "guided_decoding_backend",
     "xgrammar"),
])
def test_bad_specs_are_400_with_param(client, kwargs, param, words):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=USER, max_tokens=4, **kwargs)
    err = e.value.body
    assert err["param"] == param and words in err["message"], err
    ok = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=4,
                                        extra_body={"structured_outputs": {"choice": ["fine"]}})
    assert ok.choices[0].message.content == "fine"


def test_a_grammar_too_slow_to_compile_is_refused(client, live_server):
    grammars = live_server.engine.grammars
    grammars.timeout_s = 0.001
    huge = {"type": "object", "properties": {f"k{i}": {"type": "string", "pattern": f"[a-z]{{3,40}}{i}"}
                                             for i in range(50)}}
    try:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=MODEL, messages=USER, max_tokens=4,
                                           response_format={"type": "json_schema",
                                                            "json_schema": {"name": "huge", "schema": huge}})
    finally:
        grammars.timeout_s = 5.0
    assert "took longer" in e.value.body["message"] and e.value.body["param"] == "response_format"
