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
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

from finsft.data import Formatter, make_formatter, prepared_cache
from finsft.errors import FinsftError, OutputDirError
from finsft.evaluation import (
    EvalReport,
    eval_settings,
    headline,
    resolve_scorer,
    rows_fingerprint,
    score,
)
from finsft.evaluation.metrics import check_metric_packages, plots_note
from finsft.evaluation.report import samples_table, side_by_side, write_report
from finsft.evaluation.sets import NamedSet, log_summary, named_sets, set_template, summary_line
from finsft.files import WriteError, fix_for, io_problem, write_json
from finsft.models import (
    ModelSource,
    load_tokenizer,
    load_training_model,
    model_shape,
    portable_adapter,
    resolve_model,
    scoring_attention,
)
from finsft.plan import Plan, check_fits, detect_hardware, get_sft_config, plan_run, sharding_engine
from finsft.preflight import Checked, preflight
from finsft.progress import ProgressCallback, console, is_main_process, summary_table
from finsft.publish import default_repo_id, prompt_example, push_run, write_model_card
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
    training_finished,
    trim_metrics,
)
from finsft.training.report import library_versions, plot_losses, print_plan
from finsft.training.signals import (
    PHASES,
    PhaseInterrupted,
    RunInterrupted,
    check_deferred,
    enter_phase,
    graceful_signals,
    phase_key,
    stop_callback,
)
from finsft.training.task_metric import task_metric, task_rows
from finsft.training.tracking import write_results
from finsft.training.trainer import build_trainer, model_is_sharded, score_keys


def train(recipe: Recipe, *, overwrite: bool = False, resume: bool = False, force: bool = False,
          command: list[str] | None = None, checked: Checked | None = None) -> Path:
    """Run the recipe; returns the output folder. ``command``: the finsft command line that runs it (named in
    the resume hint of an interrupted run); ``checked``: the preflight's result when the caller ran it."""
    with TrainingRun(recipe, overwrite=overwrite, resume=resume, force=force, command=command,
                     checked=checked) as run:
        return run.run()


