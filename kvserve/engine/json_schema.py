"""A JSON schema as xgrammar is given it: refused where it would not be enforced, rewritten where
xgrammar enforces an equivalent form better.

xgrammar compiles some keywords without enforcing them, so output would break the schema and
still end with finish_reason "stop". Those are refused with the keyword and where it is (vLLM's
xgrammar backend refuses what it cannot enforce too); tests/engine/test_json_schema.py checks
each against jsonschema. Rewrites, each keeping the schema's meaning:
- a required name with no property schema gets its value's schema (`{}` unless
  additionalProperties or a matching patternProperties says more): xgrammar only requires the
  names it has a schema for;
- formats xgrammar admits too much of become exact patterns.
"""
import re

# Formats xgrammar admits too much of, as exact patterns: its "ipv4" takes leading zeros
# ("01.2.3.4") and its "date" any day up to 31 in any month, which the standards (and jsonschema's
# checker) refuse. February stops at the 28th: a pattern cannot tell leap years cheaply.
_OCTET = r"(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_YEAR = r"([0-9]{3}[1-9]|[0-9]{2}[1-9][0-9]|[0-9][1-9][0-9]{2}|[1-9][0-9]{3})"
_MONTH_DAY = (r"((0[13578]|1[02])-(0[1-9]|[12][0-9]|3[01])|(0[469]|11)-(0[1-9]|[12][0-9]|30)"
              r"|02-(0[1-9]|1[0-9]|2[0-8]))")
# Its "time" takes any number of fraction digits, which a greedy model can repeat until max_tokens
# ("20:20:20.1111..."): at most 9 here (nanoseconds), and no leap second 60. No "(...)?": xgrammar
# 0.2.9 reads an optional group followed by more pattern wrongly (it let "20:20:2023-01:00" through).
_OFFSET = r"(Z|[+-]([01][0-9]|2[0-3]):[0-5][0-9])"
_TIME = rf"([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9]([.][0-9]{{1,9}}{_OFFSET}|{_OFFSET})"
STRICT_FORMATS = {"ipv4": rf"^{_OCTET}(\.{_OCTET}){{3}}$", "date": rf"^{_YEAR}-{_MONTH_DAY}$",
                  "time": rf"^{_TIME}$", "date-time": rf"^{_YEAR}-{_MONTH_DAY}T{_TIME}$"}

# compiled by xgrammar, not enforced: it let through what they forbid
_UNENFORCED = ("not", "if", "then", "else", "uniqueItems")
_BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")
# where subschemas sit: one schema, a list of them, or a map of names to them
_ONE = ("additionalProperties", "items", "contains", "propertyNames", "unevaluatedItems",
        "unevaluatedProperties", "additionalItems")
_LIST = ("anyOf", "oneOf", "allOf", "prefixItems")
_MAP = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")


def for_xgrammar(schema, where: str = "#"):
    """A rewritten copy of schema; ValueError naming the first keyword xgrammar would not enforce."""
    if not isinstance(schema, dict):
        return schema  # true/false, or something xgrammar's own checks refuse
    refused = next((k for k in _UNENFORCED if k in schema), None)
    if refused is None and isinstance(schema.get("allOf"), list) and len(schema["allOf"]) > 1:
        refused = "allOf"  # one subschema is enforced, the conjunction of several is not
    if refused is None and "multipleOf" in schema and not _exact_multiple(schema):
        refused = "multipleOf"
    if refused is not None:
        what = "multipleOf beside a bound or on non-integers" if refused == "multipleOf" else repr(refused)
        raise ValueError(f"the JSON schema uses {what} at {where}, which structured outputs cannot "
                         "enforce here (the output could break it); leave it out or check the output yourself")
    out = dict(schema)
    for key in _ONE:
        if isinstance(out.get(key), dict):
            out[key] = for_xgrammar(out[key], f"{where}/{key}")
    for key in _LIST:
        if isinstance(out.get(key), list):
            out[key] = [for_xgrammar(s, f"{where}/{key}/{i}") for i, s in enumerate(out[key])]
    if isinstance(out.get("items"), list):  # draft 4-7 tuples
        out["items"] = [for_xgrammar(s, f"{where}/items/{i}") for i, s in enumerate(out["items"])]
    for key in _MAP:
        if isinstance(out.get(key), dict):
            out[key] = {name: for_xgrammar(s, f"{where}/{key}/{name}") for name, s in out[key].items()}
    _define_required(out)
    if out.get("format") in STRICT_FORMATS and "pattern" not in out:
        out["pattern"] = STRICT_FORMATS[out.pop("format")]
    return out


def _exact_multiple(schema: dict) -> bool:
    """Whether xgrammar enforces this multipleOf: only a positive whole step on integers, unbounded."""
    step = schema["multipleOf"]
    return (schema.get("type") == "integer" and isinstance(step, int) and not isinstance(step, bool)
            and step > 0 and not any(b in schema for b in _BOUNDS))


def _define_required(schema: dict) -> None:
    required = schema.get("required")
    if not isinstance(required, list) or schema.get("additionalProperties") is False:
        return
    props = schema.get("properties")
    props = dict(props) if isinstance(props, dict) else {}
    missing = [n for n in required if isinstance(n, str) and n not in props]
    if not missing:
        return
    extra = schema.get("additionalProperties")
    patterns = schema.get("patternProperties") if isinstance(schema.get("patternProperties"), dict) else {}
    for name in missing:
        matching = [s for p, s in patterns.items() if re.search(p, name)]
        if len(matching) > 1:  # its value would have to match all of them: allOf, not enforced
            raise ValueError(f"the JSON schema requires {name!r}, which several patternProperties match: "
                             "structured outputs cannot enforce that here")
        props[name] = matching[0] if matching else extra if isinstance(extra, dict) else {}
    schema["properties"] = props
