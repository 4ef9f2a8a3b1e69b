"""OpenAI tool calling over any chat model.

- `tools` go to the model's chat template as transformers passes them (a `tools` variable of
  {"type": "function", "function": {...}} objects). A template that renders no tools gets them
  described in a system message instead.
- `tool_choice` "required" or a named function is enforced by a JSON grammar, so the call always
  parses whatever the model (vLLM's formats: a named call's output is its arguments object,
  "required" a JSON array of {"name", "parameters"}).
- `tool_choice` "auto" lets the model choose, and parses its own format: Hermes/Qwen
  `<tool_call>{...}</tool_call>`, Llama 3 JSON `{"name", "parameters"}`, Mistral `[TOOL_CALLS][...]`.
  It needs a template that renders tools and whose format one of these parsers knows.
"""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from functools import lru_cache

from kvserve.engine.structured import StructuredOutputs
from kvserve.server.errors import OpenAIError

_PROBE = "kvserve_probe_function"
_NAME = re.compile(r"^[a-zA-Z0-9_.-]{1,64}$")


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


# ---- the template ---------------------------------------------------------------------------

@lru_cache(maxsize=8)
def template_renders_tools(template: str | None) -> bool:
    """Whether the template writes the tools it is given into the prompt (probed once)."""
    if not template:
        return False
    from kvserve.model.tokenizer import _compile_template
    probe = [{"type": "function", "function": {"name": _PROBE, "description": "probe",
                                                "parameters": {"type": "object", "properties": {}}}}]
    try:
        text = _compile_template(template).render(messages=[{"role": "user", "content": "hi"}], tools=probe,
                                                  add_generation_prompt=True, bos_token="", eos_token="")
    except Exception:  # noqa: BLE001 - a template that fails on tools renders none
        return False
    return _PROBE in text


def template_parser(template: str | None) -> str | None:
    """The tool-call format a template teaches its model, when a parser here knows it."""
    if not template:
        return None
    if "<tool_call>" in template:
        return "hermes"
    if "[TOOL_CALLS]" in template:
        return "mistral"
    if "<|python_tag|>" in template or ("parameters" in template and "ipython" in template):
        return "llama3"
    return None


# ---- the request --------------------------------------------------------------------------

@dataclass
class ToolPlan:
    """What a request's tools change: the prompt, the constraint, how the output is read."""
    tools: list[dict]
    mode: str  # "auto" | "required" | "named"
    name: str | None = None  # the named function
    parallel: bool = True
    parser: str | None = None  # auto: the format parsed out of the output
    in_template: bool = False  # the template renders the tools itself
    structured: StructuredOutputs | None = None
    skip_special_tokens: bool | None = None  # None: the request's own
    names: set[str] = field(default_factory=set)


def _check_tools(tools) -> list[dict]:
    if not isinstance(tools, list) or not tools:
        raise OpenAIError("tools must be a non-empty list of functions", param="tools", code="invalid_value")
    out, seen = [], set()
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(t, dict) or t.get("type") != "function" or not isinstance(fn, dict):
            raise OpenAIError(f"tools[{i}] must be {{'type': 'function', 'function': {{...}}}}", param="tools",
                              code="invalid_value")
        name = fn.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise OpenAIError(f"tools[{i}].function.name must match {_NAME.pattern}", param="tools",
                              code="invalid_value")
        if name in seen:
            raise OpenAIError(f"tools[{i}]: the function name {name!r} is given twice", param="tools",
                              code="invalid_value")
        params = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict):
            raise OpenAIError(f"tools[{i}].function.parameters must be a JSON schema object", param="tools",
                              code="invalid_value")
        seen.add(name)
        out.append({"type": "function", "function": {**fn, "parameters": params}})
    return out


