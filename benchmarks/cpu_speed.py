"""Issue 23's CPU claim: ``finsft bench RECIPE`` of THIS tree against the same command in another tree (by default
the commit before issue 23, 0440638, checked out as a detached worktree), in fresh processes, alternating which tree
goes first from one pair to the next, on the same Python and libraries.

Each run is ``python -m finsft bench RECIPE --no-baseline --format json`` with PYTHONPATH set to the tree, so the
recipe, its data, the model and the libraries are the same and only finsft's code differs. It prints, per recipe,
the median tokens/s ratio (this tree / base), the median ratio of tokens per CPU-second of the worker process (the
steadier figure on a CPU shared with other jobs), and the first logged training loss of every run (they must be
equal: the same job, computed faster). Exit code 1 when a first loss differs by more than --loss-tolerance.

Pin it to one core with one thread on a shared machine, e.g.:

    git worktree add --detach ../base23 0440638
    taskset -c 1 env OMP_NUM_THREADS=1 python benchmarks/cpu_speed.py --base ../base23 \\
        --recipes recipes/quickstart.json,recipes/tfns_smollm2.json --pairs 2 --steps 5 --warmup 1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent.parent


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def bench_once(tree: Path, recipe: Path, steps: int, warmup: int) -> dict[str, Any]:
    """One ``finsft bench`` of ``recipe`` with ``tree``'s finsft, in a fresh process: its recipe result."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    cmd = [sys.executable, "-m", "finsft", "bench", str(recipe), "--no-baseline", "--format", "json",
           "--steps", str(steps), "--warmup", str(warmup)]
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
        raise SystemExit(f"finsft bench failed in {tree} (exit code {proc.returncode})")
    result: dict[str, Any] = json.loads(proc.stdout)["recipe"]
    result["wall_s"] = round(time.perf_counter() - t, 1)
    return result


def compare(recipe: str, this: Path, base: Path, pairs: int, steps: int, warmup: int) -> dict[str, Any]:
    runs: dict[str, list[dict[str, Any]]] = {"this": [], "base": []}
    for i in range(pairs):
        order = ("base", "this") if i % 2 == 0 else ("this", "base")
        for which in order:
            tree = this if which == "this" else base
            r = bench_once(tree, tree / recipe, steps, warmup)
            runs[which].append(r)
            log(f"  {recipe} pair {i + 1} {which}: {r['tokens_per_s']:.1f} tokens/s, "
                f"{r['tokens_per_cpu_s']:.1f} tokens/CPU-s, {r['s_per_step']:.2f} s/step, "
                f"first loss {r['losses'][0] if r['losses'] else None}")
    tps = [t["tokens_per_s"] / b["tokens_per_s"] for t, b in zip(runs["this"], runs["base"], strict=True)]
    tpc = [t["tokens_per_cpu_s"] / b["tokens_per_cpu_s"] for t, b in zip(runs["this"], runs["base"], strict=True)]
    first = {w: [r["losses"][0] if r["losses"] else None for r in rs] for w, rs in runs.items()}
    return {"recipe": recipe, "ratio_tokens_per_s": round(statistics.median(tps), 3),
            "ratio_tokens_per_cpu_s": round(statistics.median(tpc), 3), "pair_ratios_tokens_per_s": tps,
            "pair_ratios_tokens_per_cpu_s": tpc, "first_losses": first, "runs": runs}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", type=Path, required=True, help="the other tree (e.g. a worktree of 0440638)")
    p.add_argument("--this", type=Path, default=HERE, help="this tree (default: the one holding this script)")
    p.add_argument("--recipes", default="recipes/quickstart.json,recipes/tfns_smollm2.json",
                   help="comma-separated recipe paths, relative to each tree")
    p.add_argument("--pairs", type=int, default=2, help="alternating (base, this) pairs per recipe")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--loss-tolerance", type=float, default=1e-4)
    p.add_argument("--json", type=Path, help="write every measurement here")
    args = p.parse_args(argv)
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    affinity = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    log(f"{when}; {cpu_model()}; cores {affinity}; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}; "
        f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    results = []
    for recipe in args.recipes.split(","):
        log(f"{recipe}: {args.pairs} alternating pairs of {args.warmup} warm-up + {args.steps} timed steps")
        results.append(compare(recipe, args.this.resolve(), args.base.resolve(), args.pairs, args.steps,
                               args.warmup))
    ok = True
    print(f"{when}, {cpu_model()}, cores {affinity}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}")
    for r in results:
        firsts = [x for xs in r["first_losses"].values() for x in xs]
        same = all(x is not None for x in firsts) and max(firsts) - min(firsts) <= args.loss_tolerance
        ok &= same
        print(f"{r['recipe']}: this/base {r['ratio_tokens_per_s']:.2f}x tokens/s, "
              f"{r['ratio_tokens_per_cpu_s']:.2f}x tokens per CPU-second (medians of {args.pairs} pairs); "
              f"first logged loss this {r['first_losses']['this']} base {r['first_losses']['base']}"
              f" -> {'equal' if same else 'DIFFERENT'}")
    if args.json:
        args.json.write_text(json.dumps({"when": when, "cpu": cpu_model(), "cores": affinity, "results": results},
                                        indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
