"""Load recipes: JSON syntax (strict, with line and column), ``extends`` chains, ``key.path=value`` overrides,
then the schema and the cross-field rules. Every problem of every file is collected before reporting.

Light on purpose: imports jsonschema and the standard library only (never torch/transformers/trl/peft).
"""

from __future__ import annotations

import copy
import json
import math
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from finsft.errors import Problem, RecipeError
from finsft.files import NotASmallFile, read_small_text
from finsft.recipe.model import Recipe
from finsft.recipe.paths import (
    PATH_FIELDS,
    expand_home,
    is_local_path,
    resolve_paths,
    resolve_source,
    source_nodes,
)
from finsft.recipe.rules import data_format_of, recipe_warnings, semantic_problems
from finsft.recipe.schema import apply_defaults, json_type, required_keys, schema, schema_problems


def locate(text: str, path: Sequence[str | int]) -> tuple[int | None, int | None]:
    """Best-effort (line, column) of the key at the end of a JSON path inside the file's text."""
    pos = 0
    found = False
    for part in path:
        if isinstance(part, int):
            continue
        idx = text.find(json.dumps(part), pos)
        if idx < 0:
            break
        pos, found = idx, True
    if not found:
        return None, None
    return _line_col(text, pos)


def json_path(parts: Iterable[str | int]) -> str:
    out = "$"
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if p.replace("_", "a").isalnum() else f"[{p!r}]")
    return out


class _NonFinite(ValueError):
    def __init__(self, token: str, message: str):
        super().__init__(message)
        self.token = token


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _NonFinite(text, f"number {text} is too large")
    return value


def _no_constant(text: str) -> Any:
    raise _NonFinite(text, f"{text} is not valid JSON (JSON numbers are finite)")


def _line_col(text: str, pos: int) -> tuple[int, int]:
    return text.count("\n", 0, pos) + 1, pos - (text.rfind("\n", 0, pos) + 1) + 1


def loads(text: str, duplicates: list[str] | None = None) -> Any:
    """Strict ``json.loads``: NaN, Infinity and numbers that overflow to infinity are errors, as in JSON.
    Keys repeated inside one object are appended to ``duplicates`` (the last value would silently win)."""

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in items:
            if key in out and duplicates is not None:
                duplicates.append(key)
            out[key] = value
        return out

    return json.loads(text, parse_float=_finite_float, parse_constant=_no_constant, object_pairs_hook=pairs)


def _read_json(path: str, problems: list[Problem]) -> tuple[dict[str, Any] | None, str]:
    try:
        text = read_small_text(path)  # a regular file below MAX_RECIPE_BYTES; tolerates a byte-order mark
    except FileNotFoundError:
        problems.append(Problem(path, "$", "file not found"))
        return None, ""
    except NotASmallFile as exc:
        problems.append(Problem(path, "$", f"cannot read file as a recipe: it is {exc}"))
        return None, ""
    except (OSError, UnicodeDecodeError) as exc:
        problems.append(Problem(path, "$", f"cannot read file: {exc}"))
        return None, ""
    duplicates: list[str] = []
    try:
        data = loads(text, duplicates)
    except json.JSONDecodeError as exc:
        problems.append(Problem(path, "$", f"invalid JSON: {exc.msg}", exc.lineno, exc.colno))
        return None, text
    except _NonFinite as exc:
        pos = text.find(exc.token)
        problems.append(Problem(path, "$", f"invalid JSON: {exc}", *(_line_col(text, pos) if pos >= 0 else ())))
        return None, text
    except (ValueError, RecursionError) as exc:  # an integer too long, nesting too deep
        problems.append(Problem(path, "$", f"invalid JSON: {exc or type(exc).__name__}"))
        return None, text
    if not isinstance(data, dict):
        problems.append(Problem(path, "$", f"a recipe must be a JSON object, got {json_type(data)}"))
        return None, text
    if duplicates:
        for key in dict.fromkeys(duplicates):
            needle = json.dumps(key)
            second = text.find(needle, text.find(needle) + 1)
            problems.append(Problem(path, "$", f"key '{key}' appears twice in one object; the earlier value would "
                                               "be silently ignored: keep one", *_line_col(text, second)))
        return None, text
    return data, text


