"""The model card (README.md) of a run folder, written with huggingface_hub's ``ModelCard``/``ModelCardData``.

Every output folder gets one: the adapter (or fully fine-tuned model) at the top of the run folder and the merged
model in ``merged/``. The card is built from what the run folder records (``recipe.json``, ``manifest.json``,
``eval.json``), so ``finsft push`` can write it for a run made before cards existed. The YAML header carries the
hub metadata (base model, datasets, licence, ``model-index`` with the evaluation results, so the hub shows them);
the text says what was trained on what, how, how well, and with which library versions.
"""

from __future__ import annotations

import hashlib
import html
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from finsft.files import UnreadableFile, read_bytes, read_json, write_file
from finsft.recipe import PACKAGE_PREFIX

CARD = "README.md"
FINSFT_TAG = "finsft"

# Licences of base models finsft knows (hub licence ids), by hub id in lower case.
MODEL_LICENSES: dict[str, str] = {
    "huggingfacetb/smollm2-135m-instruct": "apache-2.0",
    "huggingfacetb/smollm2-135m": "apache-2.0",
    "huggingfacetb/smollm2-360m-instruct": "apache-2.0",
    "huggingfacetb/smollm2-1.7b-instruct": "apache-2.0",
    "google/gemma-2b": "gemma",
    "mistralai/mistral-7b-v0.1": "apache-2.0",
    "meta-llama/meta-llama-3-8b": "llama3",
    "qwen/qwen2.5-7b": "apache-2.0",
}

# Data sets finsft recognises: (hub ids, file-name prefixes, name, hub licence id).
KNOWN_DATA: list[tuple[tuple[str, ...], tuple[str, ...], str, str]] = [
    (("zeroshot/twitter-financial-news-sentiment",), ("tfns", "twitter_financial_news", "sent_train", "sent_valid"),
     "Twitter Financial News Sentiment (TFNS)", "mit"),
    (("takala/financial_phrasebank", "financial_phrasebank"), ("fpb", "financial_phrasebank"),
     "Financial PhraseBank (FPB)", "cc-by-nc-sa-3.0"),
]
UNKNOWN_LICENSE = "unknown, check the source"

TFNS = "zeroshot/twitter-financial-news-sentiment"
# Local files whose hub source is known, recognised by name AND content (sha256): file name -> (sha256, hub id,
# hub config, hub split, what the rows are). recipes/data/README.md and ../shared/data/SOURCES.md document them.
KNOWN_FILES: dict[str, tuple[str, str, str | None, str, str]] = {
    "tfns_quickstart_train.jsonl": ("080abe63493c98b134b4e1d57633889824dc907de7586f7cd176b090d3c8c0f7", TFNS, None,
                                    "train", "a 480-row class-balanced subset of the train split"),
    "tfns_quickstart_heldout.jsonl": ("2340bcd7c8885cbfbbfbfe4140f17d5b5741b0f1266e32b6b9c9cf8401407ac3", TFNS,
                                      None, "validation", "a 300-row class-balanced subset of the validation split"),
    "tfns_train.jsonl": ("4b1230defc90713863440b97e2f57d88e08519116a9d0a9da40f51bc4906ecb0", TFNS, None, "train",
                         "the whole train split"),
    "tfns_valid.jsonl": ("3bd659a3c092ca71cb9f322ff2471c001cee43e23608fc8d9bb5207c53387794", TFNS, None,
                         "validation", "the whole validation split"),
    "fpb.jsonl": ("25e1577da06569e45fc3dbad995e86fa9fe558c200ae45e88b42eda6c1f2b403", "takala/financial_phrasebank",
                  "sentences_50agree", "train", "the whole sentences_50agree set"),
}
# An absolute path (or ~/...) in text: the card names files, never where they were on the training machine. A path
# starts a text or follows a space, a quote, a backtick, a bracket, ``=`` or ``,``: never a word, a URL's ``:/``, the
# ``<`` of a closing tag (``</details>``) or an escaped entity's ``;`` (``&lt;/script&gt;``).
_ABS_PATH = re.compile(r"(?<![^\s\"'`(\[{=,])~?/(?:[\w.@+-]+/)*([\w.@+-]+)/?")
# Characters that start a Markdown block (heading, thematic break, list, fence, table, quote) at a line's start.
_BLOCK_START = re.compile(r"^(\s*\d*)([#=+*_`~|.)-])")


