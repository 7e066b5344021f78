"""The model card (README.md) of a run folder, written with huggingface_hub's ``ModelCard``/``ModelCardData``.

Every output folder gets one: the adapter (or fully fine-tuned model) at the top of the run folder and the merged
model in ``merged/``. The card is built from what the run folder records (``recipe.json``, ``manifest.json``,
``eval.json``), so ``finsft push`` can write it for a run made before cards existed. The YAML header carries the
hub metadata (base model, datasets, licence, ``model-index`` with the evaluation results, so the hub shows them);
the text says what was trained on what, how, how well, and with which library versions.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

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

    def add(role: str, ref: str | None, rows: Any, fingerprint: Any, split: str | None = None) -> None:
        if not ref:
            return
        licence, how = data_license(ref)
        out.append({"role": role, "ref": ref, "hub": not is_local(ref), "name": Path(ref).name if is_local(ref) else ref,
                    "split": split, "rows": rows, "fingerprint": fingerprint, "license": licence, "recognised": how})

    add("training", data.get("path"), facts.get("train_rows"), facts.get("fingerprint"), data.get("split"))
    if data.get("validation_path"):
        add("validation", data["validation_path"], facts.get("validation_rows"), facts.get("fingerprint"))
    if ev.get("path"):
        add("evaluation", ev["path"], report.get("rows") if report else None,
            report.get("rows_fingerprint") if report else None, ev.get("split"))
    return out


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    if value is None:
        return "-"
    return str(value).replace("|", "\\|").replace("\n", " ")


def _eval_results(report: Mapping[str, Any] | None, datasets: list[dict[str, Any]],
                  recipe: Mapping[str, Any]) -> list[Any]:
    """``EvalResult`` entries for model-index: the trained model's numbers on the evaluation rows."""
    from huggingface_hub import EvalResult

    if not report or not report.get("metrics"):
        return []
    m = report["metrics"]
    evaluation = next((d for d in datasets if d["role"] == "evaluation"), None)
    if evaluation is None:  # scored on the validation split carved from the training data
        training = next((d for d in datasets if d["role"] == "training"), None)
        dataset_type = training["name"] if training else "validation split"
        dataset_name, split = f"{dataset_type} (held-out validation split)", "validation"
    else:
        dataset_type, dataset_name, split = evaluation["name"], evaluation["name"], evaluation["split"]
    common: dict[str, Any] = {"dataset_type": dataset_type, "dataset_name": dataset_name, "dataset_split": split}
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


def _usage_lines(kind: str, repo_id: str | None, recipe: Mapping[str, Any]) -> list[str]:
    """How to load the folder, with and without finsft."""
    lines: list[str] = []
    lines += ["", "## How to use", ""]
    if kind == "adapter":
        lines += ["```python", "from peft import AutoPeftModelForCausalLM", "from transformers import AutoTokenizer",
                  "", f'model = AutoPeftModelForCausalLM.from_pretrained("{repo_id or "PATH/TO/THIS/FOLDER"}")',
                  f'tokenizer = AutoTokenizer.from_pretrained("{repo_id or "PATH/TO/THIS/FOLDER"}")', "```", "",
                  "With finsft and the recipe: `finsft eval RECIPE --adapter THIS_FOLDER`, `finsft predict RECIPE "
                  "--adapter THIS_FOLDER --input \"...\"`."]
    else:
        sub = ', subfolder="merged"' if kind == "merged" and repo_id else ""
        lines += ["```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                  f'model = AutoModelForCausalLM.from_pretrained("{repo_id or "PATH/TO/THIS/FOLDER"}"{sub})',
                  f'tokenizer = AutoTokenizer.from_pretrained("{repo_id or "PATH/TO/THIS/FOLDER"}"{sub})', "```"]
    template = recipe.get("template", {})
    lines += ["", f"Prompts follow finsft's `{template.get('name')}` template"
                  f"{' through the tokenizer chat template' if template.get('chat_template') else ''}; use the same "
                  "format at inference (the recipe below has it)."]
    return lines