def plan_tools(req, template: str | None) -> ToolPlan | None:
    """Checks tools, tool_choice and parallel_tool_calls; None when no tool can be called."""
    choice = req.tool_choice
    if req.tools is None:
        if choice not in (None, "none"):
            raise OpenAIError("tool_choice is only allowed when tools are given", param="tool_choice",
                              code="invalid_value")
        return None
    tools = _check_tools(req.tools)
    names = {t["function"]["name"] for t in tools}
    name = None
    if isinstance(choice, dict):
        fn = choice.get("function")
        name = fn.get("name") if isinstance(fn, dict) else None
        if choice.get("type") != "function" or not isinstance(name, str):
            raise OpenAIError("tool_choice must be 'none', 'auto', 'required' or "
                              "{'type': 'function', 'function': {'name': ...}}", param="tool_choice",
                              code="invalid_value")
        if name not in names:
            raise OpenAIError(f"tool_choice names the function {name!r}, which is not among the tools",
                              param="tool_choice", code="invalid_value")
        mode = "named"
    elif choice in (None, "auto", "required", "none"):
        mode = choice or "auto"
    else:
        raise OpenAIError("tool_choice must be 'none', 'auto', 'required' or a named function",
                          param="tool_choice", code="invalid_value")
    if mode == "none":
        return None
    plan = ToolPlan(tools, mode, name, req.parallel_tool_calls is not False, names=names,
                    in_template=template_renders_tools(template))
    if mode == "auto":
        plan.parser = template_parser(template)
        if not plan.in_template or plan.parser is None:
            raise OpenAIError("tool_choice 'auto' needs a chat template that renders tools in a format this "
                              "server can parse (Hermes, Llama 3 JSON or Mistral); this model's does not. Use "
                              "tool_choice 'required' or a named function, which work with any model.",
                              param="tools" if req.tool_choice is None else "tool_choice", code="invalid_value")
        if plan.parser == "mistral":
            plan.skip_special_tokens = False  # [TOOL_CALLS] is a special token
        return plan
    plan.structured = StructuredOutputs(json=_forced_schema(plan))
    return plan


def _forced_schema(plan: ToolPlan) -> dict:
    fns = {t["function"]["name"]: t["function"]["parameters"] for t in plan.tools}
    if plan.mode == "named":
        return fns[plan.name]
    # each tool's parameters under the array's $defs, their own "#/..." references rebased there
    defs = {f"tool{i}": _rebased(p, f"#/$defs/tool{i}") for i, p in enumerate(fns.values())}
    calls = [{"type": "object", "properties": {"name": {"enum": [n]}, "parameters": {"$ref": f"#/$defs/tool{i}"}},
              "required": ["name", "parameters"], "additionalProperties": False} for i, n in enumerate(fns)]
    schema = {"type": "array", "minItems": 1, "items": calls[0] if len(calls) == 1 else {"anyOf": calls},
              "$defs": defs}
    if not plan.parallel:
        schema["maxItems"] = 1
    return schema


def _rebased(schema, base: str):
    """schema with every local reference "#/x" turned into base + "/x"."""
    if isinstance(schema, list):
        return [_rebased(s, base) for s in schema]
    if not isinstance(schema, dict):
        return schema
    return {k: base + v[1:] if k == "$ref" and isinstance(v, str) and v.startswith("#") else _rebased(v, base)
            for k, v in schema.items()}


# ---- messages for the template -------------------------------------------------------------------