def portable(text: str) -> str:
    """``text`` with every absolute path replaced by its last component (a file or folder name)."""
    return _ABS_PATH.sub(lambda m: m.group(1), text)


def fence(body: str, info: str = "") -> list[str]:
    """``body`` as a fenced code block whose fence is longer than any backtick run in it (CommonMark: a fence is
    closed only by a fence at least as long), so no text inside can end the block."""
    longest = max((len(run) for run in re.findall(r"`+", body)), default=0)
    ticks = "`" * max(3, longest + 1)
    return [ticks + info, body, ticks]


def code_span(text: Any) -> str:
    """``text`` as an inline code span that a backtick inside cannot end (one line; HTML is literal in a span)."""
    value = " ".join(str(text).splitlines())
    longest = max((len(run) for run in re.findall(r"`+", value)), default=0)
    ticks = "`" * (longest + 1)
    pad = " " if value.startswith("`") or value.endswith("`") or longest else ""
    return f"{ticks}{pad}{value}{pad}{ticks}"


def inline(text: Any, line_start: bool = False) -> str:
    """Text from a recipe or data as Markdown inline text on one line: HTML escaped (no tag, no ``</details>``),
    table pipes escaped; at a line's start (``line_start``) a block marker is escaped too (no heading, thematic
    break, list, quote or fence)."""
    value = html.escape(" ".join(str(text).splitlines()), quote=False).replace("|", "\\|")
    return _BLOCK_START.sub(lambda m: m.group(1) + "\\" + m.group(2), value) if line_start else value


def quote(text: Any) -> list[str]:
    """Text from a recipe (a description) as a Markdown block quote, line by line: each line escaped by ``inline``,
    so no line can end the quote, start a heading (``#``, or ``---``/``===`` under a line), a fence or HTML."""
    return [f"> {inline(line, line_start=True)}".rstrip() for line in str(text).splitlines() or [""]]


def prompt_example(formatter: Any, row: Mapping[str, Any]) -> dict[str, Any] | None:
    """One row's prompt fields and the exact prompt ``formatter`` (finsft.data.Formatter) makes of them, as the
    manifest records it for the model card; None when the row cannot be rendered."""
    from finsft.templates import format_fields

    template = formatter.template
    names = [template.messages_field] if template.messages_field else format_fields(template.prompt)
    fields = {}
    for n in names:
        value = row.get(n)
        fields[n] = template.defaults.get(n, value) if value is None or value == "" else value
    try:
        prompt = formatter.prompt(row)
    except Exception:  # a row the template cannot render: no example
        return None
    return {"row": fields, "prompt": prompt, "chat_template": bool(formatter.chat), "system": formatter.system}


def known_source(ref: str) -> dict[str, Any] | None:
    """The hub source of a local file finsft knows (its name and sha256 match), else None."""
    entry = KNOWN_FILES.get(Path(ref).name)
    if entry is None or not is_local(ref):
        return None
    path = Path(ref).expanduser()
    try:
        digest = hashlib.sha256(read_bytes(path, "data file")).hexdigest() if path.is_file() else None
    except UnreadableFile:
        return None
    if digest != entry[0]:
        return None
    return {"hub_id": entry[1], "config": entry[2], "split": entry[3], "subset": entry[4]}


def is_local(ref: str | None) -> bool:
    """A local file or folder, or a model in a Python package, rather than a hub id (recipe.json holds resolved,
    absolute paths)."""
    return bool(ref) and (os.path.isabs(str(ref)) or str(ref).startswith((PACKAGE_PREFIX, ".", "~")))


def base_model_id(recipe: Mapping[str, Any], manifest: Mapping[str, Any]) -> str | None:
    """The base model's hub id: the manifest's (a GGUF or package model's origin), else the recipe's hub id."""
    base = manifest.get("base_model")
    if isinstance(base, Mapping) and base.get("hub_id"):
        return str(base["hub_id"])
    ref = recipe.get("model", {}).get("name_or_path")
    return None if not ref or is_local(ref) else str(ref)