class TrainingRun:
    """One training run and its state between phases."""

    def __init__(self, recipe: Recipe, *, overwrite: bool = False, resume: bool = False, force: bool = False,
                 command: list[str] | None = None, checked: Checked | None = None):
        self.recipe = recipe
        self.checked = checked
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
        self.set_base_predictions: dict[str, list[dict[str, Any]]] = {}
        self.set_reports: dict[str, EvalReport] = {}
        self.model: Any = None
        self.trainer: Any = None
        self.result: Any = None
        self.signals: dict[str, int] | None = None  # while run() runs: the signal state shared by the phases
        self.prepared = False  # the output folder was checked and the work folder made (or resumed)

    def __enter__(self) -> TrainingRun:
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.trainer is not None:
            self.trainer.end_tracking()  # the trackers' end of run, held for the scores after training
        self.lock.release()

    @property
    def resume_cmd(self) -> str:
        return resume_command(self.recipe, self.command)

    def run(self) -> Path:
        """Every phase in order, each answering SIGINT/SIGTERM with what was kept and the command that continues:
        setup, model loading and the evaluations stop at once; training checkpoints first; saving and finishing
        complete what they write, then stop before the run is published."""
        steps = (("setup", self.setup, True), ("model", self.load_model, True),
                 ("before", self.evaluate_before, True), ("training", self.train, False),
                 ("saving", self.save, False), ("after", self.evaluate_after, True), ("finish", self.finish, False))
        with graceful_signals() as sig:
            self.signals = sig
            try:
                for key, step, immediate in steps:
                    enter_phase(sig, key, immediate=immediate)
                    step()
                    if key != "finish":  # finish checks before it publishes; after that the run is done
                        check_deferred(sig)
            except PhaseInterrupted as exc:
                raise RunInterrupted(self.interrupted(phase_key(sig), exc.signum), exc.signum) from None
            except WriteError as exc:  # the gate's message; a prepared run also says where it is kept and how to go on
                if self.prepared and self.main and self.resume_cmd not in str(exc):
                    raise WriteError(f"{exc} The run is kept in {self.dirs.work} and {self.dirs.final} is unchanged; "
                                     f"then continue with: {self.resume_cmd}") from exc
                raise
            except Exception as exc:  # a full disk while writing outside a phase's own handler (plots, logs, cache)
                if io_problem(exc) is None:
                    raise
                raise WriteError(self.disk_message(PHASES[phase_key(sig)], exc)) from exc
            finally:
                self.signals = None
        return self.dirs.final

    def disk_message(self, name: str, exc: BaseException) -> str:
        """A file-system error (full disk, quota, read-only folder) during the phase ``name``: what failed, what
        was kept and the command that continues."""
        what = f"{name} failed: {io_problem(exc)}"
        if not self.main or not self.prepared or name in ("model loading", "evaluation of the base model"):
            kept = ("nothing was written" if not self.prepared and not self.resume
                    else f"the run is kept in {self.dirs.work}")
            return f"{what}; {kept} and {self.dirs.final} is unchanged. Then {fix_for(exc)} and run it again"
        return (f"{what}. The run is kept in {self.dirs.work} (newest complete checkpoint: "
                f"{latest_checkpoint(self.dirs.work) or 'none'}) and {self.dirs.final} is unchanged. Then "
                f"{fix_for(exc)} and continue with: {self.resume_cmd}")

    def interrupted(self, key: str, signum: int) -> str:
        """What a signal during the phase ``key`` kept, and the exact command that continues."""
        name, what = signal.Signals(signum).name, PHASES[key]
        final, work = self.dirs.final, self.dirs.work
        if key == "push":
            return (f"{name} during {what}: the finished run is in {final}; nothing was lost. Upload it with:\n  "
                    f"finsft push {shlex.quote(str(final))}")
        if not self.prepared and not self.resume:
            again = shlex.join(self.command or ["finsft", "train", self.recipe.source])
            return (f"{name} during {what}: stopped before the output folder was prepared; nothing was written and "
                    f"{final} is unchanged. Start again with:\n  {again}")
        ckpt = latest_checkpoint(work) if self.main else None
        if self.result is not None or training_finished(ckpt):
            step = self.trainer.state.global_step if self.trainer is not None else None
            done = f" at step {step}" if step is not None else ""
            return (f"{name} during {what}: training had finished{done} (checkpoint {ckpt}); the run is kept in "
                    f"{work} and {final} was not written. Resume with:\n  {self.resume_cmd}\n(it does not train "
                    "again: it saves, evaluates and publishes the run)")
        return (f"{name} during {what}: the run is kept in {work} (newest checkpoint: "
                f"{ckpt or 'none, no training step was saved'}); {final} was not written. Resume with:\n  "
                f"{self.resume_cmd}")

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
            if io_problem(exc) is None:
                raise
            raise WriteError(self.disk_message(name, exc)) from exc

    # ------------------------------------------------------------------------------------------------- setup

    def setup(self) -> None:
        """The preflight (trackers, hub, data, evaluation sets: finsft.preflight), hardware, the distributed state,
        the plan, the output folder, the tokenizer and the tokenized data."""
        recipe, out = self.recipe, self.out
        if self.checked is None:
            self.checked = preflight(recipe, "train")
        quiet_libraries()
        self.repo_id = default_repo_id(dict(recipe.output), recipe.name)
        self.hardware = detect_hardware()
        engine = sharding_engine()
        if engine == "FSDP" and not self.hardware.is_gpu:
            # accelerate's FSDP plugin refuses CPU-only machines ("There are currently no available devices
            # found"): say so before any process waits for another. DeepSpeed runs on CPU through its CPU
            # accelerator (gloo), see the README's "Scaling out".
            raise FinsftError(f"{engine} shards the model across GPUs and this machine has none; on CPU, train "
                              f"with several processes through DDP ({WORKING_CPU_LAUNCH}) or DeepSpeed ZeRO")
        warning = launcher_warning()
        if warning:
            out.print(f"[yellow]warning:[/] {warning}")
        if recipe.model["trust_remote_code"]:
            out.print(f"[bold yellow]warning:[/] model.trust_remote_code is true: the Python code shipped with "
                      f"'{recipe['model']['name_or_path']}' will run on this machine with your permissions")
        self.template: Template = self.checked.template or template_from_recipe(recipe.template)
        self._check_metric_packages()
        # The leak guard's evaluation inputs, gathered by the preflight before torch loaded.
        assert self.checked.exclude is not None
        self.exclude = self.checked.exclude
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
        check_fits(self.plan)  # before any weight is loaded: the overrides that would fit, if it does not
        self._prepare_output()
        self.tokenizer = load_tokenizer(self.source, recipe)
        self._prepare_data()

    def _check_metric_packages(self) -> None:
        """The packages the evaluations and plots at the end of the run import, checked now: a missing metric
        package is an error before training, a missing plot package a note (the plots are skipped)."""
        recipe = self.recipe
        kinds: dict[bool, list[str]] = {}  # classification or not -> the recipe keys that ask for it
        if recipe.evaluation:
            for spec in [{}, *(recipe.evaluation_settings.get("sets") or {}).values()]:
                kinds.setdefault(set_template(spec, self.template).is_classification, []).append("$.evaluation")
        if recipe.training["eval_task_samples"] and self.template.is_classification:
            kinds.setdefault(True, []).append("$.training.eval_task_samples")
        for classification, keys in sorted(kinds.items()):
            check_metric_packages(classification, f"{recipe.source} ({', '.join(sorted(set(keys)))}): the task "
                                                  "evaluation")
        note = plots_note() if recipe.output["plot"] or True in kinds else None
        if note and self.main:
            self.out.print(f"[yellow]note:[/] {note}")

    def _prepare_output(self) -> None:
        """The main process locks and checks the output folder; every rank gets its verdict (none left waiting)."""
        problem: str | None = None
        if self.main:
            try:
                check_target(self.dirs, self.recipe)  # refused folders get no lock file either
                self.lock.acquire(self.dirs.final)
                self.checkpoint = prepare(self.recipe, self.dirs, overwrite=self.overwrite, resume=self.resume,
                                          force=self.force)
            except (OutputDirError, WriteError) as exc:
                problem = str(exc)
        self.checkpoint, problem = broadcast((self.checkpoint, problem), self.world)
        if problem is not None:
            raise OutputDirError(problem)
        self.prepared = True
        if self.resume and self.main:
            step = checkpoint_step(self.checkpoint) if self.checkpoint else 0
            self.previous = trim_metrics(self.dirs.work / "metrics.jsonl", step)
            self.out.print(f"resuming {self.dirs.work} from {Path(self.checkpoint).name} (step {step})"
                           if self.checkpoint else f"resuming {self.dirs.work}: no checkpoint was saved before the "
                                                   "interruption, starting from step 0")

    def _prepare_data(self) -> None:
        recipe, out = self.recipe, self.out
        checked = self.checked
        assert checked is not None and checked.splits is not None
        self.splits = checked.splits
        with self.state.main_process_first():
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
                      f"WORLD_SIZE={launcher_world_size()}; {self.plan.parallel.describe()}); only rank 0 prints "
                      "and writes")
        if self.recipe.evaluation and self.template.language_modeling:
            out.print(f"task evaluation skipped: template '{self.template.name}' trains on plain text, with no "
                      "prompt and answer to score; the validation loss measures it")
        elif self.recipe.evaluation and self.main and checked.main_set is not None:
            rows = checked.main_set
            scorer = resolve_scorer(recipe.evaluation_settings["scorer"], self.template)
            main_set = NamedSet(rows.name, rows, self.template, self.formatter,
                                eval_settings(recipe, self.formatter, scorer))
            self.sets = [main_set, *named_sets(recipe, checked.sets, self.tokenizer)]

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
            with self.phase("evaluation of the base model"), scoring_attention(self.model, self.plan):
                res = score(self.model, s.formatter, s.rows.rows, s.settings, self.out,
                            "evaluating the base model" + (f" on '{s.name}'" if i else ""))
            self.set_base[s.name] = res.metrics
            self.set_base_predictions[s.name] = res.predictions
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
        rows = task_rows(self.recipe, self.formatter, self.splits.validation) if args.eval_strategy != "no" else []
        set_seed(self.recipe.training["seed"])
        self.trainer = build_trainer(self.recipe, self.model, args, self.tokenizer, self.train_ds, self.val_ds,
                                     task_metric=self._scored(task_metric(self.formatter, rows,
                                                                          args.per_device_eval_batch_size))
                                     if rows else None, supervised_lm_head=self.plan.supervised_lm_head)
        self.trainer.add_callback(self.progress)
        self.trainer.defer_tracker_end = True  # the scores after training reach the trackers before their run ends
        for i, (name, base) in enumerate(self.set_base.items()):  # logged at step 0 to the trackers
            self.trainer.scores_before.update(score_keys("before", base, name if i else None))
        return self.trainer

    def _scored(self, metric: Any) -> Any:
        """The in-training task metric under the plan's inference attention (padded scoring rows: SDPA where the
        plan chose FlexAttention for packed training rows)."""
        plan = self.plan

        def scored(model: Any) -> Any:
            with scoring_attention(model, plan):
                return metric(model)

        return scored

    def train(self) -> None:
        with self.phase("training"):
            trainer = self.trainer or self.build_trainer()
            if self.checkpoint and training_finished(self.checkpoint):
                self._restore_finished(trainer)
                return
            with nullcontext(self.signals) if self.signals is not None else graceful_signals() as sig:
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

    def _restore_finished(self, trainer: Any) -> None:
        """Resuming a run whose training had finished (a signal came while it saved, evaluated or finished): the
        weights and trainer state of its last checkpoint, without a training step (the Trainer would take one more
        step past max_steps)."""
        from transformers import TrainerState
        from transformers.trainer_utils import TrainOutput

        assert self.checkpoint is not None
        trainer._load_from_checkpoint(self.checkpoint)  # the Trainer's own loader: adapters and full models
        trainer.state = TrainerState.load_from_json(str(Path(self.checkpoint) / "trainer_state.json"))
        now = time.perf_counter()
        self.progress.start = self.progress.end = now  # no tokens/s for a run that did not train now
        self.progress.start_tokens = int(trainer.state.num_input_tokens_seen or 0)
        loss = mean_train_loss(self.progress.history) or 0.0
        self.result = TrainOutput(trainer.state.global_step, loss, {"train_loss": loss})
        self.out.print(f"training had finished (step {trainer.state.global_step}/{trainer.state.max_steps}, "
                       f"{Path(self.checkpoint).name}): not training again; saving, evaluating and publishing")

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
            with self.phase("evaluation of the trained model"), scoring_attention(self.trainer.model, self.plan):
                res = score(self.trainer.model, s.formatter, s.rows.rows, s.settings, self.out,
                            "evaluating the trained model" + (f" on '{s.name}'" if i else ""))
            base = self.set_base.get(s.name)
            self.out.print(f"after training ({res.scorer}, {len(s.rows.rows)} rows): {headline(res.metrics)}" if i == 0
                           else f"after training, {summary_line(s.name, res.metrics, base)}")
            samples = side_by_side(self.set_base_predictions.get(s.name), res.predictions)
            if samples and i == 0:
                self.out.print(samples_table(samples))
            report = EvalReport(
                model=self.source.description, adapter=str(self.dirs.final), data=s.rows.description,
                rows=len(s.rows.rows), rows_fingerprint=rows_fingerprint(s.rows.rows), settings=s.settings,
                metrics=res.metrics, base_metrics=base, seconds={"scoring": round(time.perf_counter() - t0, 2)},
                samples=samples)
            folder = self.dirs.work if i == 0 else self.dirs.work / "eval" / s.name
            write_report(folder, report, res.predictions, f"{recipe.name}: '{s.name}' after training")
            self.set_reports[s.name] = report
            self._log_set(s.name, "after_training", res.metrics)
            self.trainer.log_scores(score_keys("after", res.metrics, s.name if i else None))
        self.trainer.end_tracking()

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
        if self.trainer is not None:  # the trackers' runs end before the work folder is published (renamed): an
            self.trainer.end_tracking()  # MLflow store in the run folder must not move under an open run
        with self.phase("writing the manifest"):
            # trainer_state.json and *_results.json at the top, as Hugging Face scripts write them
            write_results(work, self.dirs.final, self.trainer.state,
                          {**self.result.metrics, "train_loss": manifest["train"]["train_loss"]},
                          self.report.metrics if self.report else None)
            write_json(work / "manifest.json", manifest)
            self.write_cards(manifest)
            if self.signals is not None:
                check_deferred(self.signals)  # a signal while finishing: stop before publishing
            publish(self.dirs)
        self.print_summary(manifest)
        if recipe.output["push_to_hub"]:
            if self.signals is not None:
                enter_phase(self.signals, "push", immediate=True)
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
            # one training row's prompt, exactly as the template made it (the model card shows it)
            "example": prompt_example(self.formatter, dict(self.splits.train[0])) if len(self.splits.train) else None,
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