def deep_merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """Objects merge key by key (recursively); any other value in ``over`` replaces the base value."""
    out = copy.deepcopy(dict(base))
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _leaf_paths(obj: Any, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    if isinstance(obj, dict) and obj:
        for k, v in obj.items():
            yield (*prefix, k)
            yield from _leaf_paths(v, (*prefix, k))


@dataclass
class _Layer:
    file: str
    text: str
    data: dict[str, Any]


def _load_chain(path: str, problems: list[Problem]) -> list[_Layer]:
    """The recipe and the recipes it extends, base first. Reports missing files and cycles."""
    chain: list[_Layer] = []
    seen: list[str] = []
    current: str | None = path
    while current is not None:
        real = os.path.realpath(current)
        if real in seen:
            cycle = " -> ".join([*(os.path.relpath(s) for s in seen), os.path.relpath(real)])
            problems.append(Problem(chain[-1].file, "$.extends", f"'extends' forms a cycle: {cycle}",
                                    *locate(chain[-1].text, ["extends"])))
            return []
        seen.append(real)
        data, text = _read_json(current, problems)
        if data is None:
            return []
        resolve_paths(data, os.path.dirname(os.path.abspath(current)))
        chain.append(_Layer(current, text, data))
        ext = data.get("extends")
        if ext is None:
            current = None
        elif not isinstance(ext, str) or not ext:
            problems.append(Problem(current, "$.extends", "'extends' must be a non-empty path string",
                                    *locate(text, ["extends"])))
            return []
        else:
            nxt = os.path.join(os.path.dirname(current), ext)
            if not os.path.exists(nxt):
                problems.append(Problem(current, "$.extends", f"extended recipe '{ext}' not found (looked for {nxt})",
                                        *locate(text, ["extends"])))
                return []
            current = nxt
    return list(reversed(chain))


def parse_override(text: str) -> tuple[list[str], Any]:
    """'training.learning_rate=1e-4' -> (['training', 'learning_rate'], 0.0001). Values parse as JSON if they can,
    else they are strings."""
    key, sep, value = text.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(parts):
        raise ValueError(f"override '{text}' must look like section.key=value, e.g. training.learning_rate=1e-4")
    try:
        parsed = loads(value)
    except (ValueError, RecursionError):  # not JSON (or NaN/Infinity): the value is a string
        parsed = value
    return parts, parsed


def apply_override(recipe: dict[str, Any], parts: Sequence[str], value: Any) -> None:
    node = recipe
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value


def check_recipe(path: str, overrides: Sequence[str] = ()) -> tuple[Recipe | None, list[Problem]]:
    """Load and validate one recipe; returns the recipe (None when invalid) and every problem found."""
    problems: list[Problem] = []
    chain = _load_chain(path, problems)
    if not chain:
        return None, problems

    merged: dict[str, Any] = {}
    origin: dict[tuple[str, ...], _Layer] = {}
    for layer in chain:
        merged = deep_merge(merged, layer.data)
        for p in _leaf_paths(layer.data):
            origin[p] = layer
    merged.pop("extends", None)

    override_origin: dict[tuple[str, ...], str] = {}
    for text in overrides:
        try:
            parts, value = parse_override(text)
        except ValueError as exc:
            problems.append(Problem(path, "$", str(exc)))
            continue
        if parts[0] == "extends":
            problems.append(Problem(path, "$.extends", "'extends' cannot be overridden: it is read from the recipe "
                                    "files", override=text))
            continue
        apply_override(merged, parts, value)
        layer_dir = os.getcwd()
        if len(parts) == 2 and tuple(parts) in PATH_FIELDS and isinstance(value, str) and is_local_path(value, layer_dir):
            apply_override(merged, parts, os.path.abspath(os.path.expanduser(value)))
        elif tuple(parts[:2]) in (("data", "datasets"), ("evaluation", "sets")):
            # Paths inside an overridden mixture or evaluation set are relative to the current folder.
            section = merged.get(parts[0])
            for node in source_nodes({parts[0]: section}) if isinstance(section, dict) else []:
                resolve_source(node, layer_dir)
        for i in range(1, len(parts) + 1):
            override_origin[tuple(parts[:i])] = text

    expand_home(merged)

    def problem(parts: Sequence[str | int], message: str) -> Problem:
        key = tuple(str(p) for p in parts)
        for n in range(len(key), 0, -1):
            if key[:n] in override_origin:
                return Problem(path, json_path(parts), message, override=override_origin[key[:n]])
            if key[:n] in origin:
                layer = origin[key[:n]]
                return Problem(layer.file, json_path(parts), message, *locate(layer.text, list(parts)))
        return Problem(chain[-1].file, json_path(parts), message)

    schema_errs = schema_problems(merged)
    problems.extend(problem(p, m) for p, m in schema_errs)
    # A section with a schema error is skipped by the semantic rules; so is a missing required section (the
    # other sections are still checked, so every problem is reported at once).
    bad_sections = {str(p[0]) for p, _ in schema_errs if p}
    bad_sections |= {k for k in required_keys() if k not in merged}
    cfg = apply_defaults(schema(), merged)
    data_format, found = data_format_of(merged, cfg, bad_sections)
    problems.extend(problem(p, m) for p, m in found)
    problems.extend(problem(p, m) for p, m in semantic_problems(merged, cfg, bad_sections))
    if problems:
        return None, problems
    warnings = [replace(problem(p, m), severity="warning") for p, m in recipe_warnings(cfg)]
    return Recipe(source=path, raw=merged, config=cfg, files=[layer.file for layer in reversed(chain)],
                  warnings=warnings, data_format=data_format), problems


def recipe_from_dict(raw: dict[str, Any], source: str, files: Sequence[str] = ()) -> Recipe:
    """A recipe from an already merged dict (``extends`` resolved, paths absolute), validated like a file: for
    processes that receive a recipe rather than read one (``finsft bench`` workers)."""
    found = schema_problems(raw)
    bad_sections = {str(p[0]) for p, _ in found if p} | {k for k in required_keys() if k not in raw}
    cfg = apply_defaults(schema(), raw)
    data_format, detected = data_format_of(raw, cfg, bad_sections)
    found += detected
    found += semantic_problems(raw, cfg, bad_sections)
    if found:
        raise RecipeError([Problem(source, json_path(p), m) for p, m in found])
    return Recipe(source=source, raw=copy.deepcopy(raw), config=cfg, files=list(files), data_format=data_format)


def load_recipe(path: str, overrides: Sequence[str] = ()) -> Recipe:
    """A valid recipe, or RecipeError listing every problem."""
    recipe, problems = check_recipe(path, overrides)
    if recipe is None:
        raise RecipeError(problems)
    return recipe


def expand_paths(args: Sequence[str]) -> tuple[list[str], list[str]]:
    """Files from files, folders (recursively, *.json, skipping hidden folders and files inside them) and globs
    (files only). Returns (files, arguments that matched none)."""
    import glob

    files: list[str] = []
    unmatched: list[str] = []
    for arg in args:
        if os.path.isdir(arg):
            found = sorted(
                str(p) for p in Path(arg).rglob("*.json")
                if p.is_file() and not any(part.startswith(".") for part in p.relative_to(arg).parts)
            )
        elif os.path.exists(arg):
            found = [arg]
        else:
            found = sorted(f for f in glob.glob(arg, recursive=True) if os.path.isfile(f))
        if not found:
            unmatched.append(arg)
        files.extend(f for f in found if f not in files)
    return files, unmatched