def model_license(hub_id: str | None) -> str | None:
    return MODEL_LICENSES.get(hub_id.lower()) if hub_id else None


def data_license(ref: str) -> tuple[str | None, str]:
    """(hub licence id or None, what the data is and how it was recognised)."""
    name = Path(ref).name.lower() if is_local(ref) else ref.lower()
    for hub_ids, prefixes, title, licence in KNOWN_DATA:
        if not is_local(ref) and name in hub_ids:
            return licence, f"{title}, recognised by its hub id"
        if is_local(ref) and name.startswith(prefixes):
            return licence, f"{title}, recognised by the file name {Path(ref).name}"
    return None, "not recognised"


def data_sources(recipe: Mapping[str, Any], manifest: Mapping[str, Any],
                 report: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    """Every data set the run read: role, reference (hub id, or file name), rows, fingerprint, licence."""
    data, ev = recipe.get("data", {}), recipe.get("evaluation") or {}
    facts = manifest.get("data", {})
    out: list[dict[str, Any]] = []

    def add(role: str, ref: str | None, rows: Any, fingerprint: Any, split: str | None = None,
            config: str | None = None) -> None:
        if not ref:
            return
        licence, how = data_license(ref)
        local = is_local(ref)
        entry = {"role": role, "ref": ref, "hub": not local, "name": Path(ref).name if local else ref,
                 # a local file's split is its source's, when finsft knows the source; else there is none
                 "hub_id": None if local else ref, "config": None if local else config,
                 "split": None if local else split, "subset": None,
                 "rows": rows, "fingerprint": fingerprint, "license": licence, "recognised": how}
        source = known_source(ref) if local else None
        if source:
            entry.update(hub_id=source["hub_id"], config=source["config"], split=source["split"],
                         subset=source["subset"])
            if not licence:
                entry["license"], entry["recognised"] = data_license(source["hub_id"])
        out.append(entry)

    add("training", data.get("path"), facts.get("train_rows"), facts.get("fingerprint"), data.get("split"))
    if data.get("validation_path"):
        add("validation", data["validation_path"], facts.get("validation_rows"), facts.get("fingerprint"))
    if ev.get("path"):
        add("evaluation", ev["path"], report.get("rows") if report else None,
            report.get("rows_fingerprint") if report else None, ev.get("split"))
    return out


def hub_datasets(datasets: list[dict[str, Any]]) -> list[str] | None:
    """The ``datasets:`` metadata: hub ids of the data the run read (hub data, and local files of a known
    source)."""
    return sorted({d["hub_id"] for d in datasets if d["hub_id"]}) or None


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    if value is None:
        return "-"
    return inline(value)


def _eval_results(report: Mapping[str, Any] | None, datasets: list[dict[str, Any]],
                  recipe: Mapping[str, Any]) -> list[Any]:
    """``EvalResult`` entries for model-index: the trained model's numbers on the evaluation rows."""
    from huggingface_hub import EvalResult

    if not report or not report.get("metrics"):
        return []
    m = report["metrics"]
    common = _eval_dataset(datasets)
    if report.get("rows"):
        common["dataset_name"] += f", {report['rows']} rows scored"
    template = recipe.get("template", {}).get("name")
    if "accuracy" in m:
        task: dict[str, Any] = {"task_type": "text-classification", "task_name": f"sentiment / classification ({template})"}
        metrics = [("accuracy", "accuracy", m["accuracy"], None), ("f1", "macro F1", m["macro_f1"], "macro"),
                   ("f1", "weighted F1", m["weighted_f1"], "weighted")]
    else:
        task = {"task_type": "text-generation", "task_name": f"question answering / generation ({template})"}
        metrics = [("rouge", "ROUGE-L", m["rougeL"], "rougeL"), ("f1", "token F1", m["token_f1"], "token")]
    return [EvalResult(**task, **common, metric_type=kind, metric_name=name, metric_value=round(float(value), 4),
                       metric_config=config)
            for kind, name, value, config in metrics]


def _eval_dataset(datasets: list[dict[str, Any]]) -> dict[str, Any]:
    """model-index's dataset of the evaluation rows: the hub id, config and split they come from where finsft
    knows them (``type``), a readable name, and no split when it is unknown (a local file of unknown source)."""
    evaluation = next((d for d in datasets if d["role"] == "evaluation"), None)
    held_out = evaluation is None
    if held_out:  # the validation split: validation_path, or rows held out of the training data
        evaluation = next((d for d in datasets if d["role"] == "validation"), None)
        held_out = evaluation is None
        evaluation = evaluation or next((d for d in datasets if d["role"] == "training"), None)
    if evaluation is None:
        return {"dataset_type": "validation split", "dataset_name": "held-out validation rows"}
    name = evaluation["name"]
    if evaluation["subset"]:
        name = f"{name} ({evaluation['subset']} of {evaluation['hub_id']})"
    if held_out:
        name = f"rows held out of {name} for validation"
    out: dict[str, Any] = {"dataset_type": evaluation["hub_id"] or evaluation["name"], "dataset_name": name}
    if evaluation["split"]:
        out["dataset_split"] = evaluation["split"]
    if evaluation["config"]:
        out["dataset_config"] = evaluation["config"]
    return out


def _kind(folder: Path) -> str:
    if (folder / "adapter_config.json").is_file():
        return "adapter"
    if (folder / "finsft_merge.json").is_file():
        return "merged"
    return "full"


def _metrics_table(report: Mapping[str, Any]) -> list[str]:
    after, before = report["metrics"], report.get("base_metrics")
    if "accuracy" in after:
        keys = [("accuracy", "accuracy"), ("macro_f1", "macro F1"), ("weighted_f1", "weighted F1")]
    else:
        keys = [("rougeL", "ROUGE-L"), ("token_f1", "token F1"), ("mean_generated_words", "generated words")]
        if "answer_perplexity" in after:
            keys = [("answer_perplexity", "answer perplexity (held-out references)"), *keys]
    lines = ["| metric | base model (before) | fine-tuned (after) |", "|---|---:|---:|"]
    for key, label in keys:
        lines.append(f"| {label} | {_fmt(before.get(key)) if before else '-'} | {_fmt(after.get(key))} |")
    if "per_class" in after:
        lines += ["", "Per class (precision / recall / F1, support):", "",
                  "| label | support | before | after |", "|---|---:|---|---|"]
        for label, a in after["per_class"].items():
            b = (before or {}).get("per_class", {}).get(label)
            fmt_b = f"{b['precision']:.3f} / {b['recall']:.3f} / {b['f1']:.3f}" if b else "-"
            lines.append(f"| {_fmt(label)} | {a['support']} | {fmt_b} | "
                         f"{a['precision']:.3f} / {a['recall']:.3f} / {a['f1']:.3f} |")
    return lines


def _usage_lines(kind: str, repo_id: str | None, base: str | None, recipe: Mapping[str, Any],
                 manifest: Mapping[str, Any]) -> list[str]:
    """The exact prompt of training (one example rendered by the template) and a transformers + PEFT snippet
    that loads the model, builds that prompt and generates the answer."""
    template = recipe.get("template", {})
    example = manifest.get("example") if isinstance(manifest.get("example"), Mapping) else None
    here = repo_id or "PATH/TO/THIS/FOLDER"
    sub = ', subfolder="merged"' if kind == "merged" and repo_id else ""
    lines: list[str] = ["", "## Prompt format", ""]
    chat = bool(example.get("chat_template")) if example else bool(template.get("chat_template"))
    fields = dict(example.get("row") or {}) if example else {}
    if example:
        lines += [f"The model was trained on prompts made by finsft's {code_span(template.get('name'))} template"
                  f"{' and the tokenizer chat template' if chat else ''}. For this training row:", "",
                  *fence(json.dumps(fields, indent=2, ensure_ascii=False), "json"), "",
                  "the exact prompt is (the answer follows it):", "", *fence(str(example.get("prompt")), "text")]
        labels = _template_labels(recipe)
        if labels:
            lines += ["", f"The answer is one of: {', '.join(code_span(x) for x in labels)}."]
    else:
        lines.append(f"Prompts follow finsft's {code_span(template.get('name'))} template; use the same format at "
                     "inference (the recipe below has it).")
    lines += ["", "## How to use", ""]
    code = ["import torch"]
    if kind == "adapter":
        code += ["from peft import PeftModel", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                  f'base = AutoModelForCausalLM.from_pretrained("{base or "PATH/TO/BASE_MODEL"}")',
                  f'model = PeftModel.from_pretrained(base, "{here}")  # the LoRA adapter',
                  f'tokenizer = AutoTokenizer.from_pretrained("{here}")']
    else:
        code += ["from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                  f'model = AutoModelForCausalLM.from_pretrained("{here}"{sub})',
                  f'tokenizer = AutoTokenizer.from_pretrained("{here}"{sub})']
    code.append("model.eval()")
    prompt_fmt = _prompt_format(recipe)
    if example and prompt_fmt is not None and not isinstance(fields.get("messages"), list):
        code += ["", f"fields = {json.dumps(fields, ensure_ascii=False)}  # your text in the same fields",
                  f"text = {json.dumps(prompt_fmt, ensure_ascii=False)}.format(**fields)"]
        if chat:
            system = example.get("system")
            msgs = (f'[{{"role": "system", "content": {json.dumps(system, ensure_ascii=False)}}}, '
                    if system else "[") + '{"role": "user", "content": text}]'
            code.append(f"prompt = tokenizer.apply_chat_template({msgs}, tokenize=False, "
                         "add_generation_prompt=True)")
        else:
            code.append("prompt = text")
        code += [f"inputs = tokenizer(prompt, return_tensors=\"pt\", add_special_tokens={not chat})",
                  "with torch.no_grad():",
                  f"    out = model.generate(**inputs, max_new_tokens={_max_new_tokens(recipe)}, do_sample=False)",
                  'print(tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip())']
    lines += fence("\n".join(code), "python")
    if kind == "adapter":
        lines += ["", "With finsft and the recipe: `finsft eval RECIPE --adapter THIS_FOLDER` scores it as in the "
                      "evaluation below; `finsft predict RECIPE --adapter THIS_FOLDER --input \"...\"` answers one text."]
    return lines


def _template(recipe: Mapping[str, Any]) -> Any:
    from finsft.templates import template_from_recipe

    try:
        return template_from_recipe(recipe.get("template", {}))
    except Exception:  # an entry point that is not installed here: the card goes without it
        return None


def _prompt_format(recipe: Mapping[str, Any]) -> str | None:
    """The template's prompt as a ``str.format`` string (None for chat data)."""
    template = _template(recipe)
    if template is None or template.messages_field:
        return None
    return str(template.prompt)


def _template_labels(recipe: Mapping[str, Any]) -> list[str] | None:
    template = _template(recipe)
    return list(template.labels) if template is not None and template.labels else None


def _max_new_tokens(recipe: Mapping[str, Any]) -> int:
    """evaluation.max_new_tokens, or its default: 8 for classification templates, 256 otherwise."""
    value = (recipe.get("evaluation") or {}).get("max_new_tokens")
    if isinstance(value, int) and value > 0:
        return value
    return 8 if _template_labels(recipe) else 256


def _hub_link(ref: str) -> str:
    """A link to a hub data set; an id that is not ``owner/name`` of plain characters is shown as code."""
    if re.fullmatch(r"[\w.-]+(/[\w.-]+)?", ref):
        return f"[{ref}](https://huggingface.co/datasets/{ref})"
    return code_span(ref)


def _data_lines(datasets: list[dict[str, Any]]) -> list[str]:
    """The training, validation and evaluation data with their fingerprints and licences."""
    lines: list[str] = []
    lines += ["", "## Data", "", "| role | data | split | rows | fingerprint | licence |", "|---|---|---|---:|---|---|"]
    for d in datasets:
        if d["hub"]:
            ref = _hub_link(d["ref"])
        elif d["hub_id"]:
            ref = f"{code_span(d['name'])}: {d['subset']} of {_hub_link(d['hub_id'])} (recognised by its sha256)"
        else:
            ref = f"{code_span(d['name'])} (local file)"
        licence = f"{d['license']} ({d['recognised']})" if d["license"] else UNKNOWN_LICENSE
        lines.append(f"| {d['role']} | {ref} | {_fmt(d['split'])} | {_fmt(d['rows'])} | {_fmt(d['fingerprint'])} | "
                     f"{licence} |")
    return lines


def _overlap_lines(manifest: Mapping[str, Any]) -> list[str]:
    """What the leak guard found: training rows whose input is also in the evaluation data."""
    data = manifest.get("data")
    overlap = data.get("eval_overlap") if isinstance(data, Mapping) else None
    if not isinstance(overlap, Mapping) or not overlap.get("checked"):
        return []
    sets = ", ".join(f"{inline(name)} ({n:,} rows)" for name, n in overlap["checked"].items())
    found = overlap.get("overlapping", 0)
    if not found:
        return ["", f"No training input appears in the evaluation data (compared with: {sets})."]
    by_set = ", ".join(f"{inline(name)}: {n:,}" for name, n in (overlap.get("by_set") or {}).items())
    if overlap.get("drop"):
        return ["", f"{overlap.get('dropped', 0):,} training rows whose input appears in the evaluation data were "
                    f"left out of training (by set: {by_set}; compared with: {sets})."]
    return ["", f"**{found:,} training rows have their input in the evaluation data and were trained on** (by set: "
                f"{by_set}): the scores on those sets are too high."]


def _evaluation_lines(report: Mapping[str, Any] | None) -> list[str]:
    """The evaluation numbers, before and after training."""
    lines: list[str] = []
    lines += ["", "## Evaluation", ""]
    if report and report.get("metrics"):
        lines += [f"{_fmt(report.get('rows'))} rows of {_fmt(report.get('data'))} (rows fingerprint "
                  f"{code_span(report.get('rows_fingerprint'))}), scored with the "
                  f"{code_span(report.get('settings', {}).get('scorer'))} scorer.", ""]
        lines += _metrics_table(report)
    else:
        lines.append("The run did not evaluate the model (the recipe has no `evaluation` section, or evaluation was "
                     "skipped). Score it with `finsft eval RECIPE --adapter THIS_FOLDER`.")
    return lines


def _training_lines(manifest: Mapping[str, Any], recipe: Mapping[str, Any], method: str, lora: Any) -> list[str]:
    """How the model was trained: settings, the plan, the recipe, library versions."""
    lines: list[str] = []
    train = manifest.get("train", {})
    hw = manifest.get("hardware", {})
    t = recipe.get("training", {})
    lines += ["", "## Training", "",
              f"- method: {method}" + (f" (r={lora.get('r')}, alpha={lora.get('lora_alpha')}, dropout="
                                       f"{lora.get('lora_dropout')}, target modules {inline(lora.get('target_modules'))})"
                                       if lora else ""),
              f"- steps: {_fmt(train.get('global_step'))}, effective batch {_fmt(train.get('effective_batch'))}, "
              f"learning rate {t.get('learning_rate')} ({t.get('lr_scheduler_type')}), max length "
              f"{t.get('max_length')}, seed {t.get('seed')}",
              f"- final mean training loss: {_fmt(train.get('train_loss'))}",
              f"- hardware: {hw.get('device', '-')} ({hw.get('name', '-')}), {hw.get('world_size', 1)} process(es); "
              f"wall time {manifest.get('wall_seconds') or 0:.0f} s"]
    plan = manifest.get("plan") or []
    if plan:
        lines += ["", "Choices finsft made for this hardware (the plan):", "", "| setting | value | reason |",
                  "|---|---|---|"]
        lines += [f"| {_fmt(c.get('setting'))} | {_fmt(c.get('value'))} | "
                  f"{'auto: ' if c.get('automatic') else ''}{_fmt(c.get('reason'))} |" for c in plan]
    lines += ["", "<details><summary>The resolved recipe (recipe.json)</summary>", "",
              *fence(json.dumps(dict(recipe), indent=2, ensure_ascii=False), "json"), "", "</details>"]
    libs = manifest.get("libraries") or {}
    if libs:
        lines += ["", "## Library versions", "", "| library | version |", "|---|---|"]
        lines += [f"| {_fmt(k)} | {_fmt(v)} |" for k, v in libs.items()]
    return lines


def _limitations_lines(datasets: list[dict[str, Any]], base: str | None, base_ref: Any, base_licence: str | None) -> list[str]:
    """Intended use, limitations and licences."""
    lines: list[str] = []
    nc = [d for d in datasets if d["role"] in ("training", "validation") and d["license"] and "-nc" in d["license"]]
    lines += ["", "## Intended use and limitations", "",
              "- Intended for research on financial text (sentiment, question answering) in the prompt format it was "
              "trained on. It is not financial advice and must not be the sole basis of investment decisions.",
              "- It inherits the biases and failure modes of its base model and its training data; scores hold for "
              "the evaluation data above and may not carry over to other sources, periods or phrasing.",
              "- Like any language model it can answer confidently and wrongly: check its outputs."]
    if nc:
        lines.append(f"- Trained on data under a non-commercial licence ({', '.join(d['license'] for d in nc)}): "
                     "check whether your use of this model is allowed.")
    lines += ["", "## Licences", "",
              f"- base model {inline(base or base_ref)}: {base_licence or UNKNOWN_LICENSE}"]
    for d in datasets:
        lines.append(f"- {d['role']} data {inline(d['name'])}: "
                     f"{(d['license'] + ' (' + d['recognised'] + ')') if d['license'] else UNKNOWN_LICENSE}")
    lines += ["- this card's `license` field is the base model's licence; the data licences above may add terms.",
              "", "Card written by finsft from the run's recipe.json, manifest.json and eval.json."]
    return lines


def run_numbers(manifest: Mapping[str, Any]) -> str | None:
    """What the run did, in its own numbers: steps, rows, minutes."""
    train, data = manifest.get("train") or {}, manifest.get("data") or {}
    steps = train.get("global_step")
    if not steps:
        return None
    text = f"This run trained for {steps} steps"
    if train.get("effective_batch"):
        text += f" of {train['effective_batch']} rows ({steps * train['effective_batch']:,} rows seen)"
    if data.get("train_rows"):
        text += f" on {data['train_rows']:,} training rows"
    if train.get("runtime_s"):
        text += f", in {train['runtime_s'] / 60:.1f} minutes of training"
    if manifest.get("wall_seconds"):
        text += f" ({manifest['wall_seconds'] / 60:.1f} minutes in all)"
    hw = manifest.get("hardware") or {}
    if hw.get("device"):
        text += f" on {hw['device']} ({hw.get('name', '-')}, {hw.get('world_size', 1)} process(es))"
    return text + "."


def recipe_changes(recipe: Mapping[str, Any], manifest: Mapping[str, Any]) -> list[str] | None:
    """The settings in which this run differs from its recipe file (``key.path=value`` overrides): ``[]`` when
    it ran the file as written, None when the file cannot be read any more."""
    from finsft.recipe import load_recipe

    files = manifest.get("recipe_files") or []
    try:
        written = load_recipe(str(files[0])).config
    except Exception:  # gone, moved or changed beyond validity: unknown
        return None

    def leaves(value: Any, path: str) -> dict[str, Any]:
        if isinstance(value, Mapping):
            out: dict[str, Any] = {}
            for k, v in value.items():
                out.update(leaves(v, f"{path}.{k}" if path else str(k)))
            return out
        return {path: value}

    ran, file = leaves(recipe, ""), leaves(written, "")
    return [f"{k}={json.dumps(ran.get(k))} (the file says {json.dumps(file.get(k))})"
            for k in sorted(set(ran) | set(file)) if ran.get(k) != file.get(k)]


def card_text(folder: Path, manifest: Mapping[str, Any], recipe: Mapping[str, Any],
              report: Mapping[str, Any] | None, repo_id: str | None = None) -> str:
    """The whole README.md: YAML metadata and Markdown body, section by section. No absolute path of the
    training machine appears in it: files are named by their names."""
    from huggingface_hub import ModelCard, ModelCardData

    kind = _kind(folder)
    base = base_model_id(recipe, manifest)
    base_ref = recipe.get("model", {}).get("name_or_path")
    datasets = data_sources(recipe, manifest, report)
    name = repo_id.split("/")[-1] if repo_id else str(manifest.get("recipe") or recipe.get("name") or "finsft-model")
    base_licence = model_license(base)
    quant = recipe.get("quantization")
    lora = recipe.get("lora")
    method = ("QLoRA" if quant else "LoRA") if lora else "full fine-tuning"
    tags = [FINSFT_TAG, "finance", method.lower().replace(" ", "-")]
    if kind == "adapter":
        tags += ["peft", "lora"] if "lora" not in tags else ["peft"]
    eval_results = _eval_results(report, datasets, recipe)
    data = ModelCardData(
        base_model=base, datasets=hub_datasets(datasets),
        license=base_licence or "unknown", library_name="peft" if kind == "adapter" else "transformers",
        pipeline_tag="text-generation", tags=tags, model_name=name if eval_results else None,
        eval_results=eval_results or None,
    )
    what = {"adapter": f"a {method} adapter", "merged": f"a {method} adapter merged into its base model (a plain "
            "model folder)", "full": "a fully fine-tuned model"}[kind]
    base_text = (f"[{inline(base)}](https://huggingface.co/{base})" if base and re.fullmatch(r"[\w.-]+(/[\w.-]+)?", base)
                 else f"{code_span(base or base_ref)}{'' if base else ' (a local model: no hub id known)'}")
    lines = [f"# {inline(name, line_start=True)}", "",
             f"This is {what} for {base_text}, trained by finsft with the recipe "
             f"{code_span(manifest.get('recipe') or recipe.get('name'))}."]
    numbers = run_numbers(manifest)
    if numbers:
        lines += ["", numbers]
    if recipe.get("description"):
        changes = recipe_changes(recipe, manifest)
        if changes:
            lines += ["", "The recipe file's description is left out: this run changed its settings ("
                      + "; ".join(code_span(c) for c in changes) + ")."]
        else:
            lines += ["", *quote(recipe["description"])]
            if changes is None:
                lines += [">", "> (the recipe file's description; the run's own numbers are above)"]
    base_info = manifest.get("base_model") if isinstance(manifest.get("base_model"), Mapping) else None
    if base and is_local(base_ref):
        how = base_info.get("hub_id_reason") if base_info else "the manifest"
        gguf = recipe["model"].get("gguf_file")
        lines += ["", f"The run loaded the base model from {code_span(base_ref)}"
                      f"{f' ({code_span(gguf)}, de-quantized)' if gguf else ''}; its hub id {inline(base)} comes from "
                      f"{inline(how)}."]

    lines += _usage_lines(kind, repo_id, base, recipe, manifest)
    lines += _data_lines(datasets) + _overlap_lines(manifest)
    lines += _evaluation_lines(report)
    lines += _training_lines(manifest, recipe, method, lora)
    lines += _limitations_lines(datasets, base, base_ref, base_licence)
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + portable("\n".join(lines)) + "\n")
    return str(card)


