"""Tool-call formats, parsed whole and streamed, and tools through chat templates (no model)."""
import json
from types import SimpleNamespace

import pytest

from kvserve.server.errors import OpenAIError
from kvserve.server.tools import (ToolStream, finish_choice, plan_tools, template_messages, template_parser,
                                  template_renders_tools)

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
    {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}]

# a Qwen-2.5-like template: tools in the system prompt, calls as <tool_call> blocks, results as tool turns
HERMES = """{%- if tools %}<|im_start|>system
# Tools
<tools>{% for t in tools %}{{ t | tojson }}{% endfor %}</tools>
Return calls as <tool_call>{"name": ..., "arguments": ...}</tool_call><|im_end|>
{% endif %}{%- for m in messages %}<|im_start|>{{ m.role }}
{% if m.tool_calls %}{% for c in m.tool_calls %}<tool_call>{{ {"name": c.function.name, "arguments": c.function.arguments} | tojson }}</tool_call>{% endfor %}{% else %}{{ m.content }}{% endif %}<|im_end|>
{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""
LLAMA3 = "{% if tools %}Given the following functions {{ tools | tojson }} respond with {\"name\", \"parameters\"} " \
         "<|python_tag|>{% endif %}{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
MISTRAL = "{% if tools %}[AVAILABLE_TOOLS]{{ tools | tojson }}[/AVAILABLE_TOOLS]{% endif %}" \
          "{% for m in messages %}{{ m.content }}{% endfor %}[TOOL_CALLS]"
CHATML = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


def req(**kw):
    return SimpleNamespace(**({"tools": TOOLS, "tool_choice": "auto", "parallel_tool_calls": None} | kw))


def test_templates_and_their_parsers():
    assert template_renders_tools(HERMES) and template_parser(HERMES) == "hermes"
    assert template_renders_tools(LLAMA3) and template_parser(LLAMA3) == "llama3"
    assert template_renders_tools(MISTRAL) and template_parser(MISTRAL) == "mistral"
    assert not template_renders_tools(CHATML) and template_parser(CHATML) is None
    assert plan_tools(req(), HERMES).parser == "hermes"
    assert plan_tools(req(), MISTRAL).skip_special_tokens is False
    with pytest.raises(OpenAIError, match="auto"):
        plan_tools(req(), CHATML)
    assert plan_tools(req(tool_choice="required"), CHATML).structured is not None
    assert plan_tools(req(tool_choice="none"), CHATML) is None


@pytest.mark.parametrize("template, text, content", [
    (HERMES, 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>\n'
             '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>', "Let me check."),
    (LLAMA3, '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Oslo"}}; '
             '{"name": "get_time", "parameters": {}}', None),
    (MISTRAL, '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Oslo"}}, '
              '{"name": "get_time", "arguments": {}}]', None),
    (MISTRAL, '[TOOL_CALLS]get_weather[ARGS]{"city": "Oslo"}[TOOL_CALLS]get_time[ARGS]{}', None),
])
def test_each_format_parses_whole_and_streamed(template, text, content):
    plan = plan_tools(req(), template)
    got_content, calls, reason = finish_choice(text, "stop", plan)
    assert reason == "tool_calls" and got_content == content
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == \
        [("get_weather", {"city": "Oslo"}), ("get_time", {})]
    assert len({c["id"] for c in calls}) == 2
    for size in (1, 3, 7):  # any split of the text into deltas
        stream = ToolStream(plan)
        sent = "".join(stream.feed(text[i:i + size])[0] for i in range(0, len(text), size))
        rest, deltas, reason = stream.finish("stop")
        assert reason == "tool_calls"
        assert (sent + rest).strip() == (content or "") and "<tool" not in sent and "[TOOL" not in sent
        args = {}
        for d in deltas:
            args[d["index"]] = args.get(d["index"], "") + d["function"]["arguments"]
        assert [json.loads(a) for a in args.values()] == [{"city": "Oslo"}, {}]


def test_text_without_calls_stays_content():
    for template in (HERMES, LLAMA3, MISTRAL):
        plan = plan_tools(req(), template)
        for text in ("Just an answer.", "<tool_call>{broken", '{"name": "unknown_fn", "arguments": {}}'):
            assert finish_choice(text, "stop", plan) == (text, None, "stop")
            stream = ToolStream(plan)
            sent, calls = stream.feed(text)
            assert not calls and sent + stream.finish("stop")[0] == text


@pytest.mark.parametrize("choice, text", [
    ("required", '[{"name": "get_weather", "parameters": {"city": "O\\"slo", "n": [1, {"a": "]}"}]}}, '
                 '{"name":"get_time","parameters":{}}]'),
    ({"type": "function", "function": {"name": "get_weather"}}, ' {"city": "Oslo", "n": [1, 2]}')])
def test_forced_calls_stream_as_they_are_written(choice, text):
    """Each call's header once its name is whole, then its arguments a piece at a time: joined, what
    the whole output parses to; nothing sent as content."""
    plan = plan_tools(req(tool_choice=choice), CHATML)
    whole = [(c["function"]["name"], json.loads(c["function"]["arguments"]))
             for c in finish_choice(text, "stop", plan)[1]]
    for size in (1, 2, 5, len(text)):
        stream = ToolStream(plan)
        deltas, steps = [], 0
        for i in range(0, len(text), size):
            content, new = stream.feed(text[i:i + size])
            assert content == ""
            deltas += new
            steps += bool(new)
        content, rest, reason = stream.finish("stop")
        deltas += rest
        assert content == "" and reason == "tool_calls"
        headers = [d for d in deltas if "id" in d]
        assert [d["index"] for d in headers] == list(range(len(whole)))
        assert all(d["function"]["arguments"] == "" for d in headers)
        args = ["".join(d["function"]["arguments"] for d in deltas if d["index"] == i) for i in range(len(whole))]
        assert [(h["function"]["name"], json.loads(a)) for h, a in zip(headers, args)] == whole
        assert size == len(text) or steps > len(whole)  # streamed in pieces, not at the end
    stream = ToolStream(plan)
    stream.feed(text[:len(text) // 2])
    assert stream.finish("length")[2] == "length"  # a call cut short


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_a_forced_call_cut_short_is_what_its_stream_sent(choice):
    """Cut by max_tokens at any point: the whole message holds the calls begun, their arguments as
    far as written, as its stream's deltas put together; cut before a name is whole, the text."""
    plan = plan_tools(req(tool_choice=choice), CHATML)
    text = ('[{"name": "get_weather", "parameters": {"city": "Oslo"}}, {"name": "get_time", "parameters": {}}]'
            if choice == "required" else '{"city": "Oslo"}')
    for cut in range(len(text)):
        stream = ToolStream(plan)
        content, deltas = stream.feed(text[:cut])
        rest, more, reason = stream.finish("length")
        content, deltas = content + rest, deltas + more
        streamed = {}
        for d in deltas:
            name, args = streamed.get(d["index"], ("", ""))
            streamed[d["index"]] = (name + d["function"].get("name", ""), args + d["function"]["arguments"])
        got_content, calls, got_reason = finish_choice(text[:cut], "length", plan)
        assert got_reason == reason == "length"
        assert [(c["function"]["name"], c["function"]["arguments"]) for c in calls or []] == list(streamed.values())
        assert (got_content or "") == content == ("" if streamed else text[:cut])


def test_messages_for_templates_with_and_without_tools():
    history = [{"role": "user", "content": "Weather?"},
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                                     "arguments": '{"city": "Oslo"}'}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "3 C"}]
    hermes = template_messages(history, plan_tools(req(), HERMES), True)
    assert hermes[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Oslo"}  # an object, as templates want
    assert hermes[2]["name"] == "get_weather"
    plan = plan_tools(req(tool_choice="required"), CHATML)
    plain = template_messages(history, plan, False)
    assert plain[0]["role"] == "system" and "get_weather" in plain[0]["content"]
    assert json.loads(plain[2]["content"]) == [{"name": "get_weather", "parameters": {"city": "Oslo"}}]
    with pytest.raises(OpenAIError, match="tool_call_id"):
        template_messages([{"role": "tool", "content": "x"}], None, False)
