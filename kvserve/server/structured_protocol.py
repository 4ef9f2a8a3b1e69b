"""The request fields that constrain an output, read into the engine's StructuredOutputs:

- OpenAI's `response_format`: {"type": "text" | "json_object"} or {"type": "json_schema",
  "json_schema": {"name", "schema", "strict", "description"}};
- vLLM's `structured_outputs`: {"json" | "regex" | "choice" | "grammar" | "json_object": ...}, plus
  "disable_any_whitespace" (whitespace is compact by default here) and vLLM's older `guided_json`,
  `guided_regex`, `guided_choice`, `guided_grammar`.

At most one constraint per request; anything malformed is a 400 naming the field.
"""
from kvserve.engine.structured import StructuredOutputs
from kvserve.server.errors import OpenAIError

_VLLM_KEYS = {"json", "regex", "choice", "grammar", "json_object"}
_VLLM_OPTIONS = {"disable_any_whitespace", "disable_fallback", "disable_additional_properties", "whitespace_pattern",
                 "structural_tag"}
GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}


def _spec(param: str, **fields) -> StructuredOutputs:
    try:
        return StructuredOutputs(**fields)
    except ValueError as e:
        raise OpenAIError(str(e), param=param, code="invalid_value") from None


def from_response_format(value) -> StructuredOutputs | None:
    param = "response_format"
    if value is None:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("type"), str):
        raise OpenAIError("response_format must be an object with a 'type'", param=param, code="invalid_value")
    kind = value["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return _spec(param, json_object=True)
    if kind != "json_schema":
        raise OpenAIError(f"response_format type must be 'text', 'json_object' or 'json_schema', got {kind!r}",
                          param=param, code="invalid_value")
    inner = value.get("json_schema")
    if not isinstance(inner, dict) or not isinstance(inner.get("name"), str):
        raise OpenAIError("response_format json_schema must be an object with a 'name' and a 'schema'",
                          param=param, code="invalid_value")
    schema = inner.get("schema", {"type": "object"})  # OpenAI: a missing schema is any object
    if not isinstance(schema, dict):
        raise OpenAIError("response_format json_schema.schema must be a JSON schema object", param=param,
                          code="invalid_value")
    return _spec(param, json=schema)


def from_vllm(req) -> tuple[StructuredOutputs, str] | None:
    """`structured_outputs` or one of the `guided_*` fields -> (spec, the field's name)."""
    backend = getattr(req, "guided_decoding_backend", None)
    if backend is not None and backend.split(":")[0] not in ("xgrammar", "auto"):
        raise OpenAIError(f"guided_decoding_backend {backend!r} is not available here: this server enforces "
                          "structured outputs with xgrammar (give 'xgrammar' or 'auto', or leave it out)",
                          param="guided_decoding_backend", code="invalid_value")
    given = [name for name in ("structured_outputs", *GUIDED) if getattr(req, name, None) is not None]
    if not given:
        return None
    if len(given) > 1:
        raise OpenAIError(f"give only one of {', '.join(given)}", param=given[1], code="invalid_value")
    param = given[0]
    value = getattr(req, param)
    if param in GUIDED:
        return _spec(param, **{GUIDED[param]: value}), param
    if not isinstance(value, dict):
        raise OpenAIError("structured_outputs must be an object", param=param, code="invalid_value")
    unknown = set(value) - _VLLM_KEYS - _VLLM_OPTIONS
    if unknown:
        raise OpenAIError(f"unknown structured_outputs keys: {', '.join(sorted(unknown))}", param=param,
                          code="invalid_value")
    if value.get("structural_tag") is not None:
        raise OpenAIError("structured_outputs structural_tag is not supported by this server", param=param)
    fields = {k: v for k, v in value.items() if k in _VLLM_KEYS and v is not None}
    if "json" in fields and not isinstance(fields["json"], (dict, str)):
        raise OpenAIError("structured_outputs json must be a JSON schema", param=param, code="invalid_value")
    return _spec(param, **fields, any_whitespace=value.get("disable_any_whitespace") is False), param


def request_spec(req, response_format=None) -> tuple[StructuredOutputs, str] | None:
    """The request's one constraint and the field it came from, or None."""
    vllm = from_vllm(req)
    fmt = from_response_format(response_format)
    if vllm and fmt:
        raise OpenAIError(f"give either response_format or {vllm[1]}, not both", param=vllm[1], code="invalid_value")
    return vllm or ((fmt, "response_format") if fmt else None)