def write_model_card(folder: str | Path, manifest: Mapping[str, Any], recipe: Mapping[str, Any],
                     report: Mapping[str, Any] | None, repo_id: str | None = None) -> Path:
    """Write ``folder/README.md`` (replacing PEFT's stub); returns its path."""
    folder = Path(folder)
    path = folder / CARD
    # through the writing gate: the card goes into a folder finsft made (or one push checked: replaceable_card)
    return write_file(path, card_text(folder, manifest, recipe, report, repo_id), replace=True,
                      kept="the model and the run's other files are kept")


def is_finsft_card(path: Path) -> bool:
    """README.md was written by finsft (not PEFT's stub, nor a person's)."""
    try:
        from huggingface_hub import ModelCard

        return FINSFT_TAG in (ModelCard.load(path).data.tags or [])
    except Exception:  # a missing, empty or unparsable README
        return False


def read_run(folder: Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any] | None]:
    """recipe.json, manifest.json and eval.json (None when the run did not evaluate) of a run folder."""
    recipe = read_json(folder / "recipe.json", "the run's recipe")
    manifest = read_json(folder / "manifest.json", "the run's manifest")
    report_path = folder / "eval.json"
    report = read_json(report_path, "the run's evaluation", limit=64 * 2**20) if report_path.is_file() else None
    for name, value in (("recipe.json", recipe), ("manifest.json", manifest), ("eval.json", report)):
        if value is not None and not isinstance(value, dict):
            raise UnreadableFile("the run's", folder / name, "is not a JSON object", "is this a finsft run folder?")
    return recipe, manifest, report
