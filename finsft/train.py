"""The main job: fine-tune as a recipe says, with TRL's SFTTrainer, PEFT and bitsandbytes.

Output folder layout (``output.dir``)::

    adapter_config.json, adapter_model.safetensors   LoRA adapter (or the full model without lora)
    tokenizer files, recipe.json (fully resolved), manifest.json, metrics.jsonl, loss.png
    trainer_state.json, train_results.json, all_results.json (eval_results.json), runs/ (TensorBoard)
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
import shlex
import shutil
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from finsft.data import build_splits, make_formatter, prepared_cache
from finsft.errors import FinsftError, OutputDirError
from finsft.models import load_tokenizer, load_training_model, model_shape, resolve_model
from finsft.plan import (
    Plan,
    detect_hardware,
    get_peft_config,
    get_sft_config,
    plan_run,
)
from finsft.progress import ProgressCallback, console, is_main_process, summary_table
from finsft.quiet import quiet_libraries
from finsft.recipe import Recipe
from finsft.templates import template_from_recipe
from finsft.tracking import add_training_callbacks, check_trackers, write_results

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


def checkpoint_step(path: str | Path) -> int:
    return int(Path(path).name.split("-")[-1])


def _complete(ckpt: Path) -> bool:
    """The Trainer writes trainer_state.json last: a checkpoint without a readable one was cut short."""
    try:
        json.loads((ckpt / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    return True


def latest_checkpoint(work: Path) -> str | None:
    """The newest complete checkpoint in ``work/checkpoints`` (one cut short by a kill is skipped)."""
    ckpts = sorted((p for p in (work / CHECKPOINTS).glob("checkpoint-*") if p.name.split("-")[-1].isdigit()),
                   key=checkpoint_step, reverse=True)
    return next((str(p) for p in ckpts if _complete(p)), None)


def trim_metrics(path: Path, step: int) -> list[dict[str, Any]]:
    """Keep the metrics records of steps up to ``step`` (the checkpoint a run resumes from), so that the resumed
    run's records continue the log without repeating steps; returns the kept records."""
    if not path.exists():
        return []
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:  # a line cut short by a kill
            continue
        if isinstance(record, dict) and record.get("step", 0) <= step and "train_loss" not in record:
            kept.append(record)
    tmp = path.with_name(path.name + ".tmp")
    write_jsonl(tmp, kept)
    os.replace(tmp, path)
    return kept


def recipe_diff(old: dict[str, Any], new: dict[str, Any]) -> str:
    a = json.dumps(old, indent=2, sort_keys=True).splitlines()
    b = json.dumps(new, indent=2, sort_keys=True).splitlines()
    return "\n".join(difflib.unified_diff(a, b, "recipe of the interrupted run", "recipe now", lineterm="", n=1))


def _failed_start(work: Path) -> bool:
    """A work folder with nothing but the recipe: an earlier run failed before its first training step (a model
    or data error), so there is nothing to resume or keep."""
    return {p.name for p in work.iterdir()} <= {"recipe.json"}


def mean_train_loss(history: list[dict[str, Any]]) -> float | None:
    """Mean training loss over every step of the run, from its metrics records (each logged loss is the mean of
    the steps since the previous one). The Trainer's own figure covers only the steps since a resume."""
    last, total, steps = 0, 0.0, 0
    for r in sorted((r for r in history if "loss" in r), key=lambda r: r["step"]):
        if r["step"] > last:
            total += r["loss"] * (r["step"] - last)
            steps += r["step"] - last
            last = r["step"]
    return total / steps if steps else None


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
                                     "trainings (use --force to resume anyway, or --overwrite to start over):\n"
                                     + recipe_diff(old, recipe.config))
        if force or not saved.exists():
            (dirs.work / "recipe.json").write_text(json.dumps(recipe.config, indent=2) + "\n")
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
    """Turn the first SIGINT/SIGTERM into a request to checkpoint and stop. A second Ctrl-C aborts at once, unless
    it comes within a second of the first (a launcher forwarding the same Ctrl-C)."""
    state: dict[str, int] = {}
    first = [0.0]
    previous = {}

    def handler(signum: int, frame: Any) -> None:
        if state.get("signal"):
            if signum == signal.SIGINT and time.monotonic() - first[0] > 1.0:
                raise KeyboardInterrupt
            return
        first[0] = time.monotonic()
        state["signal"] = signum

    for sig in (signal.SIGINT, signal.SIGTERM):
        with suppress(ValueError):  # not the main thread
            previous[sig] = signal.signal(sig, handler)
    try:
        yield state
    finally:
        for sig, h in previous.items():
            signal.signal(sig, h)


