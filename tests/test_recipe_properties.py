"""Property-based: randomly damaged versions of the shipped recipes never crash the validator, and every
rejection is a well-formed Problem (a JSON path starting with "$", a message)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from finsft.recipe import check_recipe

REPO = Path(__file__).resolve().parent.parent
SHIPPED = sorted((REPO / "recipes").rglob("*.json"))
RECIPES = [json.loads(p.read_text()) for p in SHIPPED]
SECTIONS = ["model", "quantization", "lora", "data", "template", "training", "evaluation", "output", "extends"]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12)
    | st.sampled_from(["auto", "custom", "fiqa_qa", "package:finsft", "./x.jsonl", "/nope", "{input}", "{", ""]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)


def _containers(obj: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Paths of every dict and list inside obj (obj itself included)."""
    out = [path] if isinstance(obj, (dict, list)) else []
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else []
    for key, value in items:
        out.extend(_containers(value, (*path, key)))
    return out


def _get(obj: Any, path: tuple[Any, ...]) -> Any:
    for part in path:
        obj = obj[part]
    return obj


def _typo(word: str, i: int, kind: int) -> str:
    if not word:
        return "x"
    i %= len(word)
    if kind == 0:  # drop a character
        return word[:i] + word[i + 1:]
    if kind == 1:  # double a character
        return word[:i] + word[i] + word[i:]
    if kind == 2 and len(word) > 1:  # swap two neighbours
        i = min(i, len(word) - 2)
        return word[:i] + word[i + 1] + word[i] + word[i + 2:]
    return word + "s"


@st.composite
def damaged_recipes(draw: st.DrawFn) -> tuple[dict[str, Any], list[str]]:
    recipe = copy.deepcopy(draw(st.sampled_from(RECIPES)))
    for _ in range(draw(st.integers(1, 4))):
        where = draw(st.sampled_from(_containers(recipe)))
        node = _get(recipe, where)
        keys = list(node) if isinstance(node, dict) else list(range(len(node)))
        op = draw(st.sampled_from(["delete", "rename", "replace", "insert", "nest", "section"]))
        if op == "section":
            recipe[draw(st.sampled_from(SECTIONS))] = draw(json_values)
        elif op == "insert" and isinstance(node, dict):
            node[draw(st.text(min_size=1, max_size=10))] = draw(json_values)
        elif not keys:
            continue
        else:
            key = draw(st.sampled_from(keys))
            if op == "delete":
                del node[key]
            elif op == "rename" and isinstance(node, dict):
                new = _typo(str(key), draw(st.integers(0, 50)), draw(st.integers(0, 3)))
                node[new] = node.pop(key)
            elif op == "nest":
                node[key] = draw(st.sampled_from([{"junk": node[key]}, [node[key]], {str(key): node[key]}]))
            else:
                node[key] = draw(json_values)
    overrides = draw(st.lists(
        st.builds(lambda k, v: f"{k}={json.dumps(v)}",
                  st.sampled_from(["training.learning_rate", "lora.r", "data.validation_size", "template",
                                   "quantization.load_in_4bit", "x.y", "model.name_or_path", "extends"]),
                  json_values)
        | st.text(max_size=20),
        max_size=2,
    ))
    return recipe, overrides


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("damaged")


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=damaged_recipes())
def test_damaged_recipes_never_crash_the_validator(workdir: Path, case: tuple[dict[str, Any], list[str]]) -> None:
    recipe, overrides = case
    path = workdir / "recipe.json"
    path.write_text(json.dumps(recipe, indent=2), encoding="utf-8")
    result, problems = check_recipe(str(path), overrides)
    event("valid" if result is not None else f"{len(problems)} problem(s)" if len(problems) < 3 else "3+ problems")
    if result is None:
        assert problems
        for problem in problems:
            assert problem.path.startswith("$"), problem
            assert isinstance(problem.message, str) and problem.message.strip(), problem
            assert problem.file.startswith(str(path)) or Path(problem.file).exists()
            str(problem)  # formats
            json.dumps(problem.as_dict())
    else:
        assert problems == []
        assert isinstance(result.config, dict) and "model" in result.config


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=200) | st.binary(max_size=200).map(lambda b: b.decode("latin-1")))
def test_arbitrary_text_never_crashes_the_validator(workdir: Path, text: str) -> None:
    path = workdir / "text.json"
    path.write_text(text, encoding="utf-8")
    result, problems = check_recipe(str(path))
    assert result is None and problems and all(p.path.startswith("$") and p.message for p in problems)