def _data_lines(datasets: list[dict[str, Any]]) -> list[str]:
    """The training, validation and evaluation data with their fingerprints and licences."""
    lines: list[str] = []
    lines += ["", "## Data", "", "| role | data | split | rows | fingerprint | licence |", "|---|---|---|---:|---|---|"]
    for d in datasets:
        ref = f"[{d['ref']}](https://huggingface.co/datasets/{d['ref']})" if d["hub"] else f"`{d['name']}` (local file)"
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
    sets = ", ".join(f"{name} ({n:,} rows)" for name, n in overlap["checked"].items())
    found = overlap.get("overlapping", 0)
    if not found:
        return ["", f"No training input appears in the evaluation data (compared with: {sets})."]
    by_set = ", ".join(f"{name}: {n:,}" for name, n in (overlap.get("by_set") or {}).items())
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
        lines += [f"{report.get('rows')} rows of {report.get('data')} (rows fingerprint "
                  f"`{report.get('rows_fingerprint')}`), scored with the `{report.get('settings', {}).get('scorer')}` "
                  "scorer.", ""]
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
                                       f"{lora.get('lora_dropout')}, target modules {lora.get('target_modules')})"
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
    lines += ["", "<details><summary>The resolved recipe (recipe.json)</summary>", "", "```json",
              json.dumps(dict(recipe), indent=2, ensure_ascii=False), "```", "", "</details>"]
    libs = manifest.get("libraries") or {}
    if libs:
        lines += ["", "## Library versions", "", "| library | version |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in libs.items()]
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
              f"- base model {base or base_ref}: {base_licence or UNKNOWN_LICENSE}"]
    for d in datasets:
        lines.append(f"- {d['role']} data {d['name']}: "
                     f"{(d['license'] + ' (' + d['recognised'] + ')') if d['license'] else UNKNOWN_LICENSE}")
    lines += ["- this card's `license` field is the base model's licence; the data licences above may add terms.",
              "", "Card written by finsft from the run's recipe.json, manifest.json and eval.json."]
    return lines


def card_text(folder: Path, manifest: Mapping[str, Any], recipe: Mapping[str, Any],
              report: Mapping[str, Any] | None, repo_id: str | None = None) -> str:
    """The whole README.md: YAML metadata and Markdown body, section by section."""
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
        base_model=base, datasets=sorted({d["ref"] for d in datasets if d["hub"]}) or None,
        license=base_licence or "unknown", library_name="peft" if kind == "adapter" else "transformers",
        pipeline_tag="text-generation", tags=tags, model_name=name if eval_results else None,
        eval_results=eval_results or None,
    )
    what = {"adapter": f"a {method} adapter", "merged": f"a {method} adapter merged into its base model (a plain "
            "model folder)", "full": "a fully fine-tuned model"}[kind]
    base_text = f"[{base}](https://huggingface.co/{base})" if base else f"`{base_ref}` (a local model: no hub id known)"
    lines = [f"# {name}", "",
             f"This is {what} for {base_text}, trained by finsft with the recipe "
             f"`{manifest.get('recipe') or recipe.get('name')}`."]
    if recipe.get("description"):
        lines += ["", f"> {recipe['description']}"]
    base_info = manifest.get("base_model") if isinstance(manifest.get("base_model"), Mapping) else None
    if base and is_local(base_ref):
        how = base_info.get("hub_id_reason") if base_info else "the manifest"
        gguf = recipe["model"].get("gguf_file")
        lines += ["", f"The run loaded the base model from `{base_ref}`{f' (`{gguf}`, de-quantized)' if gguf else ''}; "
                      f"its hub id {base} comes from {how}."]

    lines += _usage_lines(kind, repo_id, recipe)
    lines += _data_lines(datasets) + _overlap_lines(manifest)
    lines += _evaluation_lines(report)
    lines += _training_lines(manifest, recipe, method, lora)
    lines += _limitations_lines(datasets, base, base_ref, base_licence)
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n")
    return str(card)


def write_model_card(folder: str | Path, manifest: Mapping[str, Any], recipe: Mapping[str, Any],
                     report: Mapping[str, Any] | None, repo_id: str | None = None) -> Path:
    """Write ``folder/README.md`` (replacing PEFT's stub); returns its path."""
    folder = Path(folder)
    path = folder / CARD
    tmp = path.with_name(CARD + ".tmp")
    tmp.write_text(card_text(folder, manifest, recipe, report, repo_id), encoding="utf-8")
    os.replace(tmp, path)
    return path


def is_finsft_card(path: Path) -> bool:
    """README.md was written by finsft (not PEFT's stub, nor a person's)."""
    try:
        from huggingface_hub import ModelCard

        return FINSFT_TAG in (ModelCard.load(path).data.tags or [])
    except Exception:  # a missing, empty or unparsable README
        return False


def read_run(folder: Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any] | None]:
    """recipe.json, manifest.json and eval.json (None when the run did not evaluate) of a run folder."""
    recipe = json.loads((folder / "recipe.json").read_text(encoding="utf-8"))
    manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    report_path = folder / "eval.json"
    report = json.loads(report_path.read_text(encoding="utf-8")) if report_path.is_file() else None
    return recipe, manifest, report
