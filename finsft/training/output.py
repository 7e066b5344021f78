"""The run's output folder: what finsft may replace, one run per folder (a lock), checkpoints, publishing.

Layout (``output.dir``)::

    adapter_config.json, adapter_model.safetensors   LoRA adapter (or the full model without lora)
    tokenizer files, recipe.json (fully resolved), manifest.json, metrics.jsonl, loss.png, .finsft
    eval.json, predictions.jsonl, confusion.png (when the recipe evaluates), checkpoints/, merged/

The run works in ``<dir>.partial`` and renames it to ``<dir>`` when everything is written, so ``<dir>`` is never
half-written; an interrupted run leaves ``<dir>.partial`` with its checkpoints for ``--resume``.

Nothing is lost: ``--overwrite`` replaces only a folder finsft made (it carries the ``.finsft`` marker, or the
recipe.json + manifest.json of runs made before the marker existed), and never one that is, holds or lies inside
something the run reads (recipe, data, model folder, finsft's cache) or that is or holds the current folder or the
home folder. A second run on the same folder is refused while the first holds its lock.
"""

from __future__ import annotations

import difflib
import json
import os
import shutil
import struct
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finsft.errors import OutputDirError
from finsft.files import RunLock as RunLock  # re-exported: the run lock lives with the gates, in finsft.files
from finsft.files import lock_path, write_json, write_jsonl
from finsft.recipe import Recipe

CHECKPOINTS = "checkpoints"
MARKER = ".finsft"


# ------------------------------------------------------------------------------------------------ the folders


@dataclass
class RunDirs:
    final: Path
    work: Path

    @classmethod
    def for_recipe(cls, recipe: Recipe) -> RunDirs:
        final = Path(os.path.expanduser(recipe.output["dir"])).absolute()
        final = Path(os.path.normpath(final))
        if not final.name:
            raise OutputDirError(f"output.dir {final} is the root folder, which holds the current folder and "
                                 "everything else: choose a new folder, e.g. output.dir=runs/NAME")
        return cls(final, final.with_name(final.name + ".partial"))

    @property
    def lock_file(self) -> Path:
        return lock_path(self.final)


def made_by_finsft(folder: Path) -> bool:
    """A folder finsft created: its marker, or (runs from before the marker) recipe.json with manifest.json."""
    if (folder / MARKER).is_file():
        return True
    return (folder / "recipe.json").is_file() and (folder / "manifest.json").is_file()


def _nonempty(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())


def _inside(path: Path, folder: Path) -> bool:
    """``path`` is ``folder`` or lies inside it."""
    try:
        path.relative_to(folder)
    except ValueError:
        return False
    return True


def protected_paths(recipe: Recipe) -> list[tuple[Path, str]]:
    """What a run reads and must never replace, each with what it is."""
    from finsft.files import cache_dir

    out: list[tuple[Path, str]] = [(Path(f).absolute(), "a recipe file") for f in recipe.files]
    data, ev, model = recipe.data, recipe.evaluation_settings, recipe.model
    for value, what in ((data.get("path"), "the training data"), (data.get("validation_path"), "the validation data"),
                        (ev["path"], "the evaluation data"), (model.get("name_or_path"), "the model folder")):
        if isinstance(value, str) and value and os.path.isabs(value):
            out.append((Path(value), what))
    extra = [(s.get("path"), "a source of data.datasets") for s in data.get("datasets") or []]
    extra += [(s.get("path"), f"evaluation set '{name}'") for name, s in (ev.get("sets") or {}).items()]
    out += [(Path(value), what) for value, what in extra if isinstance(value, str) and os.path.isabs(value)]
    out.append((cache_dir().absolute(), "finsft's cache"))
    return [(Path(os.path.normpath(p)), what) for p, what in out]


def check_target(dirs: RunDirs, recipe: Recipe) -> None:
    """Refuse an output folder that would replace or corrupt something the user did not get from finsft."""
    final = dirs.final
    for folder, what in ((Path.cwd(), "the current folder"), (Path.home(), "your home folder")):
        folder = Path(os.path.normpath(folder.absolute()))
        if _inside(folder, final):
            raise OutputDirError(f"output.dir {final} is {what} or holds it; a run replaces its output folder as a "
                                 "whole: choose a new folder, e.g. output.dir=runs/NAME")
    for path, what in protected_paths(recipe):
        real = Path(os.path.realpath(path))
        for candidate in {final, Path(os.path.realpath(final))}:
            if _inside(path, candidate) or _inside(real, candidate):
                raise OutputDirError(f"output.dir {final} is or holds {what} ({path}); finsft never replaces what "
                                     "a run reads: choose a new folder, e.g. output.dir=runs/NAME")
            if path.is_dir() and (_inside(candidate, path) or _inside(candidate, real)):
                raise OutputDirError(f"output.dir {final} lies inside {what} ({path}): choose a folder outside it")
    if final.is_symlink():
        raise OutputDirError(f"output.dir {final} is a symbolic link (to {os.path.realpath(final)}); a run replaces "
                             "its output folder as a whole and does not follow links: set output.dir to the folder "
                             "itself, or choose a new one")
    for path in (final, dirs.work):
        if path.exists() and not path.is_dir():
            raise OutputDirError(f"output.dir: {path} is a file, not a folder; finsft does not replace it: choose "
                                 "another output.dir or move the file")
    parent = final.parent
    probe = parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise OutputDirError(f"output.dir {final}: {probe} is a file, so no folder can be made under it")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise OutputDirError(f"output.dir {final}: {probe} is not writable for you; choose a folder you can write "
                             "to (output.dir=...)")


