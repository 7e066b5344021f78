"""The recipe schema's library keys, generated from the libraries themselves.

The ``training``, ``lora`` and ``quantization`` sections of ``finsft/schemas/recipe.schema.json`` hold two kinds
of keys:

* finsft's own keys, written by hand (``precision``, ``"auto"`` settings, finsft's defaults such as
  ``learning_rate`` 2e-4): they come first and are kept as they are;
* every other field of ``trl.SFTConfig`` (with ``transformers.TrainingArguments``), ``peft.LoraConfig`` and
  ``transformers.BitsAndBytesConfig``, generated here with its type, allowed values, the library's default and the
  library's help text. They carry ``"x-library"`` and are passed through unchanged when a recipe sets them
  (``finsft.plan.configs.library_kwargs``); their defaults are the library's, so they are not filled in.

Fields that finsft sets itself are excluded, with the reason (``EXCLUDED``; the schema lists them under
``"x-excluded"`` so that the README and the unknown-key error can say why).

``python -m finsft.library_schema`` rewrites the schema from the installed libraries (``--check``: only report
whether it is up to date); tests/test_library_schema.py fails when the installed libraries and the schema differ.
This module imports the libraries; recipe validation never imports it.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import inspect
import json
import re
import sys
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

SCHEMA_FILE = "schemas/recipe.schema.json"
COMMAND = "python -m finsft.library_schema"
MARK = "x-library"
EXCLUDED_MARK = "x-excluded"
SECTION_MARK = "x-library-class"

SECTIONS: dict[str, str] = {
    "training": "trl.SFTConfig",
    "lora": "peft.LoraConfig",
    "quantization": "transformers.BitsAndBytesConfig",
}

_DATA = "finsft builds the prompt-completion rows itself (data and template sections)"
_MODEL = "finsft loads the model and tokenizer itself (model and template sections)"
_HUB = "finsft does not push from inside training; Hub tokens never belong in a recipe"
_SHARDING = "chosen with `accelerate launch --config_file` (finsft reads the engine from the launcher)"

# Library fields that a recipe cannot set, with the reason (shown in the README and in the error for such a key).
EXCLUDED: dict[str, dict[str, str]] = {
    "training": {
        "output_dir": "finsft writes checkpoints under the run folder (output.dir) itself",
        "bf16": "set by training.precision",
        "fp16": "set by training.precision",
        "use_cpu": "chosen by the hardware (CPU when no GPU is visible)",
        "activation_checkpointing": "set by training.gradient_checkpointing",
        "activation_checkpointing_kwargs": "finsft uses non-reentrant checkpointing, which LoRA needs",
        "gradient_checkpointing_kwargs": "finsft uses non-reentrant checkpointing, which LoRA needs",
        "train_sampling_strategy": "set by training.group_by_length",
        "packing_strategy": "finsft packs with best-fit decreasing (training.packing)",
        "padding_free": "on exactly when packing (training.packing)",
        "completion_only_loss": "set by template.completion_only_loss",
        "assistant_only_loss": "finsft trains on prompt-completion rows; use template.completion_only_loss",
        "include_num_input_tokens_seen": "finsft counts non-padding tokens for its throughput display",
        "disable_tqdm": "finsft's own progress display replaces tqdm",
        "logging_first_step": "always on: the first step's loss is shown",
        "remove_unused_columns": _DATA,
        "dataset_kwargs": _DATA,
        "dataset_text_field": _DATA,
        "data_seed": "set to training.seed",
        "ddp_find_unused_parameters": "set by finsft: false for LoRA, the library's choice otherwise",
        "do_train": "not used by the Trainer (a flag of example scripts)",
        "do_eval": "not used by the Trainer (a flag of example scripts)",
        "do_predict": "not used by the Trainer (a flag of example scripts)",
        "resume_from_checkpoint": "use `finsft train RECIPE --resume`",
        "local_rank": "set by the launcher",
        "fsdp": _SHARDING,
        "fsdp_config": _SHARDING,
        "deepspeed": _SHARDING,
        "accelerator_config": "set through accelerate's configuration",
        "parallelism_config": "a Python object (accelerate ParallelismConfig), not JSON",
        "model_init_kwargs": _MODEL,
        "trust_remote_code": "use model.trust_remote_code",
        "chat_template_path": _MODEL,
        "eos_token": _MODEL,
        "pad_token": _MODEL,
        "push_to_hub": _HUB,
        "hub_token": _HUB,
        "hub_private_repo": _HUB,
        "hub_model_id": _HUB,
        "hub_strategy": _HUB,
        "hub_always_push": _HUB,
        "hub_revision": _HUB,
    },
    "lora": {
        "task_type": "always CAUSAL_LM (finsft trains causal language models)",
        "peft_type": "always LORA",
        "auto_mapping": "written by PEFT when it saves the adapter",
        "peft_version": "written by PEFT when it saves the adapter",
        "base_model_name_or_path": "written by PEFT from model.name_or_path",
        "revision": "written by PEFT from model.revision",
        "inference_mode": "false while training; set when the adapter is loaded for inference",
        "runtime_config": "runtime-only settings, not saved with the adapter",
    },
    "quantization": {},
}

# finsft keys whose allowed values are the library's (plus finsft's own, first): refreshed on every generation.
def _integrations() -> list[str]:
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    return list(INTEGRATION_TO_CALLBACK)


def _enum_of(section: str, key: str) -> Callable[[], list[Any]]:
    def values() -> list[Any]:
        field = next(f for f in library_fields(section) if f.name == key)
        return list(field.schema.get("enum", []))

    return values


def _refresh_values(own: dict[str, Any], section: str) -> None:
    """Set the allowed values of finsft keys that take a library's names (optimizers, schedulers, trackers)."""
    if section != "training":
        return
    for key, extra in (("optim", ["auto"]), ("lr_scheduler_type", [])):
        if key in own:
            own[key]["enum"] = [*extra, *(v for v in _enum_of(section, key)() if v not in extra)]
    if "report_to" in own:
        names = _integrations()
        one, many = own["report_to"]["anyOf"]
        one["enum"] = ["none", "all", *names]
        many["items"]["enum"] = names


