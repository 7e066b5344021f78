"""QA quality benchmark on real data: does QLoRA on a CPU make SmolLM2-135M-Instruct answer finance questions better,
and what does 4-bit cost and save there?

recipes/fiqa_smollm2_qlora.json is trained twice on the same rows with the same settings: as written (QLoRA, the
base model loaded in 4-bit NF4 with double quantization) and with quantization off (plain LoRA on the fp32 model).
Each training run also scores its base model before training, so the table has four rows on the same held-out
questions: zero-shot fp32, zero-shot 4-bit, LoRA and QLoRA. Columns: held-out answer perplexity (the loss on the
reference answer's tokens only), ROUGE-L and generated/reference length on the first --generate rows, training
tokens/s and the peak RSS of the training process. Each configuration runs `finsft train` in a fresh process
whose peak RSS is read with os.wait4, so neither sees the other's memory.

Prints one table and writes qa_quality.json into --out. Nothing is written into the repository.

    python benchmarks/qa_quality.py --max-steps 100 --heldout 32 --generate 12 --threads 1 --parallel \
        --set training.max_length=256 --set evaluation.max_new_tokens=96   # the README's table (~22 min)
    python benchmarks/qa_quality.py --max-steps 2 --heldout 8 --generate 4 --out /tmp/qa   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "recipes" / "fiqa_smollm2_qlora.json"
CONFIGS = {  # name -> recipe overrides
    "qlora": [],
    "lora": ["quantization=null"],
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", default=str(RECIPE), help="the QLoRA recipe (default: recipes/fiqa_smollm2_qlora.json)")
    p.add_argument("--out", default=os.path.join(tempfile.gettempdir(), "finsft-qa-quality"),
                   help="folder for the two training runs, their logs and qa_quality.json")
    p.add_argument("--max-steps", type=int, help="train at most N steps (the same N for both configurations)")
    p.add_argument("--heldout", type=int, default=100, help="held-out questions for the perplexity (default: 100)")
    p.add_argument("--generate", type=int, default=40,
                   help="of those, how many get a greedy answer for ROUGE-L and length (default: 40)")
    p.add_argument("--threads", type=int,
                   help="torch threads in each training process (OMP_NUM_THREADS). On a machine shared with other "
                        "jobs, 1 thread can be faster than 2: OpenMP threads wait on each other")
    p.add_argument("--configs", default="qlora,lora", help="which configurations, in order (default: %(default)s)")
    p.add_argument("--parallel", action="store_true",
                   help="run the configurations at the same time (each in its own process, so RSS stays per "
                        "configuration): on a machine shared with other jobs both then see the same load")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="key.path=value",
                   help="extra recipe override for both runs (repeatable)")
    return p.parse_args(argv)


def start_config(name: str, args: argparse.Namespace, out: Path) -> tuple[subprocess.Popen[bytes], list[str], float]:
    """Start `finsft train` for one configuration in a fresh process."""
    run_dir = out / name
    overrides = [f"output.dir={run_dir}", f"evaluation.max_samples={args.heldout}",
                 f"evaluation.generate_samples={args.generate}", "evaluation.before_training=true",
                 *(["training.max_steps=" + str(args.max_steps)] if args.max_steps else []),
                 *CONFIGS[name], *args.overrides]
    cmd = [sys.executable, "-m", "finsft", "train", args.recipe, *overrides, "--overwrite"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    if args.threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(args.threads)
    print(f"[{time.strftime('%H:%M:%S')}] {name}: {' '.join(cmd[1:])} (log: {out / (name + '.log')})", flush=True)
    with open(out / f"{name}.log", "w", encoding="utf-8") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    return proc, overrides, time.time()


def finish_config(name: str, proc: subprocess.Popen[bytes], overrides: list[str], t0: float, out: Path) -> dict[str, Any]:
    """Wait for one configuration's process; its exit status, wall time, peak RSS and the run's numbers."""
    run_dir = out / name
    _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage: its peak RSS alone
    proc.returncode = os.waitstatus_to_exitcode(status)
    print(f"[{time.strftime('%H:%M:%S')}] {name}: finished (exit {proc.returncode})", flush=True)
    result = {"config": name, "overrides": overrides, "exit_status": proc.returncode,
              "wall_s": round(time.time() - t0, 1), "peak_rss_gib": usage.ru_maxrss / 2**20, "run": str(run_dir)}
    if proc.returncode != 0:
        print(f"{name}: finsft train failed (exit {proc.returncode}); see {out / (name + '.log')}", file=sys.stderr)
        return result
    manifest = json.loads((run_dir / "manifest.json").read_text())
    report = json.loads((run_dir / "eval.json").read_text())
    result.update(train_minutes=(manifest["train"]["runtime_s"] or 0) / 60, steps=manifest["train"]["global_step"],
                  tokens_per_s=manifest["train"]["tokens_per_s"], train_rows=manifest["data"]["train_rows"],
                  before=report["base_metrics"], after=report["metrics"], samples=report.get("samples"),
                  eval_rows=report["rows"], settings=report["settings"], libraries=manifest.get("libraries"))
    return result


def table_rows(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Zero-shot rows (each run's base model before training), then the trained rows."""
    label = {"qlora": ("zero-shot, 4-bit NF4", "QLoRA (4-bit NF4 base)"), "lora": ("zero-shot, fp32", "LoRA (fp32 base)")}
    rows: list[dict[str, Any]] = []
    for r in results:
        if "after" not in r:
            continue
        zero, tuned = label[r["config"]]
        rows.append({"model": zero, **_metrics(r["before"]), "tokens_per_s": None, "train_minutes": None,
                     "peak_rss_gib": None})
        rows.append({"model": tuned, **_metrics(r["after"]), "tokens_per_s": r["tokens_per_s"],
                     "train_minutes": r["train_minutes"], "peak_rss_gib": r["peak_rss_gib"]})
    return sorted(rows, key=lambda x: not x["model"].startswith("zero-shot"))


