"""JSON schemas as xgrammar gets them: what the compiled grammar accepts is what jsonschema
validates, for the rewritten forms; keywords it would not enforce are refused, naming where."""
import json

import jsonschema
import pytest

from kvserve.engine.json_schema import for_xgrammar
from kvserve.engine.structured import StructuredOutputs

# (schema, values it must take, values jsonschema refuses). Strict JSON (the default) also refuses
# properties the schema does not list, and lists them in its order: what it takes is valid, not
# every valid value.
ACCEPTED = [
    # a required name without a property schema (xgrammar let {} through)
    ({"type": "object", "required": ["a"]}, [{"a": [1]}], [{}, {"b": 2}]),
    ({"type": "object", "properties": {"b": {"type": "integer"}}, "required": ["a", "b"]},
     [{"b": 1, "a": "x"}], [{"b": 1}]),
    ({"type": "object", "required": ["n"], "additionalProperties": {"type": "integer"}}, [{"n": 3}], [{"n": "x"}, {}]),
    ({"type": "object", "required": ["ab"], "patternProperties": {"^a": {"type": "integer"}}},
     [{"ab": 1}], [{"ab": "x"}, {}]),
    ({"type": "integer", "multipleOf": 7}, [14, 0, -7], [10]),
    ({"allOf": [{"type": "integer"}]}, [3], ["s"]),
    ({"type": "string", "format": "date"}, ["2024-02-28"], ["2024-02-30"]),
    ({"$defs": {"u": {"$defs": {"v": {"type": "integer"}}}}, "type": "object",
      "properties": {"x": {"$ref": "#/$defs/u/$defs/v"}}, "required": ["x"]}, [{"x": 3}], [{"x": "s"}]),
]

REFUSED = [
    ({"type": "object", "properties": {"a": {"not": {"type": "string"}}}}, "'not' at #/properties/a"),
    ({"allOf": [{"required": ["a"]}, {"required": ["b"]}]}, "'allOf' at #"),
    ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, "'uniqueItems' at #"),
    ({"if": {"type": "integer"}, "then": {"minimum": 5}}, "'if' at #"),
    ({"type": "integer", "multipleOf": 7, "minimum": 10}, "multipleOf beside a bound"),
    ({"type": "number", "multipleOf": 0.5}, "multipleOf"),
    ({"anyOf": [{"type": "string"}, {"type": "array", "items": {"not": {}}}]}, "'not' at #/anyOf/1/items"),
    ({"type": "object", "required": ["ab"], "patternProperties": {"^a": {}, "b$": {}}}, "several patternProperties"),
]


@pytest.fixture(scope="module")
def grammars(smollm2_tokenizer):
    from kvserve.engine.structured import GrammarCache
    return GrammarCache(smollm2_tokenizer, smollm2_tokenizer.vocab_size, [smollm2_tokenizer.eos_token_id])


@pytest.mark.parametrize("schema,good,bad", ACCEPTED)
def test_the_grammar_takes_valid_values_and_refuses_invalid_ones(grammars, schema, good, bad):
    validator = jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker())
    for value in good + bad:
        c = grammars.matcher(StructuredOutputs(json=schema, any_whitespace=True))
        took = c.matcher.accept_string(json.dumps(value)) and c.matcher.is_completed()
        assert took == validator.is_valid(value) == (value in good), (schema, value)


@pytest.mark.parametrize("schema,where", REFUSED)
def test_keywords_it_would_not_enforce_are_refused(grammars, schema, where):
    with pytest.raises(ValueError, match="invalid json for structured output: .*" + where.replace("$", r"\$")):
        grammars.matcher(StructuredOutputs(json=schema))


def test_the_caller_s_schema_and_data_inside_it_are_left_as_they_were():
    schema = {"type": "object", "required": ["a"], "properties": {"d": {"type": "string", "format": "date"}},
              "default": {"format": "date"}, "enum": [{"format": "date", "not": 1}]}
    before = json.dumps(schema)
    out = for_xgrammar(schema)
    assert json.dumps(schema) == before and out["properties"]["a"] == {} and "pattern" in out["properties"]["d"]
    assert out["default"] == {"format": "date"} and out["enum"] == [{"format": "date", "not": 1}]