# Examples for a few generated keys (the rest show their default).
EXAMPLES: dict[tuple[str, str], list[Any]] = {
    ("training", "neftune_noise_alpha"): [5],
    ("training", "lr_scheduler_kwargs"): [{"min_lr": 1e-6}],
    ("training", "adam_beta2"): [0.95],
    ("training", "eval_on_start"): [True],
    ("training", "load_best_model_at_end"): [True],
    ("training", "metric_for_best_model"): ["eval_loss"],
    ("training", "project"): ["finsft"],
    ("training", "torch_compile"): [True],
    ("lora", "init_lora_weights"): ["pissa", True],
    ("lora", "rank_pattern"): [{"q_proj": 32}],
    ("lora", "alpha_pattern"): [{"q_proj": 64}],
    ("lora", "exclude_modules"): [["lm_head"]],
    ("quantization", "llm_int8_skip_modules"): [["lm_head"]],
}

# BitsAndBytesConfig is not a dataclass: the docstring's type names, as JSON Schema.
_DOC_TYPES: dict[str, dict[str, Any]] = {
    "bool": {"type": "boolean"},
    "float": {"type": "number"},
    "int": {"type": "integer"},
    "str": {"type": "string"},
    "list[str]": {"type": "array", "items": {"type": "string"}},
}


class UnsupportedField(TypeError):
    """A library field whose type has no JSON form: add it to EXCLUDED with a reason."""


def library_class(section: str) -> Any:
    import importlib

    module, _, name = SECTIONS[section].rpartition(".")
    return getattr(importlib.import_module(module), name)


# ------------------------------------------------------------------------------------------- types to JSON


def _is_enum(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, enum.Enum)


def json_schema_of(tp: Any) -> dict[str, Any]:
    """JSON Schema of a Python type annotation. Raises UnsupportedField for types with no JSON form."""
    if tp is type(None):
        return {"type": "null"}
    if tp is typing.Any:
        return {}
    for py, name in ((bool, "boolean"), (int, "integer"), (float, "number"), (str, "string")):
        if tp is py:
            return {"type": name}
    if _is_enum(tp):
        return {"enum": [m.value for m in tp]}
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Literal:
        # A value such as "pissa_niter_[number of iters]" stands for a family of names: a pattern.
        family = [a for a in args if isinstance(a, str) and re.search(r"\[.+\]", a)]
        plain = {"enum": [a for a in args if a not in family]}
        if not family:
            return plain
        patterns = [{"type": "string", "pattern": "^" + re.sub(r"\\\[.+\\\]", "[0-9]+", re.escape(a)) + "$"}
                    for a in family]
        return {"anyOf": [plain, *patterns]}
    if tp in (list, tuple) or origin in (list, tuple, Sequence):
        if origin is tuple and args and args[-1] is not Ellipsis:
            item = _union_schema(args)
            return {"type": "array", "items": item, "minItems": len(args), "maxItems": len(args)}
        return {"type": "array", "items": json_schema_of(args[0])} if args else {"type": "array"}
    if tp is dict or origin in (dict, Mapping):
        if args and args[1] is not typing.Any:
            return {"type": "object", "additionalProperties": json_schema_of(args[1])}
        return {"type": "object"}
    if origin in (typing.Union, types.UnionType):
        return _union_schema(args)
    if dataclasses.is_dataclass(tp):
        return {"type": "object"}
    raise UnsupportedField(f"no JSON form for {tp!r}")


