"""One command for a person with one H100/H200 (under 8 minutes): is finsft GPU-ready?

For both seed recipes (recipes/gemma_qlora.json, recipes/mistral_lora.json) with random weights of the real
shapes (no hub): ``finsft bench`` (recipe vs notebook baseline), the hand-written expert script
(benchmarks/trl_anchor.py --mode packed_nogc --liger, same run, same machine) and ``finsft plan``'s memory
estimate next to the measured peak; then 30 real training steps of the Gemma architecture (``finsft train`` on a
random-weight Gemma-2B folder and synthetic FiQA-like rows) with an evaluation at the end. Prints one table and
PASS/FAIL per target, and writes everything to --out (JSON).

usage: python benchmarks/gpu_check.py [--out gpu_check.json] [--steps 10]
       python benchmarks/gpu_check.py --tiny     # CPU: the same plumbing on a tiny Gemma, in about a minute

Targets: finsft's recipe >= 1.5x the notebook baseline's tokens/s; finsft >= 0.8x the expert's tokens/s; the
plan's estimate within +-30% of finsft's measured peak; the 30-step run finishes with a finite loss and an
evaluation result.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SEEDS = {"gemma": ("recipes/gemma_qlora.json", "gemma2b", "4bit", "qa"),
         "mistral": ("recipes/mistral_lora.json", "mistral7b", "none", "sentiment")}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def sh(cmd: list[str], timeout: float, env: dict[str, str] | None = None) -> tuple[int, str, str, float]:
    log("$ " + " ".join(cmd))
    t = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                           env={**os.environ, **(env or {})})
    except subprocess.TimeoutExpired as exc:
        return 124, str(exc.stdout or ""), f"timed out after {timeout:.0f} s", time.perf_counter() - t
    if p.returncode:
        log(p.stderr[-3000:])
    return p.returncode, p.stdout, p.stderr, time.perf_counter() - t


def finsft(*args: str) -> list[str]:
    return [sys.executable, "-m", "finsft", *args]


def tiny_gemma(folder: Path) -> Path:
    """A 2-layer Gemma config (the --tiny stand-in for google/gemma-2b)."""
    folder.mkdir(parents=True, exist_ok=True)
    cfg = json.loads((ROOT / "finsft/model_configs/google--gemma-2b.json").read_text())
    cfg.update(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=1, head_dim=16, vocab_size=4096)
    path = folder / "config.json"
    path.write_text(json.dumps(cfg))
    return folder


def random_model_folder(config_path: Path, rows: Path, folder: Path) -> Path:
    """Random weights from a config + finsft's synthetic word-level tokenizer, saved as a model folder."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from finsft.bench import synthetic_tokenizer

    config = AutoConfig.from_pretrained(str(config_path))
    texts = [" ".join(r.values()) for r in map(json.loads, rows.read_text().splitlines()[:5000])]
    tok = synthetic_tokenizer(config, texts)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16 if device == "cuda" else None)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def bench(recipe: str, overrides: list[str], steps: int, warmup: int, timeout: float) -> dict[str, Any]:
    rc, out, err, secs = sh(finsft("bench", recipe, "--random-weights", "--steps", str(steps), "--warmup",
                                   str(warmup), "--format", "json", *overrides), timeout)
    if rc:
        return {"error": err.strip().splitlines()[-1] if err.strip() else f"exit {rc}", "seconds": secs}
    return {**json.loads(out), "seconds": secs}


def plan_estimate(recipe: str, overrides: list[str], gpu_memory: float | None) -> dict[str, Any]:
    args = ["plan", recipe, *overrides, "--format", "json"]
    if gpu_memory:
        args += ["--gpu-memory", str(gpu_memory)]
    _rc, out, err, _ = sh(finsft(*args), 300)
    if not out.strip():
        return {"error": err}
    data = json.loads(out)
    mem = data["memory"] or {}
    return {"estimated_peak_gib": mem.get("estimated_peak_gib"), "fits": mem.get("fits"),
            "gradient_checkpointing": data["choices"]["training.gradient_checkpointing"]["value"]}


def expert(arch: str, quant: str, task: str, steps: int, timeout: float) -> dict[str, Any]:
    rc, out, err, secs = sh([sys.executable, "benchmarks/trl_anchor.py", "--arch", arch, "--quant", quant,
                             "--mode", "packed_nogc", "--liger", "--task", task, "--steps", str(steps)], timeout)
    line = next((x for x in out.splitlines() if x.startswith("RESULT ")), None)
    if rc or line is None:
        return {"error": err.strip().splitlines()[-1] if err.strip() else f"exit {rc}", "seconds": secs}
    return {**json.loads(line[len("RESULT "):]), "seconds": secs}