# ------------------------------------------------------------------------------------------------ checkpoints


def checkpoint_step(path: str | Path) -> int:
    return int(Path(path).name.split("-")[-1])


def _safetensors_complete(path: Path) -> bool:
    """The header parses and the file is as long as the header says (a file cut short by a kill or a full disk
    is not)."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        return path.stat().st_size >= 8 + n + end
    except (OSError, ValueError, KeyError, TypeError, struct.error):
        return False


def checkpoint_complete(ckpt: Path) -> bool:
    """Every file the Trainer writes is whole: trainer_state.json (written last) parses, safetensors files are as
    long as their headers say, and torch's .pt/.bin files are readable zip archives."""
    try:
        json.loads((ckpt / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    for f in ckpt.iterdir():
        if f.suffix == ".safetensors" and not _safetensors_complete(f):
            return False
        if f.suffix in (".pt", ".bin", ".pth") and not zipfile.is_zipfile(f):
            return False
    return True


def checkpoints(work: Path) -> list[Path]:
    """The checkpoints in ``work/checkpoints``, newest first."""
    return sorted((p for p in (work / CHECKPOINTS).glob("checkpoint-*") if p.name.split("-")[-1].isdigit()),
                  key=checkpoint_step, reverse=True)


def latest_checkpoint(work: Path) -> str | None:
    """The newest complete checkpoint (one cut short by a kill or a full disk is skipped)."""
    return next((str(p) for p in checkpoints(work) if checkpoint_complete(p)), None)


def trim_metrics(path: Path, step: int) -> list[dict[str, Any]]:
    """Keep the metrics records of steps up to ``step`` (the checkpoint a run resumes from), so that the resumed
    run's records continue the log without repeating steps; returns the kept records."""
    if not path.exists():
        return []
    kept = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:  # a line cut short by a kill
            continue
        if isinstance(record, dict) and record.get("step", 0) <= step and "train_loss" not in record:
            kept.append(record)
    write_jsonl(path, kept, kept="the interrupted run is kept as it was")  # the run's own log, whole or not at all
    return kept


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


def recipe_diff(old: dict[str, Any], new: dict[str, Any]) -> str:
    a = json.dumps(old, indent=2, sort_keys=True).splitlines()
    b = json.dumps(new, indent=2, sort_keys=True).splitlines()
    return "\n".join(difflib.unified_diff(a, b, "recipe of the interrupted run", "recipe now", lineterm="", n=1))


# ---------------------------------------------------------------------------------------------- prepare, publish


def _failed_start(work: Path) -> bool:
    """A work folder with nothing but finsft's start files (its marker among them): an earlier run failed before
    its first training step (a model or data error), so there is nothing to resume or keep."""
    return (work / MARKER).is_file() and {p.name for p in work.iterdir()} <= {"recipe.json", MARKER}


def check_work_folder(work: Path) -> None:
    """An existing ``<dir>.partial`` is finsft's own only when it carries the marker (finsft writes it first into
    every work folder it makes) and holds no symbolic link: the Trainer writes checkpoints into it and deletes old
    ones (``save_total_limit``), and a checkpoints/ that is a link would point that deleting at the user's
    folders. Anything else is the user's: refused, never resumed into, replaced or deleted."""
    if work.is_symlink():
        raise OutputDirError(f"{work} is a symbolic link (to {os.path.realpath(work)}); finsft works only in a "
                             "folder it made and does not follow links out of it: move the link away or choose "
                             "another output.dir")
    if not work.is_dir():
        return
    if not (work / MARKER).is_file():
        raise OutputDirError(f"{work} exists but has no {MARKER} marker (finsft writes one into every work folder "
                             "it makes), so it is not a finsft run, even if it holds a recipe.json: finsft neither "
                             "resumes into, replaces (--overwrite) nor deletes it. Move it away or choose another "
                             "output.dir")
    for root, dirs, files in os.walk(work):
        for name in dirs + files:
            path = Path(root) / name
            if path.is_symlink():
                raise OutputDirError(f"{path} is a symbolic link (to {os.path.realpath(path)}); the run writes, "
                                     "rotates (save_total_limit) and deletes checkpoints inside its folder and "
                                     "never follows a link out of it: remove the link (the folder it points to is "
                                     "not touched), or choose another output.dir")


def _checkpoint_state(ckpt: Path) -> dict[str, Any]:
    try:
        state = json.loads((ckpt / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


def check_checkpoint(ckpt: str | Path, max_steps: int) -> None:
    """The checkpoint a run resumes from is what its name says: trainer_state.json's global_step equals the step
    in the folder name and does not exceed the recipe's training.max_steps (when set). A checkpoint copied from
    another run, or edited, would otherwise be published as this run's finished training."""
    ckpt = Path(ckpt)
    state = _checkpoint_state(ckpt)
    step = state.get("global_step")
    named = checkpoint_step(ckpt)
    problem = None
    if not isinstance(step, int) or isinstance(step, bool):
        problem = f"its trainer_state.json has no global_step (found {step!r})"
    elif step != named:
        problem = f"its trainer_state.json says global_step {step}, but the folder is named for step {named}"
    elif max_steps > 0 and step > max_steps:
        problem = f"it is at step {step}, beyond the recipe's training.max_steps={max_steps}"
    if problem:
        raise OutputDirError(f"cannot resume from {ckpt}: {problem}, so it did not come from this run. Delete that "
                             "checkpoint folder to resume from the one before it, or start over with --overwrite")


def training_finished(ckpt: str | Path | None) -> bool:
    """The checkpoint is the one the Trainer saves at the end of training (global_step reached its max_steps)."""
    if ckpt is None:
        return False
    state = _checkpoint_state(Path(ckpt))
    step, total = state.get("global_step"), state.get("max_steps")
    return isinstance(step, int) and isinstance(total, int) and total > 0 and step >= total


def _start_work(dirs: RunDirs, recipe: Recipe) -> None:
    try:
        dirs.work.mkdir(parents=True)
        write_json(dirs.work / MARKER, {"created_by": "finsft", "recipe": recipe.source,
                                        "created": time.strftime("%Y-%m-%d %H:%M:%S %Z")})
        write_json(dirs.work / "recipe.json", recipe.config)
    except OSError as exc:
        raise OutputDirError(f"cannot create {dirs.work}: {exc.strerror or exc}") from exc


def _remove_finsft_folder(path: Path) -> None:
    if path.is_symlink() or not (path / MARKER).is_file():
        raise OutputDirError(f"{path} was not made by finsft (no {MARKER} marker); finsft does not delete it: "
                             "move it away or choose another output.dir")
    shutil.rmtree(path)


def prepare(recipe: Recipe, dirs: RunDirs, *, overwrite: bool, resume: bool, force: bool) -> str | None:
    """Check the output folder's state and create the work folder; returns the checkpoint to resume from. Main
    process only, with the run's lock held."""
    check_target(dirs, recipe)
    check_work_folder(dirs.work)
    if resume:
        if not dirs.work.exists():
            hint = " (that run finished)" if _nonempty(dirs.final) else ""
            raise OutputDirError(f"nothing to resume: no interrupted run in {dirs.work}{hint}")
        saved = dirs.work / "recipe.json"
        if saved.exists() and not force:
            try:
                old = json.loads(saved.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise OutputDirError(f"{saved} is damaged ({exc}); it records the interrupted run's recipe. Resume "
                                     "anyway with --resume --force (the current recipe is saved in its place), or "
                                     "start over with --overwrite") from exc
            if old != recipe.config:
                raise OutputDirError("the recipe changed since the interrupted run; resuming would mix two "
                                     "trainings (use --force to resume anyway, or --overwrite to start over):\n"
                                     + recipe_diff(old, recipe.config))
        if force or not saved.exists():
            write_json(saved, recipe.config)
        ckpt = latest_checkpoint(dirs.work)
        if ckpt is not None:
            check_checkpoint(ckpt, recipe.training["max_steps"])
        return ckpt
    if _nonempty(dirs.final):
        if not made_by_finsft(dirs.final):
            raise OutputDirError(f"output folder {dirs.final} exists and was not made by finsft; finsft never "
                                 "replaces such a folder, even with --overwrite: choose another output.dir")
        if not overwrite:
            raise OutputDirError(f"output folder {dirs.final} holds an earlier run; use --overwrite to replace it "
                                 "(it is kept until the new run has finished) or choose another output.dir")
    if dirs.work.exists():
        if not overwrite and not _failed_start(dirs.work):
            raise OutputDirError(f"an interrupted run is in {dirs.work}: continue it with --resume, or start over "
                                 "with --overwrite")
        _remove_finsft_folder(dirs.work)
    _start_work(dirs, recipe)
    return None


def publish(dirs: RunDirs) -> None:
    """Move the finished run into place; an earlier run in the output folder is replaced only now, and only when
    finsft made it (checked again: the folder may have changed during the run)."""
    old = None
    if dirs.final.exists():
        if _nonempty(dirs.final) and not made_by_finsft(dirs.final):
            raise OutputDirError(f"{dirs.final} changed during the run and is no longer a finsft run folder; the "
                                 f"finished run is kept in {dirs.work}")
        old = dirs.final.with_name(f".{dirs.final.name}.old-{os.getpid()}")
        os.replace(dirs.final, old)
    os.replace(dirs.work, dirs.final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