_TYPE_RANK = {"boolean": 0, "integer": 1, "number": 2, "string": 3, "object": 4, "array": 5, "null": 9}


def _schema_rank(sch: dict[str, Any]) -> tuple[int, str]:
    kind = sch.get("type")
    return (_TYPE_RANK.get(kind, 6) if isinstance(kind, str) else 6), json.dumps(sch, sort_keys=True)


def _union_schema(args: Sequence[Any]) -> dict[str, Any]:
    alts = list(args)
    # "SchedulerType | str", "dict | str": the string is the command line's spelling of the enum or of the object.
    if str in alts and any(_is_enum(a) or a is dict or typing.get_origin(a) is dict for a in alts):
        alts.remove(str)
    schemas: list[dict[str, Any]] = []
    for a in alts:
        sch = json_schema_of(a)
        schemas += sch["anyOf"] if set(sch) == {"anyOf"} else [sch]
    merged: list[dict[str, Any]] = []
    for s in schemas:  # one entry per distinct schema
        if s not in merged:
            merged.append(s)
    # A canonical order: typing caches unions by their members regardless of order, so the order seen here depends
    # on which equal union was built first in the process (an import elsewhere changes it).
    merged.sort(key=_schema_rank)
    if len(merged) == 1:
        return merged[0]
    if all(set(s) == {"type"} and isinstance(s["type"], str) for s in merged):
        return {"type": [s["type"] for s in merged]}
    if all(set(s) == {"enum"} for s in merged):
        return {"enum": [v for s in merged for v in s["enum"]]}
    nulls = [s for s in merged if s == {"type": "null"}]
    others = [s for s in merged if s != {"type": "null"}]
    # A nullable single schema: "type": [X, "null"] keeps the documentation short.
    if nulls and len(others) == 1 and isinstance(others[0].get("type"), str) and "enum" not in others[0]:
        return {**others[0], "type": [others[0]["type"], "null"]}
    if nulls and len(others) == 1 and "enum" in others[0]:
        return {"enum": [*others[0]["enum"], None]}
    return {"anyOf": merged}


