"""Hygiene of the recipe JSON Schema: valid draft 2020-12, documented (description, default, examples on every
property), closed (additionalProperties false), self-consistent (defaults and examples validate), and the
repository's schemas/ copy is the packaged one."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator

from finsft.recipe import required_keys, schema

REPO = Path(__file__).resolve().parent.parent
PACKAGED = REPO / "finsft" / "schemas" / "recipe.schema.json"


def properties(node: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, dict[str, Any], bool]]:
    """(dotted name, schema, required) of every property, recursively."""
    required = set(required_keys(node))  # the top level's only when the recipe extends none
    for key, sub in node.get("properties", {}).items():
        name = f"{prefix}{key}"
        yield name, sub, key in required
        yield from properties(sub, name + ".")
        if isinstance(sub.get("items"), dict):  # the sources of data.datasets
            yield from properties(sub["items"], name + "[].")
        if isinstance(sub.get("additionalProperties"), dict):  # the named sets of evaluation.sets
            yield from properties(sub["additionalProperties"], name + ".*.")


def objects(node: Any, where: str = "$") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every sub-schema that describes an object with named properties."""
    if isinstance(node, dict):
        if "properties" in node:
            yield where, node
        for key, value in node.items():
            if key != "if":  # a condition (the recipe has 'extends'), not an object a recipe holds
                yield from objects(value, f"{where}/{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from objects(value, f"{where}/{i}")


PROPS = list(properties(schema()))


def test_schema_is_valid_draft_2020_12() -> None:
    Draft202012Validator.check_schema(schema())
    assert schema()["$schema"] == "https://json-schema.org/draft/2020-12/schema"


def test_repository_schema_is_the_packaged_one() -> None:
    link = REPO / "schemas" / "recipe.schema.json"
    assert link.read_bytes() == PACKAGED.read_bytes()
    assert json.loads(PACKAGED.read_text()) == schema()


def test_every_recipe_section_is_covered() -> None:
    names = {name for name, _, _ in PROPS}
    assert len(PROPS) > 60
    for section in ("model", "quantization", "lora", "data", "template", "training", "evaluation", "output"):
        assert section in names and any(n.startswith(section + ".") for n in names)


@pytest.mark.parametrize("name, sub, required", PROPS, ids=[p[0] for p in PROPS])
def test_property_is_documented(name: str, sub: dict[str, Any], required: bool) -> None:
    assert isinstance(sub.get("description"), str) and sub["description"], name
    assert sub["description"].strip() == sub["description"]
    assert "default" in sub, name
    assert isinstance(sub.get("examples"), list) and sub["examples"], name


@pytest.mark.parametrize("name, sub, required", PROPS, ids=[p[0] for p in PROPS])
def test_property_default_and_examples_validate(name: str, sub: dict[str, Any], required: bool) -> None:
    validator = Draft202012Validator(sub)
    for example in sub["examples"]:
        errors = [e.message for e in validator.iter_errors(example)]
        assert not errors, f"{name}: example {example!r}: {errors}"
    if required:  # a missing required key is an error, so its default is never used
        return
    errors = [e.message for e in validator.iter_errors(sub["default"])]
    assert not errors, f"{name}: default {sub['default']!r}: {errors}"


def test_every_object_is_closed() -> None:
    found = list(objects(schema()))
    assert len(found) == 11  # the recipe, its 8 sections, a data.datasets source and an evaluation set
    for where, node in found:
        assert node.get("additionalProperties") is False, where
        assert set(required_keys(node)) <= set(node["properties"]), where
    # the one open object maps template fields to column names, and says what its values are
    columns = schema()["properties"]["data"]["properties"]["columns"]
    assert columns["additionalProperties"] == {"type": "string", "minLength": 1}


def test_whole_examples_of_sections_validate_as_part_of_a_recipe() -> None:
    validator = Draft202012Validator(schema())
    base = {"model": {"name_or_path": "org/m"}, "data": {"path": "org/d"}, "output": {"dir": "o"}}
    for section, sub in schema()["properties"].items():
        for example in sub["examples"]:
            recipe = {**base, section: example}
            errors = [e.message for e in validator.iter_errors(recipe)]
            assert not errors, f"{section}: {errors}"


def test_required_sections_only_without_extends() -> None:
    validator = Draft202012Validator(schema())
    assert required_keys() == ["model", "data", "output"]
    assert not list(validator.iter_errors({"extends": "base.json", "training": {"max_steps": 2}}))
    for partial in ({"training": {"max_steps": 2}}, {"extends": None, "training": {"max_steps": 2}}):
        missing = sorted(e.message for e in validator.iter_errors(partial))
        assert missing == [f"'{k}' is a required property" for k in ("data", "model", "output")], partial