def template_messages(messages: list[dict], plan: ToolPlan | None, in_template: bool) -> list[dict]:
    """OpenAI messages (plain dicts) as chat templates take them: tool calls with their arguments
    as objects, tool results with the name of their call; a system message describing the tools
    where the template renders none."""
    names, out = {}, []
    for i, m in enumerate(messages):
        m = {k: v for k, v in m.items() if v is not None}
        calls = m.pop("tool_calls", None)
        if m["role"] == "assistant" and calls:
            parsed = []
            for c in calls:
                fn = c.get("function") or {}
                names[c.get("id")] = fn.get("name")
                try:
                    args = json.loads(fn.get("arguments") or "{}")
                except (TypeError, json.JSONDecodeError):
                    raise OpenAIError(f"messages[{i}].tool_calls: arguments must be a JSON string",
                                      param="messages", code="invalid_value") from None
                parsed.append({"id": c.get("id"), "type": "function",
                               "function": {"name": fn.get("name"), "arguments": args}})
            if in_template:
                m["tool_calls"] = parsed
                m.setdefault("content", "")
            else:  # the template knows no tool calls: show them as the text the model is asked for
                shown = json.dumps([{"name": c["function"]["name"], "parameters": c["function"]["arguments"]}
                                    for c in parsed])
                m["content"] = ((m.get("content") or "") + "\n" + shown).strip()
        elif m["role"] == "tool":
            if not isinstance(m.get("tool_call_id"), str):
                raise OpenAIError(f"messages[{i}]: a tool message needs its tool_call_id", param="messages",
                                  code="missing_required_parameter")
            if names.get(m["tool_call_id"]):
                m.setdefault("name", names[m["tool_call_id"]])
        if m.get("content") is None:
            if m["role"] != "assistant":
                raise OpenAIError(f"messages[{i}]: content is required for role {m['role']!r}", param="messages",
                                  code="invalid_value")
            m["content"] = ""
        out.append(m)
    if plan is not None and not plan.in_template:
        out = _with_tool_system_message(out, plan)
    return out


def _with_tool_system_message(messages: list[dict], plan: ToolPlan) -> list[dict]:
    listing = "\n".join(json.dumps(t["function"]) for t in plan.tools)
    if plan.mode == "named":
        ask = f"Call the function `{plan.name}`: reply with only its arguments, as one JSON object."
    else:
        ask = ('Call one or more of them: reply with only a JSON array of calls, each '
               '{"name": <function name>, "parameters": <arguments object>}.')
    text = f"You can call these functions:\n{listing}\n{ask}"
    if messages and messages[0]["role"] in ("system", "developer") and isinstance(messages[0].get("content"), str):
        return [{**messages[0], "content": f"{messages[0]['content']}\n\n{text}"}, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]


# ---- reading calls out of the output --------------------------------------------------------------

@dataclass
class Parsed:
    content: str | None
    calls: list[dict]  # {"id", "type": "function", "function": {"name", "arguments": JSON text}}


def _call(name: str, args) -> dict:
    text = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
    return {"id": new_call_id(), "type": "function", "function": {"name": name, "arguments": text}}


def _json_calls(objs, names: set[str]) -> list[dict] | None:
    """[{"name", "parameters" | "arguments"}] -> calls, or None if any is not a call of a known tool."""
    calls = []
    for o in objs:
        if not isinstance(o, dict) or o.get("name") not in names:
            return None
        args = o.get("parameters", o.get("arguments", {}))
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                return None
        if not isinstance(args, dict):
            return None
        calls.append(_call(o["name"], args))
    return calls


def parse_output(text: str, plan: ToolPlan) -> Parsed:
    """The calls in a finished output (none if it does not parse: then it is all content)."""
    if plan.mode == "named":
        try:
            args = json.loads(text)
        except json.JSONDecodeError:
            return Parsed(text, [])
        return Parsed(None, [_call(plan.name, text)]) if isinstance(args, dict) else Parsed(text, [])
    if plan.mode == "required":
        try:
            calls = _json_calls(json.loads(text), plan.names)
        except (json.JSONDecodeError, TypeError):
            calls = None
        return Parsed(None, calls) if calls else Parsed(text, [])
    return _PARSERS[plan.parser](text, plan.names)


_DECODER = json.JSONDecoder()


def _hermes(text: str, names: set[str]) -> Parsed:
    start = text.find("<tool_call>")
    if start < 0:
        return Parsed(text, [])
    objs = []
    for block in re.findall(r"<tool_call>(.*?)(?:</tool_call>|$)", text[start:], re.S):
        try:
            objs.append(json.loads(block.strip()))
        except json.JSONDecodeError:
            return Parsed(text, [])
    calls = _json_calls(objs, names)
    return Parsed(text[:start].strip() or None, calls) if calls else Parsed(text, [])