def _metrics(m: dict[str, Any]) -> dict[str, Any]:
    return {k: m[k] for k in ("answer_perplexity", "answer_tokens", "rougeL", "token_f1", "mean_generated_words",
                              "mean_reference_words", "n")}


def markdown(rows: list[dict[str, Any]]) -> str:
    def num(v: Any, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    lines = ["| model | answer perplexity | ROUGE-L | generated / reference words | train tokens/s | train min "
             "| peak RSS (GiB) |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['answer_perplexity']:.2f} | {r['rougeL']:.3f} | "
                     f"{r['mean_generated_words']:.0f} / {r['mean_reference_words']:.0f} | "
                     f"{num(r['tokens_per_s'], ',.1f')} | {num(r['train_minutes'], '.1f')} | "
                     f"{num(r['peak_rss_gib'], '.2f')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out).expanduser().resolve()
    if out == REPO or REPO in out.parents:
        print(f"qa_quality: --out {out} is inside the repository; choose a folder outside it", file=sys.stderr)
        return 2
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        print(f"qa_quality: unknown configuration(s) {unknown}; choose from {sorted(CONFIGS)}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    load = {"start": os.getloadavg()}
    results = []
    if args.parallel:
        started_procs = {name: start_config(name, args, out) for name in configs}
        for name, (proc, overrides, t0) in started_procs.items():
            results.append(finish_config(name, proc, overrides, t0, out))
            load[f"after_{name}"] = os.getloadavg()
    else:
        for name in configs:
            results.append(finish_config(name, *start_config(name, args, out), out))
            load[f"after_{name}"] = os.getloadavg()
    rows = table_rows(results)
    table = markdown(rows)
    print(table)
    zero = {r["model"]: r for r in rows}.get("zero-shot, fp32")
    checks = {}
    if zero:
        for r in rows:
            if not r["model"].startswith("zero-shot"):
                checks[r["model"]] = {
                    "perplexity_vs_zero_shot": r["answer_perplexity"] / zero["answer_perplexity"] - 1,
                    "perplexity_20pct_below": r["answer_perplexity"] <= 0.8 * zero["answer_perplexity"],
                    "rougeL_above": r["rougeL"] > zero["rougeL"],
                    "train_30_min": (r["train_minutes"] or 0) <= 30}
        for name, c in checks.items():
            print(f"{name}: perplexity {c['perplexity_vs_zero_shot']:+.1%} vs zero-shot fp32 (target -20%: "
                  f"{'met' if c['perplexity_20pct_below'] else 'missed'}), ROUGE-L above zero-shot: "
                  f"{'yes' if c['rougeL_above'] else 'no'}, training within 30 min: "
                  f"{'yes' if c['train_30_min'] else 'no'}")
    result = {
        "table": rows, "markdown": table, "targets": checks, "runs": results, "load_average": load,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started)),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "processor": _cpu_name(), "threads": args.threads, "parallel": args.parallel},
        "command": " ".join(["python benchmarks/qa_quality.py", *(argv if argv is not None else sys.argv[1:])]),
        "wall_minutes": (time.time() - started) / 60,
    }
    # the writing gate: never over a file this benchmark did not write
    from finsft.files import json_with_keys, write_json

    write_json(out / "qa_quality.json", result, replace=json_with_keys(*list(result)[:3]))
    print(f"wrote {out / 'qa_quality.json'}; {result['wall_minutes']:.1f} min; load average (1/5/15 min) at start "
          f"{load['start']}, end {os.getloadavg()}")
    return 0 if all(r["exit_status"] == 0 for r in results) else 1


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    raise SystemExit(main())