def _json_value(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    json.dumps(value)  # raises TypeError for objects with no JSON form
    return value


def _clean(text: str) -> str:
    return re.sub(r"[ \t]*\n[ \t]*", "\n", text.strip())


# -------------------------------------------------------------------------------------------- the fields


@dataclasses.dataclass
class LibraryField:
    name: str
    schema: dict[str, Any]
    default: Any
    description: str


def dataclass_fields(cls: Any) -> list[LibraryField]:
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        try:
            sch = json_schema_of(hints[f.name])
            if f.metadata.get("choices"):
                choices = list(f.metadata["choices"])
                sch = {"enum": choices + ([None] if "null" in json.dumps(sch) else [])}
            if f.default is not dataclasses.MISSING:
                default = _json_value(f.default)
            elif f.default_factory is not dataclasses.MISSING:
                default = _json_value(f.default_factory())
            else:
                raise UnsupportedField("no default")
        except (UnsupportedField, TypeError) as exc:
            out.append(LibraryField(f.name, {}, None, f"UNSUPPORTED: {exc}"))
            continue
        out.append(LibraryField(f.name, sch, default, _clean(f.metadata.get("help", ""))))
    return out


def _docstring_args(cls: Any) -> dict[str, tuple[str, str]]:
    """{name: (type text, description)} from the Args section of a Hugging Face docstring."""
    doc = inspect.getdoc(cls) or ""
    args = doc.split("Args:", 1)[1] if "Args:" in doc else ""
    out: dict[str, tuple[str, str]] = {}
    for m in re.finditer(r"^    (\w+) \(`([^`]*)`[^)]*\):\n((?:        .*\n?|\n)*)", args, re.M):
        out[m.group(1)] = (m.group(2), _clean(" ".join(m.group(3).split())))
    return out


def signature_fields(cls: Any) -> list[LibraryField]:
    docs = _docstring_args(cls)
    out = []
    for p in inspect.signature(cls.__init__).parameters.values():
        if p.name == "self" or p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
            continue
        type_text, description = docs.get(p.name, ("", ""))
        sch = _DOC_TYPES.get(type_text)
        if sch is None:
            out.append(LibraryField(p.name, {}, None, f"UNSUPPORTED: docstring type {type_text!r}"))
            continue
        if p.default is None:
            sch = {**sch, "type": [sch["type"], "null"]}
        out.append(LibraryField(p.name, sch, _json_value(p.default), description))
    return out


def library_fields(section: str) -> list[LibraryField]:
    cls = library_class(section)
    # BitsAndBytesConfig inherits dataclass fields from its mixin, but its own settings are __init__ arguments.
    params = set(inspect.signature(cls.__init__).parameters) - {"self"}
    generated_init = dataclasses.is_dataclass(cls) and {f.name for f in dataclasses.fields(cls) if f.init} == params
    return dataclass_fields(cls) if generated_init else signature_fields(cls)


# ---------------------------------------------------------------------------------------------- generation


def _property(section: str, f: LibraryField) -> dict[str, Any]:
    description = f.description or f"{SECTIONS[section]}.{f.name}."
    return {
        **f.schema,
        "description": description,
        "default": f.default,
        "examples": EXAMPLES.get((section, f.name), [f.default]),
        MARK: SECTIONS[section],
    }


def generate(current: Mapping[str, Any], fields: Callable[[str], list[LibraryField]] = library_fields
             ) -> dict[str, Any]:
    """The schema ``current`` with its library keys regenerated from the installed libraries: finsft's own keys
    (those without ``x-library``) first and unchanged, then every library field that is neither one of them nor
    excluded. Raises ValueError for fields with no JSON form that are not excluded, and for stale exclusions."""
    out = json.loads(json.dumps(current))
    problems = []
    for section, source in SECTIONS.items():
        node = out["properties"][section]
        own = {k: v for k, v in node["properties"].items() if MARK not in v}
        found = fields(section)
        names = {f.name for f in found}
        excluded = EXCLUDED[section]
        problems += [f"{section}.{k}: excluded, but {source} has no such field" for k in excluded if k not in names]
        problems += [f"{section}.{k}: both a finsft key and excluded" for k in excluded if k in own]
        generated = {}
        for f in found:
            if f.name in own or f.name in excluded:
                continue
            if f.description.startswith("UNSUPPORTED"):
                problems.append(f"{section}.{f.name}: {f.description[13:]}; exclude it with a reason in EXCLUDED")
                continue
            generated[f.name] = _property(section, f)
        _refresh_values(own, section)
        node["properties"] = {**own, **generated}
        node[SECTION_MARK] = source
        node[EXCLUDED_MARK] = dict(excluded)
    if problems:
        raise ValueError("the libraries' fields do not fit the schema:\n  " + "\n  ".join(problems))
    return out


def library_versions() -> dict[str, str]:
    from importlib.metadata import version

    return {name: version(name) for name in ("transformers", "trl", "peft")}


def schema_path() -> Path:
    return Path(str(resources.files("finsft").joinpath(SCHEMA_FILE)))


def dumps(value: Any, indent: int = 0, width: int = 118) -> str:
    """JSON as the schema file writes it: two-space indents, with any list or object that fits the line on one
    line."""
    return _dump(value, indent, width) + ("\n" if indent == 0 else "")


def _dump(value: Any, indent: int, width: int) -> str:
    flat = json.dumps(value, ensure_ascii=False)
    if not isinstance(value, (dict, list)) or not value or indent + len(flat) <= width - 12:
        return flat
    pad = " " * (indent + 2)
    if isinstance(value, list):
        items = [pad + _dump(v, indent + 2, width) for v in value]
        return "[\n" + ",\n".join(items) + "\n" + " " * indent + "]"
    items = [f"{pad}{json.dumps(k, ensure_ascii=False)}: {_dump(v, indent + 2, width)}" for k, v in value.items()]
    return "{\n" + ",\n".join(items) + "\n" + " " * indent + "}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=COMMAND, description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only check that the schema is up to date (exit 1)")
    args = parser.parse_args(argv)
    path = schema_path()
    text = path.read_text(encoding="utf-8")
    new = dumps(generate(json.loads(text)))
    versions = ", ".join(f"{k} {v}" for k, v in library_versions().items())
    if new == text:
        print(f"{path}: up to date with {versions}")
        return 0
    if args.check:
        print(f"{path}: differs from {versions}; run `{COMMAND}`", file=sys.stderr)
        return 1
    path.write_text(new, encoding="utf-8")
    print(f"{path}: regenerated from {versions}; now run `python -m finsft.docs README.md`")
    return 0


if __name__ == "__main__":
    sys.exit(main())
