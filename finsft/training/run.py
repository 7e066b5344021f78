"""The main job: fine-tune as a recipe says, with TRL's SFTTrainer, PEFT and bitsandbytes.

A run is a handful of phases, each a method (as in torchtune's recipes)::

    with TrainingRun(recipe) as run:
        run.setup()            # hardware, distributed state, plan, output folder (locked), tokenizer, data
        run.load_model()       # seeded, quantized as planned
        run.evaluate_before()  # the base model, when the recipe asks
        run.train()            # SFTTrainer; checkpoints; a signal checkpoints and stops
        run.save()             # adapter (or model) and tokenizer into the work folder
        run.evaluate_after()   # eval.json, predictions.jsonl
        return run.finish()    # loss plot, merged model, manifest, model cards, publish, summary, hub push

Each phase turns a GPU out-of-memory error into concrete advice for that phase.
"""

from __future__ import annotations

import os
import shlex
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from finsft.data import Formatter, make_formatter, prepared_cache
from finsft.data_sources import build_splits
from finsft.errors import FinsftError, OutputDirError
from finsft.evaluation import (
    EvalReport,
    eval_set,
    eval_settings,
    headline,
    resolve_scorer,
    rows_fingerprint,
    score,
)
from finsft.evaluation.leak import evaluation_inputs
from finsft.evaluation.report import write_report
from finsft.evaluation.sets import NamedSet, extra_sets, log_summary, summary_line
from finsft.files import write_json
from finsft.models import (
    ModelSource,
    load_tokenizer,
    load_training_model,
    model_shape,
    portable_adapter,
    resolve_model,
)
from finsft.plan import Plan, check_fits, detect_hardware, get_sft_config, plan_run, sharding_engine
from finsft.progress import ProgressCallback, console, is_main_process, summary_table
from finsft.publish import check_can_push, default_repo_id, push_run, write_model_card
from finsft.quiet import quiet_libraries
from finsft.recipe import Recipe
from finsft.templates import Template, template_from_recipe
from finsft.training.advice import oom_message
from finsft.training.launch import (
    WORKING_CPU_LAUNCH,
    broadcast,
    check_world_size,
    launcher_warning,
    launcher_world_size,
    resume_command,
)
from finsft.training.output import (
    CHECKPOINTS,
    RunDirs,
    RunLock,
    check_target,
    checkpoint_step,
    latest_checkpoint,
    mean_train_loss,
    prepare,
    publish,
    trim_metrics,
)
from finsft.training.report import library_versions, plot_losses, print_plan
from finsft.training.signals import RunInterrupted, graceful_signals, stop_callback
from finsft.training.task_metric import task_metric_callback, task_rows
from finsft.training.tracking import check_trackers, write_results
from finsft.training.trainer import build_trainer, model_is_sharded


def train(recipe: Recipe, *, overwrite: bool = False, resume: bool = False, force: bool = False,
          command: list[str] | None = None) -> Path:
    """Run the recipe; returns the output folder. ``command``: the finsft command line that runs it (named in
    the resume hint of an interrupted run)."""
    with TrainingRun(recipe, overwrite=overwrite, resume=resume, force=force, command=command) as run:
        run.setup()
        run.load_model()
        run.evaluate_before()
        run.train()
        run.save()
        run.evaluate_after()
        return run.finish()


def io_problem(exc: BaseException) -> str | None:
    """The file-system error behind ``exc`` (a full disk, a file-size limit, a read-only folder...), in words; None
    when ``exc`` is something else. safetensors and torch.save report such errors in their own exception types."""
    if isinstance(exc, OSError):
        return f"{exc.strerror or exc}{f' ({exc.filename})' if exc.filename else ''}"
    text = str(exc)
    if type(exc).__name__ == "SafetensorError" and "I/O error" in text:
        return text.split("I/O error:", 1)[1].strip()
    if isinstance(exc, RuntimeError) and ("PytorchStreamWriter failed" in text or "file write failed" in text):
        return text.splitlines()[0]
    return None