def _stop_callback(flags: dict[str, int], world_size: int) -> Any:
    """Checkpoint and stop at the end of the step during which a signal arrived. With several processes the
    request is shared (all-reduce), so that every rank saves and stops at the same step even when only one
    received the signal."""
    from transformers import TrainerCallback

    class StopOnSignal(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
            if world_size > 1:
                import torch
                import torch.distributed as dist

                flag = torch.tensor([flags.get("signal", 0)], device=args.device)
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                if flag.item() and not flags.get("signal"):
                    flags["signal"] = int(flag.item())
            if flags.get("signal"):
                control.should_save = True
                control.should_training_stop = True
            return control

    return StopOnSignal()


# ------------------------------------------------------------------------------------- launcher and world size

WORKING_CPU_LAUNCH = ("accelerate launch --multi_gpu --num_processes N --num_machines 1 --mixed_precision no "
                      "--dynamo_backend no -m finsft RECIPE")


def launcher_world_size() -> int:
    """The number of processes the launcher (accelerate launch, torchrun) says it started."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def launcher_warning() -> str | None:
    """``accelerate launch --cpu --num_processes N`` starts ONE process (it only sets MASTER_ADDR/PORT): say so."""
    cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    if cpu and "MASTER_ADDR" in os.environ and "WORLD_SIZE" not in os.environ:
        return ("accelerate launch --cpu starts a single process whatever --num_processes says; this run trains in "
                f"one process. For N processes on CPU use: {WORKING_CPU_LAUNCH}")
    return None


def check_world_size(launcher: int, initialized: int, distributed_type: str) -> None:
    """Refuse to train when the launcher started more processes than the distributed state joined: each process
    would train alone on all the data and they would all write the same output folder."""
    if launcher == initialized:
        return
    raise FinsftError(
        f"the launcher started {launcher} processes (WORLD_SIZE={launcher}) but the distributed state has "
        f"{initialized} ({distributed_type}): each process would train on its own and they would all write the same "
        f"output. On CPU launch with: {WORKING_CPU_LAUNCH}; on GPUs give accelerate one process per GPU "
        "(--num_processes = number of GPUs) and check `accelerate env`."
    )


def _broadcast(value: Any, num_processes: int) -> Any:
    """``value`` of the main process, on every process."""
    if num_processes <= 1:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _parent_command() -> list[str] | None:
    """The launcher's command line (accelerate launch / torchrun start the training processes), Linux only."""
    try:
        raw = Path(f"/proc/{os.getppid()}/cmdline").read_bytes()
    except OSError:
        return None
    words = [w.decode(errors="replace") for w in raw.split(b"\0") if w]
    for i, w in enumerate(words[:3]):
        if os.path.basename(w) in ("accelerate", "torchrun"):
            return [os.path.basename(w), *words[i + 1:]]
    return None


def resume_command(recipe: Recipe, command: list[str] | None = None) -> str:
    """The command that continues this run: ``command`` (the finsft command line that started it, overrides
    included) with --resume, behind the launcher's own command line when a launcher started it."""
    finsft = [w for w in command or ["finsft", "train", recipe.source] if w not in ("--overwrite", "--resume", "--force")]
    finsft.append("--resume")
    if "LOCAL_RANK" in os.environ or launcher_world_size() > 1:
        parent = _parent_command()
        if parent and "finsft" in parent:
            launch = parent[:parent.index("finsft") + 1] if parent[parent.index("finsft") - 1] == "-m" else None
            if launch:
                return shlex.join([*launch, *finsft[1:]])
        return "accelerate launch <the same launch options> -m finsft " + shlex.join(finsft[1:])
    return shlex.join(finsft)


# --------------------------------------------------------------------------------------------- out of memory


def oom_message(recipe: Recipe, plan: Plan, where: str, resume_cmd: str | None = None) -> str:
    """What to change when CUDA runs out of memory, as concrete recipe overrides."""
    t = recipe["training"]
    bs, ga = t["per_device_train_batch_size"], t["gradient_accumulation_steps"]
    world = plan.hardware.world_size
    options = []
    if bs > 1:
        nbs = max(1, bs // 2)
        nga = ga * bs // nbs if bs % nbs == 0 else ga * 2
        options.append(f"smaller per-device batch, same effective batch ({nbs * nga * world}): "
                       f"training.per_device_train_batch_size={nbs} training.gradient_accumulation_steps={nga}")
    else:
        options.append("the per-device batch is already 1: shorten the sequences or quantize (below)")
    if not plan.gradient_checkpointing:
        options.append("recompute activations instead of storing them (~30% slower, far less memory): "
                       "training.gradient_checkpointing=true")
    if not plan.packing:
        options.append("pack examples without padding (padding-free batches are smaller): training.packing=true")
    quant = recipe["quantization"] or {}
    if not quant.get("load_in_4bit"):
        if recipe["lora"]:
            options.append("load the base model in 4 bits (QLoRA, ~4x less weight memory): "
                           "quantization.load_in_4bit=true")
        else:
            options.append("train a LoRA adapter on a 4-bit base model instead of all weights (QLoRA): add a "
                           '"lora" section and quantization.load_in_4bit=true')
    ml = t["max_length"]
    if ml is None or ml > 128:
        shorter = 512 if ml is None else max(64, ml // 2)
        options.append(f"shorter sequences (longer examples are truncated): training.max_length={shorter}")
    mem = plan.hardware.memory_bytes
    device = plan.hardware.name + (f", {mem / 2**30:.0f} GiB" if mem else "")
    lines = [f"CUDA ran out of memory during {where} ({device}; per-device batch {bs}, max_length {ml}). "
             "Options, each an override for the command line (finsft train RECIPE key.path=value ...):"]
    lines += [f"  - {o}" for o in options]
    if resume_cmd:
        lines.append(f"A changed recipe starts over: add --overwrite (same recipe: {resume_cmd}).")
    return "\n".join(lines)


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
        ax.plot(*zip(*train, strict=True), label="training loss")
    if evals:
        ax.plot(*zip(*evals, strict=True), marker="o", label="validation loss")
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
    if cap and cap < len(ds):
        # A seeded random sample: the first rows of a file are often sorted (FPB's first 200 are 87% positive).
        ds = ds.shuffle(seed=recipe["training"]["seed"]).select(range(cap))
        source += f", {cap} rows sampled with seed {recipe['training']['seed']}"
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


def _model_is_sharded(trainer: Any) -> bool:
    """FSDP and DeepSpeed ZeRO-3 split the weights across processes: a forward pass needs every process."""
    if getattr(trainer, "is_fsdp_enabled", False):
        return True
    if getattr(trainer, "is_deepspeed_enabled", False):
        plugin = trainer.accelerator.state.deepspeed_plugin
        return plugin is not None and plugin.zero_stage == 3
    return False


def build_trainer(recipe: Recipe, model: Any, args: Any, tokenizer: Any, train_ds: Any, val_ds: Any = None) -> Any:
    """TRL's SFTTrainer as finsft trains with it (the recipe's LoRA), without TRL's console printer."""
    from transformers.trainer_callback import PrinterCallback
    from trl import SFTTrainer

    trainer = SFTTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=val_ds,
                         processing_class=tokenizer, peft_config=get_peft_config(recipe))
    trainer.remove_callback(PrinterCallback)
    add_training_callbacks(trainer, recipe)  # early stopping; trackers' log folder and the recipe as their config
    return trainer


def train(recipe: Recipe, *, overwrite: bool = False, resume: bool = False, force: bool = False,
          command: list[str] | None = None) -> Path:
    """Run the recipe; returns the output folder. ``command``: the finsft command line that runs it (named in
    the resume hint of an interrupted run)."""
    quiet_libraries()
    wall_start = time.time()
    out = console()
    dirs = RunDirs.for_recipe(recipe)
    main = is_main_process()
    hw = detect_hardware()
    warning = launcher_warning()
    if warning:
        out.print(f"[yellow]warning:[/] {warning}")

    template = template_from_recipe(recipe["template"])
    check_trackers(recipe["training"]["report_to"])
    source = resolve_model(recipe, log=out.print) if main else None
    # Every rank needs the probe/plan; only the main process converts a GGUF file (others wait below).
    plan = plan_run(recipe, hw, None)
    work_ckpts = str(dirs.work / CHECKPOINTS)
    sft_probe = get_sft_config(recipe, plan, work_ckpts)  # initialises the distributed state
    from accelerate import PartialState

    state = PartialState()
    world = state.num_processes
    # Before any collective: a rank that is alone must not wait for the others.
    check_world_size(launcher_world_size(), world, state.distributed_type.value)
    state.wait_for_everyone()
    if source is None:
        source = resolve_model(recipe, log=lambda *_: None)
    plan = plan_run(recipe, hw, model_shape(source, recipe["model"]["trust_remote_code"]))

    # The main process checks and prepares the output folder; every rank gets its verdict (no rank left waiting).
    checkpoint, problem = None, None
    if main:
        try:
            checkpoint = prepare_dirs(recipe, dirs, overwrite=overwrite, resume=resume, force=force)
        except FinsftError as exc:
            problem = exc
    checkpoint, problem_text = _broadcast((checkpoint, str(problem) if problem else None), world)
    if problem is not None:
        raise problem
    if problem_text is not None:
        raise OutputDirError(problem_text)
    resume_cmd = resume_command(recipe, command)
    previous: list[dict[str, Any]] = []
    if resume and main:
        step = checkpoint_step(checkpoint) if checkpoint else 0
        previous = trim_metrics(dirs.work / "metrics.jsonl", step)
        out.print(f"resuming {dirs.work} from {Path(checkpoint).name} (step {step})" if checkpoint else
                  f"resuming {dirs.work}: no checkpoint was saved before the interruption, starting from step 0")

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
    if world > 1:
        out.print(f"distributed: world size {world} ({state.distributed_type.value}, launcher WORLD_SIZE="
                  f"{launcher_world_size()}); only rank 0 prints and writes")

    import torch

    phase = "model loading"
    try:
        model = load_training_model(source, recipe, plan)

        ev_rows: list[dict[str, Any]] = []
        results: dict[str, Any] = {}
        if recipe["evaluation"] and main:
            ev_rows, ev_source = eval_rows(recipe, template, splits.validation)
            results["data"] = ev_source
            if recipe["evaluation"]["before_training"] and not checkpoint:
                phase = "evaluation of the base model"
                before = run_evaluation(model, formatter, recipe, ev_rows, out, "evaluating the base model")
                results["before"] = before.metrics
                out.print(f"before training ({before.scorer}, {len(ev_rows)} rows): {headline(before.metrics)}")

        metrics_path = str(dirs.work / "metrics.jsonl") if main else None
        progress = ProgressCallback(metrics_path, out)
        progress.history.extend(previous)
        args = get_sft_config(recipe, plan, work_ckpts, has_eval=val_ds is not None)
        del sft_probe
        phase = "training"
        trainer = build_trainer(recipe, model, args, tokenizer, train_ds, val_ds)
        trainer.add_callback(progress)
        with graceful_signals() as sig:
            trainer.add_callback(_stop_callback(sig, world))
            try:
                result = trainer.train(resume_from_checkpoint=checkpoint)
            except (FinsftError, torch.cuda.OutOfMemoryError):
                raise
            except Exception:
                if main:
                    out.print(f"[red]training failed at step {trainer.state.global_step}[/]; the run is kept in "
                              f"{dirs.work} (newest checkpoint: {latest_checkpoint(dirs.work) or 'none'}). "
                              f"After fixing the cause, continue with: {resume_cmd}")
                raise
        if sig.get("signal"):
            state.wait_for_everyone()
            name = signal.Signals(sig["signal"]).name
            raise RunInterrupted(
                f"{name}: stopped at step {trainer.state.global_step}/{trainer.state.max_steps} and saved "
                f"{latest_checkpoint(dirs.work)}; {dirs.final} was not written. Resume with:\n  {resume_cmd}",
                sig["signal"])

        phase = "saving"
        if getattr(trainer, "is_fsdp_enabled", False):
            # One full adapter file, not one shard per process (the PEFT/TRL recipe for FSDP).
            trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
        trainer.save_model(str(dirs.work))  # every rank: gathering sharded weights is collective; rank 0 writes
        sharded = _model_is_sharded(trainer)
        state.wait_for_everyone()
        if not main:
            # The rest is rank 0's alone, with no collective left: other ranks are done (and cannot time out
            # waiting for a long evaluation).
            return dirs.final

        if recipe["evaluation"] and sharded:
            out.print(f"evaluation skipped: the model is sharded across {world} processes "
                      f"({state.distributed_type}); evaluate the saved adapter with: "
                      f"finsft eval {shlex.quote(recipe.source)} --adapter {shlex.quote(str(dirs.final))}")
        elif recipe["evaluation"]:
            phase = "evaluation of the trained model"
            after = run_evaluation(trainer.model, formatter, recipe, ev_rows, out, "evaluating the trained model")
            results.update({"scorer": after.scorer, "after": after.metrics})
            out.print(f"after training ({after.scorer}, {len(ev_rows)} rows): {headline(after.metrics)}")
            (dirs.work / "eval.json").write_text(json.dumps(results, indent=2) + "\n")
            write_jsonl(dirs.work / "predictions.jsonl", after.predictions)
        if recipe["output"]["plot"]:
            plot_losses(progress.history, dirs.work / "loss.png")
        if recipe["output"]["save_merged"] and recipe["lora"]:
            phase = "merging"
            if sharded:
                out.print(f"merge skipped: the model is sharded across {world} processes; merge the saved adapter "
                          f"with: finsft merge {shlex.quote(recipe.source)} --adapter "
                          f"{shlex.quote(str(dirs.final))} --out MERGED_DIR")
            else:
                from finsft.merge import merge_into

                merge_into(trainer.model, tokenizer, dirs.work / "merged")
    except torch.cuda.OutOfMemoryError as exc:
        raise FinsftError(oom_message(recipe, plan, phase, resume_cmd if phase == "training" else None)) from exc

    tps = progress.tokens_per_s(trainer.state)
    train_loss = result.training_loss
    if checkpoint:
        train_loss = mean_train_loss(progress.history) or train_loss
    write_results(dirs.work, dirs.final, trainer.state, {**result.metrics, "train_loss": train_loss},
                  results.get("after"))  # trainer_state.json, *_results.json at the top, as HF users expect
    manifest = {
        "recipe": recipe.name,
        "recipe_files": recipe.files,
        "libraries": library_versions(),
        "hardware": {"device": hw.device, "name": hw.name, "world_size": world,
                     "distributed_type": state.distributed_type.value,
                     "python": platform.python_version(), "platform": platform.platform()},
        "plan": [{"setting": c.setting, "value": c.value, "reason": c.reason, "automatic": c.automatic}
                 for c in plan.choices],
        "model": source.description,
        "data": {"fingerprint": splits.fingerprint, "train_rows": len(splits.train), "validation_rows": n_val,
                 "prep_seconds": round(prep_s, 2)},
        "train": {"global_step": trainer.state.global_step, "train_loss": train_loss,
                  "runtime_s": result.metrics.get("train_runtime"), "tokens_per_s": tps,
                  "effective_batch": (recipe["training"]["per_device_train_batch_size"]
                                      * recipe["training"]["gradient_accumulation_steps"] * world),
                  "resumed_from": os.path.relpath(checkpoint, dirs.work) if checkpoint else None},
        "wall_seconds": round(time.time() - wall_start, 1),
    }
    (dirs.work / "manifest.json").write_text(json.dumps(manifest, indent=2, default=str) + "\n")
    publish(dirs)
    rows: list[tuple[str, Any]] = [
        ("output", str(dirs.final)), ("steps", trainer.state.global_step),
        ("train loss", f"{train_loss:.4f}"),
        ("tokens/s", f"{tps:,.0f}" if tps else "-"), ("wall time", f"{manifest['wall_seconds']:.0f} s"),
    ]
    if "before" in results:
        rows.append(("before", headline(results["before"])))
    if "after" in results:
        rows.append(("after", headline(results["after"])))
    out.print(summary_table("finsft: done", rows))
    return dirs.final
