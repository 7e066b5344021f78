"""What a run shows and records: the plan table at start-up, the loss plot, the manifest, the final summary."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console

from finsft.evaluation.report import save_figure
from finsft.plan import Plan
from finsft.progress import summary_table
from finsft.recipe import Recipe


def print_plan(out: Console, plan: Plan, recipe: Recipe, n_train: int, n_val: int) -> None:
    train = recipe.training
    world = plan.hardware.world_size
    eff = train["per_device_train_batch_size"] * train["gradient_accumulation_steps"] * world
    rows = [("hardware", f"{plan.hardware.device} ({plan.hardware.name}), {world} process{'es' if world > 1 else ''}"),
            ("effective batch", f"{train['per_device_train_batch_size']} per device x "
                                f"{train['gradient_accumulation_steps']} accumulation x {world} processes = {eff}"),
            ("data", f"{n_train} training rows, {n_val} validation rows")]
    if recipe.data_format:
        rows.append(("data format", recipe.data_format))
    if plan.memory is not None and plan.hardware.is_gpu:
        rows.append(("memory per GPU", f"{plan.memory.peak / 2**30:.1f} GiB estimated peak"
                     + (f" ({plan.parallel.describe()})" if plan.parallel.processes > 1 else "")))
    for c in plan.choices:
        rows.append((c.setting, f"{c.value}  ({'auto: ' if c.automatic else ''}{c.reason})"))
    out.print(summary_table(f"finsft: {recipe.name}", rows))


def plot_losses(history: list[dict[str, Any]], path: Path) -> bool:
    train = [(r["step"], r["loss"]) for r in history if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in history if "eval_loss" in r]
    if not train and not evals:
        return False
    try:
        import matplotlib
    except ImportError:  # announced at setup (plots_note); a finished training never fails on a plot
        return False

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train, strict=True), label="training loss")
    if evals:
        ax.plot(*zip(*evals, strict=True), marker="o", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path)
    return True


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("finsft", "torch", "transformers", "trl", "peft", "bitsandbytes", "datasets", "accelerate",
                 "huggingface_hub"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