def _mistral(text: str, names: set[str]) -> Parsed:
    start = text.find("[TOOL_CALLS]")
    if start < 0:
        return Parsed(text, [])
    rest = text[start + len("[TOOL_CALLS]"):].strip()
    objs = []
    try:
        if rest.startswith("["):  # [TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]
            objs = json.loads(rest)
        else:  # newer templates: [TOOL_CALLS]name[ARGS]{...} (repeated)
            for part in rest.split("[TOOL_CALLS]"):
                name, _, args = part.partition("[ARGS]")
                objs.append({"name": name.strip(), "arguments": json.loads(args)})
    except (json.JSONDecodeError, ValueError):
        return Parsed(text, [])
    calls = _json_calls(objs if isinstance(objs, list) else [objs], names)
    return Parsed(text[:start].strip() or None, calls) if calls else Parsed(text, [])


def _llama3(text: str, names: set[str]) -> Parsed:
    body = text.strip().removeprefix("<|python_tag|>").strip()
    if not body.startswith("{"):
        return Parsed(text, [])
    objs, pos = [], 0
    try:
        while pos < len(body):  # one call or several, separated by ";"
            obj, pos = _DECODER.raw_decode(body, pos)
            objs.append(obj)
            pos = len(body) - len(body[pos:].lstrip().removeprefix(";").lstrip())
    except json.JSONDecodeError:
        return Parsed(text, [])
    calls = _json_calls(objs, names)
    return Parsed(None, calls) if calls else Parsed(text, [])


_PARSERS = {"hermes": _hermes, "mistral": _mistral, "llama3": _llama3}
_MARKERS = {"hermes": "<tool_call>", "mistral": "[TOOL_CALLS]"}


# ---- streaming ---------------------------------------------------------------------------------

class ToolStream:
    """One choice's text as streamed deltas. Under tool_choice "auto", content passes through until
    a call may have begun; from there the text is held, and parsed into tool-call deltas when the
    choice ends. A forced call (required, named) is streamed as it is written: its header once its
    name is known, then its arguments' JSON text a piece at a time, as OpenAI streams them."""

    def __init__(self, plan: ToolPlan):
        self.plan = plan
        self.text = ""
        self.sent = 0  # chars of text already sent as content
        self.holding = False  # auto: a call may have begun
        self.forced = plan.mode != "auto"
        self.ids: list[str] = []  # forced: the calls whose header is sent
        self.args_sent: list[int] = []  # and the chars of their arguments sent

    def feed(self, delta: str) -> tuple[str, list[dict]]:
        """(content, tool-call deltas) to send now for this new text."""
        self.text += delta
        if self.forced:
            return "", self._forced_deltas()
        if self.holding:
            return "", []
        marker = _MARKERS.get(self.plan.parser)
        if marker is None:  # llama3: a call is the whole output, a JSON object
            stripped = self.text.lstrip()
            if self.sent == 0 and stripped.startswith(("{", "<|python_tag|>")):
                self.holding = True
                return "", []
            if self.sent == 0 and "<|python_tag|>".startswith(stripped):  # undecided yet
                return "", []
            return self._release(len(self.text)), []
        at = self.text.find(marker, self.sent)
        if at >= 0:
            self.holding = True
            return self._release(at), []
        # a marker may be starting at the end: hold those characters back
        keep = next((k for k in range(min(len(marker) - 1, len(self.text)), 0, -1)
                     if marker.startswith(self.text[-k:])), 0)
        return self._release(len(self.text) - keep), []

    def _release(self, upto: int) -> str:
        out, self.sent = self.text[self.sent:upto], max(self.sent, upto)
        return out

    def _forced_deltas(self) -> list[dict]:
        args = self.text.lstrip()
        calls = ([(self.plan.name, args)] if args else []) if self.plan.mode == "named" else _calls_begun(self.text)
        deltas = []
        for i, (name, args) in enumerate(calls):
            if name is None:  # its arguments wait for its name
                break
            if i == len(self.ids):
                self.ids.append(new_call_id())
                self.args_sent.append(0)
                deltas.append({"index": i, "id": self.ids[i], "type": "function",
                               "function": {"name": name, "arguments": ""}})
            if len(args) > self.args_sent[i]:
                deltas.append({"index": i, "function": {"arguments": args[self.args_sent[i]:]}})
                self.args_sent[i] = len(args)
        return deltas

    def finish(self, finish_reason: str | None) -> tuple[str, list[dict], str | None]:
        """(content still to send, tool-call deltas, finish reason) when the choice has ended."""
        if self.forced:  # the grammar made every token part of the call; a cut one ends as "length"
            if not self.ids:  # cut before a call's name was whole: the text as generated
                return self._release(len(self.text)), [], finish_reason
            return "", [], "tool_calls" if finish_reason == "stop" else finish_reason
        parsed = parse_output(self.text, self.plan) if finish_reason == "stop" else Parsed(self.text, [])
        if not parsed.calls:
            return self._release(len(self.text)), [], finish_reason
        content = (parsed.content or "")[self.sent:] if parsed.content else ""
        deltas = []
        for i, c in enumerate(parsed.calls):
            deltas.append({"index": i, "id": c["id"], "type": "function",
                           "function": {"name": c["function"]["name"], "arguments": ""}})
            deltas.append({"index": i, "function": {"arguments": c["function"]["arguments"]}})
        self.sent = len(self.text)
        return content, deltas, "tool_calls"


