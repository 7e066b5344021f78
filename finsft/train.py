"""The main job: fine-tune as a recipe says, with TRL's SFTTrainer, PEFT and bitsandbytes.

Output folder layout (``output.dir``)::

    adapter_config.json, adapter_model.safetensors   LoRA adapter (or the full model without lora)
    tokenizer files, recipe.json (fully resolved), manifest.json, metrics.jsonl, loss.png
    eval.json, predictions.jsonl (when the recipe evaluates), checkpoints/

The run works in ``<dir>.partial`` and renames it to ``<dir>`` when everything is written, so ``<dir>`` is never
half-written. An interrupted run (Ctrl-C, SIGTERM, a crash) leaves ``<dir>.partial`` with its checkpoints for
``--resume``.
"""

from __future__ import annotations

import difflib
import json
import os
import platform
import shutil
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from finsft.compile import (
    Plan,
    detect_hardware,
    get_model_kwargs,
    get_peft_config,
    get_sft_config,
    plan_run,
)
from finsft.data import build_splits, make_formatter, prepared_cache
from finsft.errors import FinsftError, OutputDirError
from finsft.models import load_model, load_tokenizer, model_shape, resolve_model
from finsft.progress import ProgressCallback, console, is_main_process, summary_table
from finsft.quiet import quiet_libraries
from finsft.recipe import Recipe
from finsft.templates import template_from_recipe

CHECKPOINTS = "checkpoints"


class RunInterrupted(FinsftError):
    """Training stopped on a signal after saving a checkpoint."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


@dataclass
class RunDirs:
    final: Path
    work: Path

    @classmethod
    def for_recipe(cls, recipe: Recipe) -> RunDirs:
        final = Path(recipe["output"]["dir"]).absolute()
        return cls(final, final.with_name(final.name + ".partial"))


def _nonempty(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())


def latest_checkpoint(work: Path) -> str | None:
    ckpts = sorted((p for p in (work / CHECKPOINTS).glob("checkpoint-*") if p.name.split("-")[-1].isdigit()),
                   key=lambda p: int(p.name.split("-")[-1]))
    return str(ckpts[-1]) if ckpts else None


def recipe_diff(old: dict[str, Any], new: dict[str, Any]) -> str:
    a = json.dumps(old, indent=2, sort_keys=True).splitlines()
    b = json.dumps(new, indent=2, sort_keys=True).splitlines()
    return "\n".join(difflib.unified_diff(a, b, "recipe of the interrupted run", "recipe now", lineterm="", n=1))


def _failed_start(work: Path) -> bool:
    """A work folder with nothing but the recipe: an earlier run failed before its first training step (a model
    or data error), so there is nothing to resume or keep."""
    return {p.name for p in work.iterdir()} <= {"recipe.json"}


def prepare_dirs(recipe: Recipe, dirs: RunDirs, *, overwrite: bool, resume: bool, force: bool) -> str | None:
    """Check the output folder's state; returns the checkpoint to resume from. Main process only."""
    if resume:
        if not dirs.work.exists():
            hint = " (that run finished)" if _nonempty(dirs.final) else ""
            raise OutputDirError(f"nothing to resume: no interrupted run in {dirs.work}{hint}")
        saved = dirs.work / "recipe.json"
        if saved.exists() and not force:
            old = json.loads(saved.read_text())
            if old != recipe.config:
                raise OutputDirError("the recipe changed since the interrupted run; resuming would mix two "
                                     "trainings (use --force to resume anyway):\n" + recipe_diff(old, recipe.config))
        return latest_checkpoint(dirs.work)
    if _nonempty(dirs.final) and not overwrite:
        raise OutputDirError(f"output folder {dirs.final} exists and is not empty; use --overwrite to replace it "
                             "(it is kept until the new run has finished) or choose another output.dir")
    if dirs.work.exists():
        if not overwrite and not _failed_start(dirs.work):
            raise OutputDirError(f"an interrupted run is in {dirs.work}: continue it with --resume, or start over "
                                 "with --overwrite")
        shutil.rmtree(dirs.work)
    dirs.work.mkdir(parents=True)
    (dirs.work / "recipe.json").write_text(json.dumps(recipe.config, indent=2) + "\n")
    return None