class TrainingRun:
    """One training run and its state between phases."""

    def __init__(self, recipe: Recipe, *, overwrite: bool = False, resume: bool = False, force: bool = False,
                 command: list[str] | None = None):
        self.recipe = recipe
        self.overwrite, self.resume, self.force = overwrite, resume, force
        self.command = command
        self.out = console()
        self.dirs = RunDirs.for_recipe(recipe)
        self.main = is_main_process()
        self.lock = RunLock(self.dirs.lock_file)
        self.wall_start = time.time()
        self.checkpoint: str | None = None
        self.previous: list[dict[str, Any]] = []
        # The evaluation set (evaluation.path or the validation split) first, then evaluation.sets.
        self.sets: list[NamedSet] = []
        self.set_base: dict[str, dict[str, Any]] = {}
        self.set_reports: dict[str, EvalReport] = {}
        self.model: Any = None
        self.trainer: Any = None
        self.result: Any = None

    def __enter__(self) -> TrainingRun:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.lock.release()

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Out-of-memory advice for the phase ``name``; disk errors become messages that keep the run."""
        import torch

        try:
            yield
        except torch.cuda.OutOfMemoryError as exc:
            raise FinsftError(oom_message(self.recipe, self.plan, name,
                                          self.resume_cmd if name == "training" else None)) from exc
        except Exception as exc:
            problem = io_problem(exc)
            if problem is None:
                raise
            what = f"{name} failed: {problem}"
            if not self.main or name in ("model loading", "evaluation of the base model"):
                raise FinsftError(what) from exc
            raise FinsftError(
                f"{what}. The run is kept in {self.dirs.work} (newest complete checkpoint: "
                f"{latest_checkpoint(self.dirs.work) or 'none'}); after freeing space or fixing the cause, continue "
                f"with: {self.resume_cmd}") from exc

    # ------------------------------------------------------------------------------------------------- setup

    def setup(self) -> None:
        """Hardware, the distributed state, the plan, the output folder, the tokenizer and the data."""
        quiet_libraries()
        recipe, out = self.recipe, self.out
        self.repo_id = default_repo_id(dict(recipe.output), recipe.name)
        if recipe.output["push_to_hub"] and self.main:
            check_can_push(self.repo_id, "output.hub_model_id")  # a missing token fails now, not after training
        self.hardware = detect_hardware()
        engine = sharding_engine()
        if engine and not self.hardware.is_gpu:
            # accelerate's FSDP plugin refuses CPU-only machines ("There are currently no available devices
            # found"), and DeepSpeed needs GPUs: say so before any process waits for another.
            raise FinsftError(f"{engine} shards the model across GPUs and this machine has none; on CPU, train "
                              f"with several processes through DDP: {WORKING_CPU_LAUNCH}")
        warning = launcher_warning()
        if warning:
            out.print(f"[yellow]warning:[/] {warning}")
        if recipe.model["trust_remote_code"]:
            out.print(f"[bold yellow]warning:[/] model.trust_remote_code is true: the Python code shipped with "
                      f"'{recipe['model']['name_or_path']}' will run on this machine with your permissions")
        self.template: Template = template_from_recipe(recipe.template)
        check_trackers(recipe.training["report_to"])  # a missing tracker package, before anything heavy
        # The leak guard's evaluation inputs: every evaluation file read (and its errors found) before torch loads.
        self.exclude = evaluation_inputs(recipe, self.template, log=out.print if self.main else None)
        # Only the main process converts a GGUF file; the others wait for it below.
        source = resolve_model(recipe, log=out.print) if self.main else None
        from accelerate import PartialState

        self.state = PartialState(cpu=not self.hardware.is_gpu)
        self.world = self.state.num_processes
        # Before any collective: a rank that is alone must not wait for the others.
        check_world_size(launcher_world_size(), self.world, self.state.distributed_type.value)
        self.state.wait_for_everyone()
        self.source: ModelSource = source or resolve_model(recipe, log=lambda *_: None)
        self.plan: Plan = plan_run(recipe, self.hardware, model_shape(self.source,
                                                                      recipe.model["trust_remote_code"]))
        self.resume_cmd = resume_command(recipe, self.command)
        check_fits(self.plan)  # before any weight is loaded: the overrides that would fit, if it does not
        self._prepare_output()
        self.tokenizer = load_tokenizer(self.source, recipe)
        self._prepare_data()

    def _prepare_output(self) -> None:
        """The main process locks and checks the output folder; every rank gets its verdict (none left waiting)."""
        problem: str | None = None
        if self.main:
            try:
                check_target(self.dirs, self.recipe)  # refused folders get no lock file either
                self.lock.acquire(self.dirs.final)
                self.checkpoint = prepare(self.recipe, self.dirs, overwrite=self.overwrite, resume=self.resume,
                                          force=self.force)
            except OutputDirError as exc:
                problem = str(exc)
        self.checkpoint, problem = broadcast((self.checkpoint, problem), self.world)
        if problem is not None:
            raise OutputDirError(problem)
        if self.resume and self.main:
            step = checkpoint_step(self.checkpoint) if self.checkpoint else 0
            self.previous = trim_metrics(self.dirs.work / "metrics.jsonl", step)
            self.out.print(f"resuming {self.dirs.work} from {Path(self.checkpoint).name} (step {step})"
                           if self.checkpoint else f"resuming {self.dirs.work}: no checkpoint was saved before the "
                                                   "interruption, starting from step 0")

    def _prepare_data(self) -> None:
        recipe, out = self.recipe, self.out
        with self.state.main_process_first():
            self.splits = build_splits(recipe, self.template, self.exclude)
            self.formatter: Formatter = make_formatter(recipe, self.template, self.tokenizer)
            max_length = recipe.training["max_length"]
            t0 = time.perf_counter()
            self.train_ds = prepared_cache(self.splits.train, self.formatter, max_length, self.splits.fingerprint,
                                           "train", log=out.print)
            self.val_ds = (prepared_cache(self.splits.validation, self.formatter, max_length,
                                          self.splits.fingerprint, "validation", log=out.print)
                           if self.splits.validation is not None else None)
            self.prep_s = time.perf_counter() - t0
        self.n_val = len(self.splits.validation) if self.splits.validation is not None else 0
        if self.main and self.exclude.checked:
            line, warning = self.exclude.summary()
            out.print(f"[yellow]warning:[/] {line}" if warning else line)
        print_plan(out, self.plan, recipe, len(self.splits.train), self.n_val)
        if self.world > 1:
            out.print(f"distributed: world size {self.world} ({self.state.distributed_type.value}, launcher "
                      f"WORLD_SIZE={launcher_world_size()}); only rank 0 prints and writes")
        if self.recipe.evaluation and self.main:
            rows = eval_set(recipe, self.template, self.splits.validation)
            scorer = resolve_scorer(recipe.evaluation_settings["scorer"], self.template)
            main_set = NamedSet(rows.name, rows, self.template, self.formatter,
                                eval_settings(recipe, self.formatter, scorer))
            self.sets = [main_set, *extra_sets(recipe, self.template, self.tokenizer)]

    # -------------------------------------------------------------------------------------------- the model

    def load_model(self) -> None:
        """The model as training uses it. Seeded first, so that the same seed builds the same LoRA layers."""
        from transformers import set_seed

        set_seed(self.recipe.training["seed"])
        with self.phase("model loading"):
            self.model = load_training_model(self.source, self.recipe, self.plan)

    def evaluate_before(self) -> None:
        """Score the base model on every evaluation set, when the recipe asks and this is not a resumed run."""
        ev = self.recipe.evaluation
        if not (ev and ev["before_training"] and self.main and not self.checkpoint and self.sets):
            return
        if not self.plan.evaluate_before_training:
            self.out.print(f"evaluation before training skipped: {self.plan.choice('evaluation.before_training').reason}")
            return
        for i, s in enumerate(self.sets):
            with self.phase("evaluation of the base model"):
                res = score(self.model, s.formatter, s.rows.rows, s.settings, self.out,
                            "evaluating the base model" + (f" on '{s.name}'" if i else ""))
            self.set_base[s.name] = res.metrics
            self.out.print(f"before training ({res.scorer}, {len(s.rows.rows)} rows): {headline(res.metrics)}" if i == 0
                           else f"before training, {summary_line(s.name, res.metrics)}")
            self._log_set(s.name, "before_training", res.metrics)

    def _log_set(self, name: str, phase: str, metrics: dict[str, Any]) -> None:
        step = self.trainer.state.global_step if self.trainer is not None else 0
        log_summary(self.dirs.work / "metrics.jsonl", name, phase, metrics, step)

    # ---------------------------------------------------------------------------------------------- training

    def build_trainer(self) -> Any:
        """SFTTrainer with the progress display and the signal handling; the LoRA layers are built here, from
        the training seed."""
        from transformers import set_seed

        metrics_path = str(self.dirs.work / "metrics.jsonl") if self.main else None
        self.progress = ProgressCallback(metrics_path, self.out)
        self.progress.history.extend(self.previous)
        args = get_sft_config(self.recipe, self.plan, str(self.dirs.work / CHECKPOINTS),
                              has_eval=self.val_ds is not None)
        callbacks = []
        rows = task_rows(self.recipe, self.formatter, self.splits.validation) if args.eval_strategy != "no" else []
        if rows:
            callbacks.append(task_metric_callback(self.formatter, rows, args.per_device_eval_batch_size, self.progress))
        set_seed(self.recipe.training["seed"])
        self.trainer = build_trainer(self.recipe, self.model, args, self.tokenizer, self.train_ds, self.val_ds,
                                     callbacks)
        self.trainer.add_callback(self.progress)
        return self.trainer

    def train(self) -> None:
        with self.phase("training"):
            trainer = self.trainer or self.build_trainer()
            with graceful_signals() as sig:
                trainer.add_callback(stop_callback(sig, self.world))
                try:
                    self.result = trainer.train(resume_from_checkpoint=self.checkpoint)
                except FinsftError:
                    raise
                except Exception as exc:
                    import torch

                    if self.main and not isinstance(exc, torch.cuda.OutOfMemoryError) and io_problem(exc) is None:
                        self.out.print(
                            f"[red]training failed at step {trainer.state.global_step}[/]; the run is kept in "
                            f"{self.dirs.work} (newest checkpoint: {latest_checkpoint(self.dirs.work) or 'none'}). "
                            f"After fixing the cause, continue with: {self.resume_cmd}")
                    raise
        if sig.get("signal"):
            self.state.wait_for_everyone()
            name = signal.Signals(sig["signal"]).name
            raise RunInterrupted(
                f"{name}: stopped at step {trainer.state.global_step}/{trainer.state.max_steps} and saved "
                f"{latest_checkpoint(self.dirs.work)}; {self.dirs.final} was not written. Resume with:\n  "
                f"{self.resume_cmd}", sig["signal"])

    def save(self) -> None:
        """The adapter (or full model) and tokenizer into the work folder. Every rank takes part: gathering
        sharded weights is collective; rank 0 writes."""
        trainer = self.trainer
        with self.phase("saving"):
            if getattr(trainer, "is_fsdp_enabled", False):
                # One full adapter file, not one shard per process (the PEFT/TRL recipe for FSDP).
                trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
            trainer.save_model(str(self.dirs.work))
        self.sharded = model_is_sharded(trainer)
        self.state.wait_for_everyone()
        if self.main:  # adapter_config.json names the base's hub id, not finsft's cache: the adapter is portable
            note = portable_adapter(self.dirs.work, self.source)
            if note:
                self.out.print(note)

    def evaluate_after(self) -> None:
        """Score the trained model on every evaluation set. The first set's report is the run's eval.json; the
        others go to eval/<name>/eval.json (one report shape). Rank 0 alone (no collective is left)."""
        recipe = self.recipe
        if not (recipe.evaluation and self.main and self.sets):
            return
        if self.sharded:
            self.out.print(f"evaluation skipped: the model is sharded across {self.world} processes "
                           f"({self.state.distributed_type}); evaluate the saved adapter with: finsft eval "
                           f"{shlex.quote(recipe.source)} --adapter {shlex.quote(str(self.dirs.final))}")
            return
        for i, s in enumerate(self.sets):
            t0 = time.perf_counter()
            with self.phase("evaluation of the trained model"):
                res = score(self.trainer.model, s.formatter, s.rows.rows, s.settings, self.out,
                            "evaluating the trained model" + (f" on '{s.name}'" if i else ""))
            base = self.set_base.get(s.name)
            self.out.print(f"after training ({res.scorer}, {len(s.rows.rows)} rows): {headline(res.metrics)}" if i == 0
                           else f"after training, {summary_line(s.name, res.metrics, base)}")
            report = EvalReport(
                model=self.source.description, adapter=str(self.dirs.final), data=s.rows.description,
                rows=len(s.rows.rows), rows_fingerprint=rows_fingerprint(s.rows.rows), settings=s.settings,
                metrics=res.metrics, base_metrics=base, seconds={"scoring": round(time.perf_counter() - t0, 2)})
            folder = self.dirs.work if i == 0 else self.dirs.work / "eval" / s.name
            write_report(folder, report, res.predictions, f"{recipe.name}: '{s.name}' after training")
            self.set_reports[s.name] = report
            self._log_set(s.name, "after_training", res.metrics)

    @property
    def report(self) -> EvalReport | None:
        """The run's eval.json: the first evaluation set's report."""
        return self.set_reports.get(self.sets[0].name) if self.sets else None

    # ------------------------------------------------------------------------------------------------ finish

    def finish(self) -> Path:
        """Loss plot, merged model, manifest, model cards; then the run is published into ``output.dir`` and,
        with ``output.push_to_hub``, uploaded to the hub. Rank 0 only."""
        if not self.main:
            return self.dirs.final
        recipe, work = self.recipe, self.dirs.work
        if recipe.output["plot"]:
            plot_losses(self.progress.history, work / "loss.png")
        if recipe.output["save_merged"] and recipe.lora:
            if self.sharded:
                self.out.print(f"merge skipped: the model is sharded across {self.world} processes; merge the saved "
                               f"adapter with: finsft merge {shlex.quote(recipe.source)} --adapter "
                               f"{shlex.quote(str(self.dirs.final))} --out MERGED_DIR")
            else:
                from finsft.merge import merge_into

                with self.phase("merging"):
                    merge_into(self.trainer.model, self.tokenizer, work / "merged")
        manifest = self.manifest()
        with self.phase("writing the manifest"):
            # trainer_state.json and *_results.json at the top, as Hugging Face scripts write them
            write_results(work, self.dirs.final, self.trainer.state,
                          {**self.result.metrics, "train_loss": manifest["train"]["train_loss"]},
                          self.report.metrics if self.report else None)
            write_json(work / "manifest.json", manifest)
            self.write_cards(manifest)
            publish(self.dirs)
        self.print_summary(manifest)
        if recipe.output["push_to_hub"]:
            result = push_run(self.dirs.final, self.repo_id, private=recipe.output["hub_private_repo"],
                              log=self.out.print)
            self.out.print(f"pushed {len(result.files)} files to {result.url} "
                           f"({'private' if result.private else 'public'} if new): {result.commit_url}")
        return self.dirs.final

    def write_cards(self, manifest: dict[str, Any]) -> None:
        """A model card (README.md) in every output folder: the adapter or model, and merged/."""
        report = self.report.as_dict() if self.report else None
        for folder in (self.dirs.work, self.dirs.work / "merged"):
            if (folder / "adapter_config.json").is_file() or (folder / "config.json").is_file():
                try:
                    write_model_card(folder, manifest, self.recipe.config, report)
                except (ValueError, KeyError, TypeError) as exc:  # a card must never cost the finished run
                    self.out.print(f"[yellow]warning:[/] the model card {folder / 'README.md'} was not written: "
                                   f"{exc}")

    def manifest(self) -> dict[str, Any]:
        import platform

        trainer, recipe, hw = self.trainer, self.recipe, self.hardware
        train_loss = self.result.training_loss
        if self.checkpoint:
            train_loss = mean_train_loss(self.progress.history) or train_loss
        t = recipe.training
        return {
            "recipe": recipe.name,
            "recipe_files": recipe.files,
            "libraries": library_versions(),
            "hardware": {"device": hw.device, "name": hw.name, "world_size": self.world,
                         "distributed_type": self.state.distributed_type.value,
                         "python": platform.python_version(), "platform": platform.platform()},
            "plan": [{"setting": c.setting, "value": c.value, "reason": c.reason, "automatic": c.automatic}
                     for c in self.plan.choices],
            "model": self.source.description,
            "base_model": {"name_or_path": recipe.model["name_or_path"], "gguf_file": recipe.model["gguf_file"],
                           "hub_id": self.source.hub_id, "hub_id_reason": self.source.hub_id_reason},
            "data": {"fingerprint": self.splits.fingerprint, "train_rows": len(self.splits.train),
                     "validation_rows": self.n_val, "prep_seconds": round(self.prep_s, 2),
                     "sources": self.splits.sources,
                     "eval_overlap": self.exclude.report() if self.exclude.checked else None},
            "train": {"global_step": trainer.state.global_step, "train_loss": train_loss,
                      "runtime_s": self.result.metrics.get("train_runtime"),
                      "tokens_per_s": self.progress.tokens_per_s(trainer.state),
                      "effective_batch": (t["per_device_train_batch_size"] * t["gradient_accumulation_steps"]
                                          * self.world),
                      "resumed_from": os.path.relpath(self.checkpoint, self.dirs.work) if self.checkpoint else None},
            "wall_seconds": round(time.time() - self.wall_start, 1),
        }

    def print_summary(self, manifest: dict[str, Any]) -> None:
        tps = manifest["train"]["tokens_per_s"]
        rows: list[tuple[str, Any]] = [
            ("output", str(self.dirs.final)), ("steps", manifest["train"]["global_step"]),
            ("train loss", f"{manifest['train']['train_loss']:.4f}"),
            ("tokens/s", f"{tps:,.0f}" if tps else "-"), ("wall time", f"{manifest['wall_seconds']:.0f} s"),
        ]
        for i, (name, report) in enumerate(self.set_reports.items()):
            label = "" if i == 0 else f" ('{name}')"
            if report.base_metrics:
                rows.append((f"before{label}", headline(report.base_metrics)))
            rows.append((f"after{label}", headline(report.metrics)))
        self.out.print(summary_table("finsft: done", rows))
