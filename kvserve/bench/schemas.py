"""A corpus of varied JSON schemas: the structured-output tests validate every output against them,
and `kvserve bench structured` constrains its batch with them.

Strings, numbers and arrays are bounded so that even a random model (whose every token is
arbitrary) finishes each one within a few dozen tokens: the tests run on such a model.
"""

_NAME = {"type": "string", "minLength": 1, "maxLength": 8}
_SHORT = {"type": "string", "maxLength": 6}
_AGE = {"type": "integer", "minimum": 0, "maximum": 130}
_SCORE = {"type": "number", "minimum": 0, "maximum": 1}


def _obj(props: dict, required=None, extra=False) -> dict:
    out = {"type": "object", "properties": props, "required": list(props) if required is None else required}
    if not extra:
        out["additionalProperties"] = False
    return out


SCHEMAS: list[dict] = [
    # flat objects, required and optional keys
    _obj({"name": _NAME, "age": _AGE}),
    _obj({"name": _NAME, "age": _AGE, "nick": _SHORT}, ["name"]),
    _obj({"ok": {"type": "boolean"}}),
    _obj({"id": {"type": "integer", "minimum": 1, "maximum": 9999}, "label": _SHORT, "active": {"type": "boolean"}},
         ["id"]),
    _obj({"x": {"type": "integer", "minimum": -50, "maximum": 50}, "y": {"type": "integer", "minimum": -50,
                                                                           "maximum": 50}}),
    # enums and consts
    _obj({"color": {"enum": ["red", "green", "blue"]}}),
    _obj({"status": {"enum": ["open", "closed", 1, None, True]}}),
    _obj({"kind": {"const": "point"}, "v": {"type": "integer", "minimum": 0, "maximum": 9}}),
    {"enum": ["alpha", "beta", "gamma"]},
    {"type": "boolean"},
    # numbers with bounds
    _obj({"score": _SCORE}),
    _obj({"price": {"type": "number", "minimum": 0, "maximum": 1000}, "qty": {"type": "integer", "minimum": 1,
                                                                             "maximum": 99}}),
    _obj({"t": {"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 100}}),
    {"type": "integer", "minimum": 10, "maximum": 20},
    # arrays with min/max items
    _obj({"tags": {"type": "array", "items": _SHORT, "maxItems": 3}}),
    _obj({"pts": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "minItems": 2,
                  "maxItems": 4}}),
    {"type": "array", "items": {"enum": ["a", "b", "c"]}, "minItems": 1, "maxItems": 5},
    _obj({"matrix": {"type": "array", "maxItems": 2, "items": {"type": "array", "maxItems": 2,
                                                                 "items": {"type": "integer", "minimum": 0,
                                                                           "maximum": 9}}}}),
    {"type": "array", "prefixItems": [{"type": "integer", "minimum": 0, "maximum": 5}, {"type": "boolean"}],
     "items": False},
    # nested objects
    _obj({"user": _obj({"name": _NAME, "age": _AGE}), "admin": {"type": "boolean"}}),
    _obj({"a": _obj({"b": _obj({"c": {"type": "integer", "minimum": 0, "maximum": 3}})})}),
    _obj({"items": {"type": "array", "maxItems": 2, "items": _obj({"sku": _SHORT, "n": {"type": "integer", "minimum": 1,
                                                                                          "maximum": 5}})}}),
    # anyOf / oneOf / nullable
    _obj({"v": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 99}, {"type": "boolean"}]}}),
    _obj({"shape": {"oneOf": [_obj({"circle": {"type": "integer", "minimum": 1, "maximum": 9}}),
                              _obj({"square": {"type": "integer", "minimum": 1, "maximum": 9}})]}}),
    _obj({"note": {"anyOf": [_SHORT, {"type": "null"}]}}),
    _obj({"maybe": {"type": ["integer", "null"], "minimum": 0, "maximum": 9}}),
    # string patterns and formats
    _obj({"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{3}$"}}),
    _obj({"zip": {"type": "string", "pattern": "^[0-9]{5}$"}, "state": {"type": "string", "pattern": "^[A-Z]{2}$"}}),
    _obj({"day": {"type": "string", "format": "date"}}),
    _obj({"id": {"type": "string", "format": "uuid"}}),
    _obj({"ip": {"type": "string", "format": "ipv4"}}),
    _obj({"when": {"type": "string", "format": "time"}}),
    # $defs and $ref
    {"$defs": {"pt": _obj({"x": {"type": "integer", "minimum": 0, "maximum": 9},
                           "y": {"type": "integer", "minimum": 0, "maximum": 9}})},
     **_obj({"a": {"$ref": "#/$defs/pt"}, "b": {"$ref": "#/$defs/pt"}})},
    # open objects and min/max lengths
    _obj({"first": {"type": "string", "minLength": 2, "maxLength": 4}, "n": {"type": "integer", "minimum": 0,
                                                                              "maximum": 3}}),
    _obj({"flags": {"type": "array", "items": {"type": "boolean"}, "minItems": 1, "maxItems": 3},
          "mode": {"enum": ["fast", "slow"]}}, ["mode"]),
]
