"""The recipe JSON Schema: loading it, filling defaults, and turning jsonschema's errors into messages for people
(what was wrong and what is allowed, with "did you mean")."""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping, Sequence
from functools import cache
from importlib import resources
from typing import Any

from finsft.errors import did_you_mean


@cache
def schema() -> dict[str, Any]:
    """The recipe JSON Schema (draft 2020-12) shipped inside the package."""
    text = resources.files("finsft").joinpath("schemas/recipe.schema.json").read_text(encoding="utf-8")
    result: dict[str, Any] = json.loads(text)
    return result


def required_keys(node: Mapping[str, Any] | None = None) -> list[str]:
    """The keys an object schema requires, with those it requires only in its ``else`` branch (the top level
    requires model, data and output unless the recipe has 'extends': they are required after merging)."""
    node = schema() if node is None else node
    return [*node.get("required", []), *node.get("else", {}).get("required", [])]


def apply_defaults(sch: Mapping[str, Any], obj: Any) -> Any:
    """A copy of ``obj`` with every missing property set to its schema default, recursively (also inside the
    items of a list and the values of a map whose schemas name properties)."""
    if isinstance(obj, list) and isinstance(sch.get("items"), Mapping):
        return [apply_defaults(sch["items"], item) for item in obj]
    if isinstance(obj, dict) and "properties" not in sch and isinstance(sch.get("additionalProperties"), Mapping):
        return {key: apply_defaults(sch["additionalProperties"], value) for key, value in obj.items()}
    if not isinstance(obj, dict) or "properties" not in sch:
        return obj
    out = dict(obj)
    for key, sub in sch["properties"].items():
        # Library keys (x-library) keep the library's default by being absent: they are passed through when set.
        if key not in out and "default" in sub and key not in ("$schema", "extends") and "x-library" not in sub:
            out[key] = copy.deepcopy(sub["default"])
        if key in out:
            out[key] = apply_defaults(sub, out[key])
    return out


def _subschema(parts: Sequence[str | int]) -> dict[str, Any]:
    node = schema()
    for p in parts:
        node = node.get("items", {}) if isinstance(p, int) else node.get("properties", {}).get(p, {})
    return node


def describe_allowed(sch: Mapping[str, Any]) -> str:
    """A short human description of what a schema accepts."""
    if "enum" in sch:
        return "one of " + ", ".join(json.dumps(v) for v in sch["enum"])
    if "const" in sch:
        return json.dumps(sch["const"])
    if "anyOf" in sch:
        return " or ".join(describe_allowed(s) for s in sch["anyOf"])
    kind = sch.get("type")
    if isinstance(kind, list):
        return " or ".join(describe_allowed({**sch, "type": k}) for k in kind)
    if kind == "array":
        items = sch.get("items", {})
        what = f"{items.get('type', 'value')}s" if items else "values"
        if sch.get("uniqueItems"):
            what = "unique " + what
        n = sch.get("minItems", 0)
        return "a non-empty list of " + what if n == 1 else (f"a list of at least {n} {what}" if n else "a list of " + what)
    if kind == "string" and "pattern" in sch:
        return f"a string matching {sch['pattern']}"
    return str(kind or "a value")


def _short(value: Any, limit: int = 60) -> str:
    """A value as JSON, cut to about ``limit`` characters for messages."""
    text = json.dumps(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def json_type(value: Any) -> str:
    """The JSON name of a parsed value's type ("string", "array"...), for messages."""
    if value is None:
        return "null"
    for kind, types in (("boolean", bool), ("integer", int), ("number", float), ("string", str),
                        ("array", list), ("object", dict)):
        if isinstance(value, types):
            return kind
    return type(value).__name__


def _choices(sch: Mapping[str, Any]) -> list[str]:
    """The string values an enum/const (or any branch of an anyOf) allows."""
    out = [v for v in sch.get("enum", []) if isinstance(v, str)]
    if isinstance(sch.get("const"), str):
        out.append(sch["const"])
    for sub in sch.get("anyOf", []):
        out.extend(_choices(sub))
    return out


@cache
def _validator() -> Any:
    from jsonschema import Draft202012Validator

    return Draft202012Validator(schema())


def schema_problems(recipe: dict[str, Any]) -> list[tuple[list[str | int], str]]:
    validator = _validator()
    out: list[tuple[list[str | int], str]] = []
    for err in sorted(validator.iter_errors(recipe), key=lambda e: [str(p) for p in e.absolute_path]):
        path = list(err.absolute_path)
        kind = err.validator
        if kind == "additionalProperties":
            allowed = list(err.schema.get("properties", {}))
            excluded = err.schema.get("x-excluded", {})
            for key in sorted(set(err.instance) - set(allowed)):
                if key in excluded:
                    out.append(([*path, key], f"'{key}' of {err.schema['x-library-class']} cannot be set in a recipe: "
                                              f"{excluded[key]}"))
                    continue
                listed = ", ".join(allowed) if len(allowed) <= 30 else \
                    f"{len(allowed)} keys, listed by `finsft schema` and in the README's recipe reference"
                out.append(([*path, key], f"unknown key '{key}'.{did_you_mean(key, allowed)} Allowed keys here: "
                                          f"{listed}"))
        elif kind == "required":
            out.append((path, f"missing required key {err.message.split(' ')[0]}"))
        elif kind == "enum":
            choices = [str(c) for c in err.validator_value]
            hint = did_you_mean(str(err.instance), choices) if isinstance(err.instance, str) else ""
            out.append((path, f"{_short(err.instance)} is not allowed.{hint} Allowed: {describe_allowed(err.schema)}"))
        elif kind == "type":
            wanted = err.validator_value if isinstance(err.validator_value, str) else " or ".join(err.validator_value)
            got = json_type(err.instance) + ("" if err.instance is None else f" {_short(err.instance)}")
            out.append((path, f"expected {wanted}, got {got}"))
        elif kind == "anyOf":
            hint = did_you_mean(err.instance, _choices(err.schema)) if isinstance(err.instance, str) else ""
            out.append((path, f"{_short(err.instance)} is not allowed.{hint} "
                              f"Allowed: {describe_allowed(err.schema)}"))
        elif kind == "minLength" and isinstance(err.instance, str) and not err.instance:
            what = _subschema(path).get("description", "")
            out.append((path, "must be a non-empty string" + (f": {what[0].lower()}{what[1:]}" if what else "")))
        elif kind == "maxLength" and isinstance(err.instance, str):
            name = err.instance if len(err.instance) <= 40 else err.instance[:37] + "..."
            out.append((path, f"'{name}' is {len(err.instance)} characters long; at most {err.validator_value} are "
                              "allowed (it becomes a file or folder name): choose a shorter one"))
        elif kind == "pattern" and isinstance(err.instance, str) and "^[^/" in str(err.validator_value):
            out.append((path, f"{_short(err.instance)} holds a slash, backslash or control character; it becomes a "
                              "file or folder name: use letters, digits, spaces, _ . or -"))
        elif kind == "not":
            out.append((path, f"{_short(err.instance)} is not allowed here (see `finsft schema`: "
                              f"{_subschema(path).get('description', '')})"))
        else:
            out.append((path, err.message))
    return out