def publish(dirs: RunDirs) -> None:
    """Move the finished run into place; an old output folder is replaced only now."""
    old = None
    if dirs.final.exists():
        old = dirs.final.with_name(dirs.final.name + f".old-{os.getpid()}")
        os.replace(dirs.final, old)
    os.replace(dirs.work, dirs.final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def graceful_signals() -> Iterator[dict[str, int]]:
    """Turn the first SIGINT/SIGTERM into a request to checkpoint and stop; a second SIGINT aborts."""
    state: dict[str, int] = {}
    previous = {}

    def handler(signum: int, frame: Any) -> None:
        if state.get("signal") and signum == signal.SIGINT:
            raise KeyboardInterrupt
        state["signal"] = signum

    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            previous[sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread
            pass
    try:
        yield state
    finally:
        for sig, h in previous.items():
            signal.signal(sig, h)


def _stop_callback(state: dict[str, int]) -> Any:
    from transformers import TrainerCallback

    class StopOnSignal(TrainerCallback):  # type: ignore[misc]
        def on_step_end(self, args: Any, st: Any, control: Any, **kw: Any) -> Any:
            if state.get("signal"):
                control.should_save = True
                control.should_training_stop = True
            return control

    return StopOnSignal()


def print_plan(out: Console, plan: Plan, recipe: Recipe, n_train: int, n_val: int) -> None:
    train = recipe["training"]
    world = plan.hardware.world_size
    eff = train["per_device_train_batch_size"] * train["gradient_accumulation_steps"] * world
    rows = [("hardware", f"{plan.hardware.device} ({plan.hardware.name}), {world} process{'es' if world > 1 else ''}"),
            ("effective batch", f"{train['per_device_train_batch_size']} per device x "
                                f"{train['gradient_accumulation_steps']} accumulation x {world} processes = {eff}"),
            ("data", f"{n_train} training rows, {n_val} validation rows")]
    for c in plan.choices:
        rows.append((c.setting, f"{c.value}  ({'auto: ' if c.automatic else ''}{c.reason})"))
    out.print(summary_table(f"finsft: {recipe.name}", rows))


def plot_losses(history: list[dict[str, Any]], path: Path) -> bool:
    train = [(r["step"], r["loss"]) for r in history if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in history if "eval_loss" in r]
    if not train and not evals:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="training loss")
    if evals:
        ax.plot(*zip(*evals), marker="o", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("finsft", "torch", "transformers", "trl", "peft", "bitsandbytes", "datasets", "accelerate"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def eval_rows(recipe: Recipe, template: Any, validation: Any, data: str | None = None,
              split: str | None = None, limit: int | None = None) -> tuple[list[dict[str, Any]], str]:
    """The rows the recipe evaluates on (evaluation.path, else the validation split), capped."""
    from finsft.data import load_split

    ev = recipe["evaluation"] or {}
    path = data or ev.get("path")
    if path:
        ds, fp = load_split(path, split or ev.get("split", "test"), template, recipe["data"]["columns"])
        source = path
    elif validation is not None:
        ds, fp, source = validation, str(getattr(validation, "_fingerprint", "")), "validation split"
    else:
        raise FinsftError("nothing to evaluate on: set evaluation.path, data.validation_path or data.validation_size"
                          " (or pass --data)")
    cap = limit or ev.get("max_samples")
    if cap:
        ds = ds.select(range(min(cap, len(ds))))
    return [dict(r) for r in ds], f"{source} ({fp})"


def run_evaluation(model: Any, formatter: Any, recipe: Recipe, rows: list[dict[str, Any]], out: Console,
                   title: str) -> Any:
    from rich.progress import Progress

    from finsft.evaluate import evaluate_model

    ev = recipe["evaluation"] or {}
    with Progress(console=out, transient=True, disable=not out.is_terminal) as bar:
        task = bar.add_task(title, total=len(rows))
        result = evaluate_model(model, formatter, rows, scorer=ev.get("scorer", "auto"),
                                batch_size=ev.get("batch_size", 16), max_new_tokens=ev.get("max_new_tokens"),
                                progress=lambda done, total: bar.update(task, completed=done))
    return result


def headline(m: dict[str, Any]) -> str:
    if "accuracy" in m:
        return f"accuracy {m['accuracy']:.3f}, macro F1 {m['macro_f1']:.3f}, weighted F1 {m['weighted_f1']:.3f}"
    return f"ROUGE-L {m['rougeL']:.3f}, token F1 {m['token_f1']:.3f}, {m['mean_generated_words']:.0f} words"


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def train(recipe: Recipe, *, overwrite: bool = False, resume: bool = False, force: bool = False) -> Path:
    """Run the recipe; returns the output folder."""
    quiet_libraries()
    wall_start = time.time()
    out = console()
    dirs = RunDirs.for_recipe(recipe)
    main = is_main_process()
    hw = detect_hardware()

    template = template_from_recipe(recipe["template"])
    source = resolve_model(recipe, log=out.print) if main else None
    # Every rank needs the probe/plan; only the main process converts a GGUF file (others wait below).
    plan = plan_run(recipe, hw, None)
    work_ckpts = str(dirs.work / CHECKPOINTS)
    sft_probe = get_sft_config(recipe, plan, work_ckpts)  # initialises the distributed state
    from accelerate import PartialState

    state = PartialState()
    state.wait_for_everyone()
    if source is None:
        source = resolve_model(recipe, log=lambda *_: None)
    plan = plan_run(recipe, hw, model_shape(source, recipe["model"]["trust_remote_code"]))
    if state.num_processes != hw.world_size:
        raise FinsftError(f"expected {hw.world_size} processes from the launcher, but the distributed state has "
                          f"{state.num_processes}")

    checkpoint = None
    if main:
        checkpoint = prepare_dirs(recipe, dirs, overwrite=overwrite, resume=resume, force=force)
    state.wait_for_everyone()
    if not main and resume:
        checkpoint = latest_checkpoint(dirs.work)

    tokenizer = load_tokenizer(source, recipe)
    with state.main_process_first():
        splits = build_splits(recipe, template)
        formatter = make_formatter(recipe, template, tokenizer)
        max_length = recipe["training"]["max_length"]
        t0 = time.perf_counter()
        train_ds = prepared_cache(splits.train, formatter, max_length, splits.fingerprint, "train", log=out.print)
        val_ds = (prepared_cache(splits.validation, formatter, max_length, splits.fingerprint, "validation",
                                 log=out.print) if splits.validation is not None else None)
        prep_s = time.perf_counter() - t0
    n_val = len(splits.validation) if splits.validation is not None else 0
    print_plan(out, plan, recipe, len(splits.train), n_val)
    if state.num_processes > 1:
        out.print(f"distributed: world size {state.num_processes} ({state.distributed_type}); "
                  "only rank 0 prints and writes")

    model = load_model(source, get_model_kwargs(recipe, plan))
    if recipe["quantization"]:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=plan.gradient_checkpointing)

    ev_rows: list[dict[str, Any]] = []
    results: dict[str, Any] = {}
    if recipe["evaluation"] and main:
        ev_rows, ev_source = eval_rows(recipe, template, splits.validation)
        results["data"] = ev_source
        if recipe["evaluation"]["before_training"] and not checkpoint:
            before = run_evaluation(model, formatter, recipe, ev_rows, out, "evaluating the base model")
            results["before"] = before.metrics
            out.print(f"before training ({before.scorer}, {len(ev_rows)} rows): {headline(before.metrics)}")

    from trl import SFTTrainer
    from transformers.trainer_callback import PrinterCallback

    metrics_path = str(dirs.work / "metrics.jsonl") if main else None
    progress = ProgressCallback(metrics_path, out)
    args = get_sft_config(recipe, plan, work_ckpts, has_eval=val_ds is not None)
    del sft_probe
    trainer = SFTTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=val_ds,
                         processing_class=tokenizer, peft_config=get_peft_config(recipe))
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(progress)
    with graceful_signals() as sig:
        trainer.add_callback(_stop_callback(sig))
        result = trainer.train(resume_from_checkpoint=checkpoint)
    if sig.get("signal"):
        state.wait_for_everyone()
        name = signal.Signals(sig["signal"]).name
        raise RunInterrupted(
            f"{name}: stopped at step {trainer.state.global_step}/{trainer.state.max_steps}; checkpoint saved in "
            f"{latest_checkpoint(dirs.work)}. Resume with: finsft train {recipe.source} --resume", sig["signal"])

    if main:
        trainer.save_model(str(dirs.work))
        if recipe["evaluation"]:
            after = run_evaluation(trainer.model, formatter, recipe, ev_rows, out, "evaluating the trained model")
            results.update({"scorer": after.scorer, "after": after.metrics})
            out.print(f"after training ({after.scorer}, {len(ev_rows)} rows): {headline(after.metrics)}")
            (dirs.work / "eval.json").write_text(json.dumps(results, indent=2) + "\n")
            write_jsonl(dirs.work / "predictions.jsonl", after.predictions)
        if recipe["output"]["plot"]:
            plot_losses(progress.history, dirs.work / "loss.png")
        if recipe["output"]["save_merged"] and recipe["lora"]:
            from finsft.merge import merge_into

            merge_into(trainer.model, tokenizer, dirs.work / "merged")
        tps = progress.tokens_per_s(trainer.state)
        manifest = {
            "recipe": recipe.name,
            "recipe_files": recipe.files,
            "libraries": library_versions(),
            "hardware": {"device": hw.device, "name": hw.name, "world_size": state.num_processes,
                         "python": platform.python_version(), "platform": platform.platform()},
            "plan": [{"setting": c.setting, "value": c.value, "reason": c.reason, "automatic": c.automatic}
                     for c in plan.choices],
            "model": source.description,
            "data": {"fingerprint": splits.fingerprint, "train_rows": len(splits.train), "validation_rows": n_val,
                     "prep_seconds": round(prep_s, 2)},
            "train": {"global_step": trainer.state.global_step, "train_loss": result.training_loss,
                      "runtime_s": result.metrics.get("train_runtime"), "tokens_per_s": tps,
                      "resumed_from": checkpoint},
            "wall_seconds": round(time.time() - wall_start, 1),
        }
        (dirs.work / "manifest.json").write_text(json.dumps(manifest, indent=2, default=str) + "\n")
        publish(dirs)
        rows: list[tuple[str, Any]] = [
            ("output", str(dirs.final)), ("steps", trainer.state.global_step),
            ("train loss", f"{result.training_loss:.4f}"),
            ("tokens/s", f"{tps:,.0f}" if tps else "-"), ("wall time", f"{manifest['wall_seconds']:.0f} s"),
        ]
        if "before" in results:
            rows.append(("before", headline(results["before"])))
        if "after" in results:
            rows.append(("after", headline(results["after"])))
        out.print(summary_table("finsft: done", rows))
    state.wait_for_everyone()
    return dirs.final