def _calls_begun(text: str) -> list[tuple[str | None, str]]:
    """The calls begun so far in a forced "required" output, a JSON array of {"name", "parameters"}
    being written: each one's name (None until its string is whole) and its parameters' text so far."""
    calls: list[list] = []  # [name, parameters' start, end]
    depth, expect_key, key, i = 0, False, None, 0
    while i < len(text):
        c = text[i]
        if c == '"':
            end = _string_end(text, i)
            if end is None:  # a string still being written
                break
            if depth == 2 and expect_key:
                key, expect_key = json.loads(text[i:end]), False
            elif depth == 2 and key == "name":
                calls[-1][0] = json.loads(text[i:end])
            i = end
            continue
        if c in "{[":
            if depth == 2 and key == "parameters":
                calls[-1][1] = i
            depth += 1
            if depth == 2:
                calls.append([None, None, None])
                expect_key, key = True, None
        elif c in "}]":
            depth -= 1
            if depth == 2 and key == "parameters":
                calls[-1][2] = i + 1
        elif c == "," and depth == 2:
            expect_key, key = True, None
        i += 1
    return [(name, "" if start is None else text[start:end or len(text)]) for name, start, end in calls]


def _string_end(text: str, start: int) -> int | None:
    """The index after the JSON string that opens at text[start], or None if it is not closed yet."""
    i = start + 1
    while i < len(text):
        if text[i] == "\\":
            i += 2
        elif text[i] == '"':
            return i + 1
        else:
            i += 1
    return None


def finish_choice(text: str, finish_reason: str | None, plan: ToolPlan) -> tuple[str | None, list[dict] | None, str]:
    """A whole choice -> (content, tool_calls, finish_reason), as its stream would have sent them.
    An output cut short (length) comes back as generated: a forced one as the calls begun, their
    arguments as far as they were written; else as text."""
    if finish_reason != "stop" and plan.mode != "auto":
        stream = ToolStream(plan)
        content, deltas = stream.feed(text)
        rest, _, reason = stream.finish(finish_reason)
        calls = [_call_from_deltas(deltas, i) for i in range(len(stream.ids))]
        return (content + rest) or None, calls or None, reason
    if finish_reason != "stop":
        return text, None, finish_reason
    parsed = parse_output(text, plan)
    if not parsed.calls:
        return text, None, finish_reason
    return parsed.content, parsed.calls, "tool_calls"


def _call_from_deltas(deltas: list[dict], index: int) -> dict:
    """Call `index` of a stream's deltas, put together as a whole message's tool call."""
    mine = [d for d in deltas if d["index"] == index]
    return {"id": mine[0]["id"], "type": "function",
            "function": {"name": mine[0]["function"]["name"],
                         "arguments": "".join(d["function"]["arguments"] for d in mine)}}