def train_with_eval(model_dir: Path, rows: Path, out_dir: Path, steps: int, tiny: bool,
                    timeout: float) -> dict[str, Any]:
    overrides = [f"model.name_or_path={model_dir}", f"data.path={rows}", "data.validation_size=0.02",
                 f"training.max_steps={steps}", "training.eval_steps=null", "training.save_steps=null",
                 "evaluation.max_samples=8", "evaluation.max_new_tokens=16", f"output.dir={out_dir}"]
    if tiny:
        overrides += ["training.max_length=128", "training.per_device_train_batch_size=2"]
    rc, _out, err, secs = sh(finsft("train", "recipes/gemma_qlora.json", *overrides, "--overwrite"), timeout)
    result: dict[str, Any] = {"rc": rc, "seconds": round(secs, 1)}
    metrics = list(out_dir.rglob("metrics.jsonl"))
    losses = [r["loss"] for m in metrics for r in map(json.loads, m.read_text().splitlines()) if "loss" in r]
    result["last_loss"] = losses[-1] if losses else None
    evals = [p for p in out_dir.rglob("*.json") if "eval" in p.name or "results" in p.name]
    result["evaluation_files"] = [str(p.relative_to(out_dir)) for p in evals]
    if rc:
        result["error"] = err.strip().splitlines()[-1] if err.strip() else f"exit {rc}"
    return result


def verdict(ok: bool | None) -> str:
    return "SKIP" if ok is None else "PASS" if ok else "FAIL"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="CPU plumbing check: a tiny Gemma, 2 steps, no expert")
    p.add_argument("--steps", type=int, default=10, help="timed bench steps per configuration")
    p.add_argument("--train-steps", type=int, default=30)
    p.add_argument("--out", type=Path, default=Path("gpu_check.json"))
    a = p.parse_args(argv)
    tiny = a.tiny
    steps, warmup = (1, 1) if tiny else (a.steps, 3)
    train_steps = 2 if tiny else a.train_steps
    results: dict[str, Any] = {"tiny": tiny, "targets": []}
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    from finsft.bench import write_synthetic

    rows = write_synthetic(work / "fiqa_like.jsonl", "qa", 200 if tiny else 2000)
    seeds = {"gemma": SEEDS["gemma"]} if tiny else SEEDS
    for name, (recipe, arch, quant, task) in seeds.items():
        overrides: list[str] = []
        if tiny:
            overrides = [f"model.name_or_path={tiny_gemma(work / 'tiny-gemma')}", "training.max_length=64",
                         "training.per_device_train_batch_size=2", "training.optim=adamw_torch"]
        b = bench(recipe, overrides, steps, warmup, 240)
        plan = plan_estimate(recipe, overrides, None)
        ex = None if tiny else expert(arch, quant, task, 20, 240)
        results[name] = {"bench": b, "plan": plan, "expert": ex}
        rec, base = (b.get("recipe") or {}), (b.get("baseline") or {})
        speedup = (rec["tokens_per_s"] / base["tokens_per_s"]) if rec and base else None
        vs_expert = (rec["tokens_per_s"] / ex["tokens_per_s"]) if rec and ex and "tokens_per_s" in ex else None
        peak, est = rec.get("peak_memory_gib"), plan.get("estimated_peak_gib")
        on_gpu = rec.get("memory_kind", "").startswith("CUDA") or "cuda" in str(rec.get("device", ""))
        mem_err = (est / peak - 1) if (peak and est and on_gpu) else None
        results["targets"] += [
            {"target": f"{name}: bench ran", "value": "error" if "error" in b else "ok", "ok": "error" not in b},
            {"target": f"{name}: recipe / notebook baseline >= 1.5x", "value": speedup,
             "ok": None if speedup is None or tiny else speedup >= 1.5},
            {"target": f"{name}: finsft / expert >= 0.8x", "value": vs_expert,
             "ok": None if vs_expert is None else vs_expert >= 0.8},
            {"target": f"{name}: plan estimate within 30% of measured peak ({est} vs {peak} GiB)",
             "value": mem_err, "ok": None if mem_err is None else abs(mem_err) <= 0.30},
        ]
    config = work / "tiny-gemma" / "config.json" if tiny else ROOT / "finsft/model_configs/google--gemma-2b.json"
    if tiny:
        tiny_gemma(work / "tiny-gemma")
    model_dir = random_model_folder(config, rows, work / "gemma-random")
    tr = train_with_eval(model_dir, rows, work / "run", train_steps, tiny, 300)
    results["train"] = tr
    ok = (tr["rc"] == 0 and tr["last_loss"] is not None and math.isfinite(tr["last_loss"])
          and bool(tr["evaluation_files"]))
    results["targets"].append({"target": f"gemma: {train_steps} training steps + evaluation", "value":
                               tr.get("last_loss"), "ok": ok})
    width = max(len(t["target"]) for t in results["targets"])
    print(f"{'target':<{width}}  {'value':>10}  result")
    for t in results["targets"]:
        v = t["value"]
        shown = f"{v:+.1%}" if isinstance(v, float) and "within" in t["target"] else (
            f"{v:.2f}" if isinstance(v, float) else str(v))
        print(f"{t['target']:<{width}}  {shown:>10}  {verdict(t['ok'])}")
    a.out.write_text(json.dumps(results, indent=2, default=str))
    print(f"details: {a.out}")
    return 1 if any(t["ok"] is False for t in results["targets"]) else 0


if __name__ == "__main__":
    sys.exit(main())
