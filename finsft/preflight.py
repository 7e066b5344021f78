"""Fail fast: the one step every command takes before torch, transformers or TRL are imported.

Everything that can be found without the model is checked here and reported at once (one message listing every
problem): the trackers ``training.report_to`` names are installed (``importlib.util.find_spec``, nothing
imported), a push to the hub has the hub switched on and a token, the data sources (one file or every source of a
mixture) exist, are not empty and have the mapped columns and known labels, chat rows are conversations (file and
line of each bad one), the evaluation sets load with their columns, and the suite's ``--suite-data`` folder holds
files with the expected columns and labels. What is read here (data rows, evaluation rows, suite rows) is handed
to the command in :class:`Checked`, so nothing is read twice.

Only the light libraries run here: jsonschema, ``datasets`` (for the data files) and ``huggingface_hub``'s
constants; ``tests/test_faults_preflight.py`` checks that no heavy module is loaded when a preflight error is
raised.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finsft.data import EvalInputs, Splits
from finsft.data_sources import build_splits, resolve_data_format
from finsft.errors import DataError, FinsftError
from finsft.evaluation.leak import evaluation_inputs
from finsft.evaluation.report import EvalSet, eval_set
from finsft.evaluation.sets import load_set, set_template
from finsft.evaluation.suite import SETS, SUITES, Row, SuiteSet, load_suite_set, local_file
from finsft.files import UnreadableFile, check_readable
from finsft.models import check_adapter
from finsft.publish import check_can_push, check_run_folder, default_repo_id, read_run
from finsft.recipe import Recipe
from finsft.templates import Template, template_from_recipe

# integration -> (modules, any of which makes it available; the pip package)
TRACKER_PACKAGES: dict[str, tuple[tuple[str, ...], str]] = {
    "tensorboard": (("tensorboard", "tensorboardX"), "tensorboard"), "wandb": (("wandb",), "wandb"),
    "mlflow": (("mlflow",), "mlflow"), "trackio": (("trackio",), "trackio"), "comet_ml": (("comet_ml",), "comet-ml"),
    "neptune": (("neptune",), "neptune"), "clearml": (("clearml",), "clearml"), "dvclive": (("dvclive",), "dvclive"),
    "codecarbon": (("codecarbon",), "codecarbon"), "swanlab": (("swanlab",), "swanlab"),
    "dagshub": (("dagshub",), "dagshub"), "flyte": (("flytekit",), "flytekit"),
    "azure_ml": (("azureml",), "azureml-core"), "kubeflow": (("kubeflow",), "kubeflow"),
}


class PreflightError(FinsftError):
    """Every problem the preflight found, in one message."""

    def __init__(self, problems: Sequence[str]):
        # One problem once: the leak guard reads the evaluation files that the data and evaluation checks read
        # again (evaluation.path, data.validation_path, evaluation.sets), and a bad file fails both the same way.
        self.problems = list(dict.fromkeys(problems))
        if len(self.problems) == 1:
            text = self.problems[0]
        else:
            text = (f"{len(self.problems)} problems, found before loading the model:\n"
                    + "\n".join(f"- {p}" for p in self.problems))
        super().__init__(text)


@dataclass
class Checked:
    """What the preflight read, for the command to use as is."""

    template: Template | None = None
    splits: Splits | None = None  # the training data (train); the data whose validation split is evaluated (eval)
    main_set: EvalSet | None = None  # evaluation.path, --data or the validation split
    sets: list[tuple[str, Template, EvalSet]] = field(default_factory=list)  # evaluation.sets
    suite_sets: list[tuple[SuiteSet, list[Row], str]] = field(default_factory=list)
    suite_missing: dict[str, str] = field(default_factory=dict)  # set -> why it was not loaded (not fatal)
    exclude: EvalInputs | None = None  # the leak guard's evaluation inputs (train; eval of the validation split)
    problems: list[str] = field(default_factory=list)

    @contextmanager
    def check(self) -> Iterator[None]:
        """Run one check; its error joins the list instead of stopping the others."""
        try:
            yield
        except FinsftError as exc:
            self.problems.append(str(exc))

    def raise_problems(self) -> None:
        if self.problems:
            raise PreflightError(self.problems)


def requested_trackers(report_to: Any) -> list[str]:
    if report_to in (None, "none"):
        return []
    return [report_to] if isinstance(report_to, str) else list(report_to)


def missing_trackers(report_to: Any) -> list[str]:
    """The trackers training.report_to names whose package is not installed (found, not imported)."""

    def installed(modules: tuple[str, ...]) -> bool:
        return any(importlib.util.find_spec(m) is not None for m in modules)

    return [t for t in requested_trackers(report_to)
            if t in TRACKER_PACKAGES and not installed(TRACKER_PACKAGES[t][0])]


def check_trackers(report_to: Any) -> None:
    """Refuse to start when training.report_to names a tracker whose package is not installed (the Trainer
    would fail only after the model has loaded)."""
    missing = missing_trackers(report_to)
    if missing:
        pips = " ".join(TRACKER_PACKAGES[t][1] for t in missing)
        extra = " (or pip install 'finsft[tensorboard]')" if missing == ["tensorboard"] else ""
        raise FinsftError(f"training.report_to names {', '.join(missing)}, not installed here: pip install {pips}"
                          f"{extra}; or remove it from training.report_to")


MLFLOW_STORE = "mlruns"  # finsft's MLflow store when MLFLOW_TRACKING_URI is not set: RUN/mlruns (a file store)
MLFLOW_REMOTE_SCHEMES = ("http", "https", "databricks", "databricks-uc", "uc")
MLFLOW_DATABASES = ("sqlite", "postgresql", "mysql", "mssql")  # SQLAlchemy stores (not in mlflow-skinny)


def tracker_requested(report_to: Any, name: str) -> bool:
    """``name`` will report: named in training.report_to, or "all" with its package installed."""
    wanted = requested_trackers(report_to)
    if name in wanted:
        return True
    return "all" in wanted and not missing_trackers([name])


def _writable_folder(path: Path) -> str | None:
    """Why a folder at ``path`` cannot be written (made if missing), or None when it can."""
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            return "no part of it exists"
        probe = probe.parent
    if not probe.is_dir():
        return f"{probe} is a file, not a folder"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"{probe} is not writable by this user"
    return None


def mlflow_store_path(uri: str) -> Path | None:
    """The local folder or file of a file: or sqlite: tracking URI (or a plain path), else None."""
    from urllib.parse import unquote, urlparse

    parsed = urlparse(uri)
    scheme = parsed.scheme.split("+")[0].lower()
    if scheme == "" or (len(scheme) == 1 and uri[1:2] == ":"):  # a plain path (or a Windows drive letter)
        return Path(uri).expanduser()
    if scheme == "file":
        return Path(unquote(parsed.path)).expanduser()
    if scheme == "sqlite":  # sqlite:///relative.db, sqlite:////absolute.db; sqlite:// is in memory
        rest = unquote(uri.split("://", 1)[-1])
        return Path(rest[1:] if rest.startswith("/") else rest).expanduser() if rest else None
    return None


def check_mlflow_destination(environ: Any = None) -> str | None:
    """MLflow's tracking URI is usable by the installed client, or unset (finsft's default store under the run
    folder, see finsft.training.tracking); FinsftError saying what to set. Returns the note to print."""
    from urllib.parse import urlparse

    env = os.environ if environ is None else environ
    uri = (env.get("MLFLOW_TRACKING_URI") or "").strip()
    fix = (f"or unset MLFLOW_TRACKING_URI: finsft then logs to a file store in the run folder, RUN/{MLFLOW_STORE}")
    if not uri:
        return (f"training.report_to mlflow: MLFLOW_TRACKING_URI is not set; MLflow's own default (sqlite:///mlflow.db "
                f"in the current folder) needs the full mlflow package, so finsft logs to the file store "
                f"{MLFLOW_STORE}/ in the run folder (see it with: mlflow ui --backend-store-uri RUN/{MLFLOW_STORE})")
    scheme = urlparse(uri).scheme.split("+")[0].lower()
    if len(scheme) == 1:
        scheme = ""
    if scheme in MLFLOW_DATABASES and importlib.util.find_spec("sqlalchemy") is None:
        raise FinsftError(f"training.report_to mlflow: MLFLOW_TRACKING_URI={uri} is a database store, which the "
                          "installed MLflow client cannot write (it has no SQLAlchemy: mlflow-skinny); pip install "
                          f"mlflow (the full package), or set MLFLOW_TRACKING_URI to a file:/ folder or an http(s) "
                          f"server, {fix}")
    if scheme in ("", "file") or scheme in MLFLOW_DATABASES:
        path = mlflow_store_path(uri)
        folder = path if scheme in ("", "file") or path is None else path.parent
        why = _writable_folder(folder.absolute()) if folder is not None else None
        if why:
            raise FinsftError(f"training.report_to mlflow: MLFLOW_TRACKING_URI={uri} cannot be written ({why}): set "
                              f"it to a folder you can write (file:///path/to/mlruns), {fix}")
        return None
    plugins: list[str] = []
    try:
        from importlib.metadata import entry_points

        plugins = [e.name for e in entry_points(group="mlflow.tracking_store")]
    except Exception:  # broken metadata: no plugin schemes
        plugins = []
    if scheme in MLFLOW_REMOTE_SCHEMES or scheme in plugins:
        return None
    allowed = ", ".join([*MLFLOW_REMOTE_SCHEMES, "file", *MLFLOW_DATABASES, *plugins])
    raise FinsftError(f"training.report_to mlflow: MLFLOW_TRACKING_URI={uri}: the scheme '{scheme}:' is not one MLflow "
                      f"knows; allowed: {allowed} (a plain path is a file store), {fix}")


def check_tensorboard_destination(environ: Any = None) -> None:
    """TENSORBOARD_LOGGING_DIR, when set, is a folder that can be written (else the run folder's runs/ is used)."""
    env = os.environ if environ is None else environ
    where = (env.get("TENSORBOARD_LOGGING_DIR") or "").strip()
    if where:
        why = _writable_folder(Path(where).expanduser().absolute())
        if why:
            raise FinsftError(f"training.report_to tensorboard: TENSORBOARD_LOGGING_DIR={where} cannot be written "
                              f"({why}): set it to a folder you can write, or unset it (events then go to the run "
                              "folder's runs/)")


def tracker_destination_problems(report_to: Any, log: Callable[[str], object] | None = None) -> list[str]:
    """Each installed tracker's destination, checked before the model loads: one problem per tracker; notes
    (finsft's default store) go to ``log``."""
    problems: list[str] = []
    if tracker_requested(report_to, "mlflow") and not missing_trackers(["mlflow"]):
        try:
            note = check_mlflow_destination()
            if note and log:
                log(note)
        except FinsftError as exc:
            problems.append(str(exc))
    if tracker_requested(report_to, "tensorboard") and not missing_trackers(["tensorboard"]):
        try:
            check_tensorboard_destination()
        except FinsftError as exc:
            problems.append(str(exc))
    return problems


def local_or_hub(ref: str | None) -> str | None:
    """A path given on the command line is relative to the current folder; anything else is a hub id."""
    if ref and os.path.exists(os.path.expanduser(ref)):
        return os.path.abspath(os.path.expanduser(ref))
    return ref


def _quiet_datasets() -> None:
    import datasets

    datasets.disable_progress_bars()


def preflight(recipe: Recipe, command: str, *, data: str | None = None, split: str | None = None,
              limit: int | None = None, suite: str | None = None, suite_data: str | None = None,
              adapter: str | None = None, extra: Sequence[Callable[[], object]] = ()) -> Checked:
    """The checks of ``command`` (train, eval, predict, merge) on ``recipe``; PreflightError listing every
    problem. ``data``/``split``/``limit``: finsft eval's --data, --split, --limit; ``suite``/``suite_data``:
    finsft eval --suite, --suite-data; ``adapter``: the --adapter folder of eval, predict and merge; ``extra``: the
    command's own light checks (e.g. merge's --out), reported with the others."""
    _quiet_datasets()
    checked = Checked()
    for check in extra:
        with checked.check():
            check()
    if adapter is not None:
        with checked.check():
            check_adapter(adapter)
    with checked.check():
        checked.template = resolve_data_format(recipe) or template_from_recipe(recipe.template)
    template = checked.template
    if command == "train" and recipe.data_format:  # the format TRL's rules chose, and its warning, before the data
        _log(f"data format: {recipe.data_format}", markup=False)
    if command == "train":
        with checked.check():
            check_trackers(recipe.training["report_to"])
        checked.problems += tracker_destination_problems(recipe.training["report_to"], _log)
        if recipe.output["push_to_hub"]:
            with checked.check():  # a missing token fails now, not after training
                check_can_push(default_repo_id(dict(recipe.output), recipe.name), "output.hub_model_id")
    if template is None:
        checked.raise_problems()
        return checked
    if command == "train":
        with checked.check():
            checked.exclude = evaluation_inputs(recipe, template, log=_log)
        with checked.check():
            checked.splits = build_splits(recipe, template, checked.exclude)
        if recipe.evaluation:
            _evaluation_sets(checked, recipe, template)
    elif command == "eval" and suite:
        _suite(checked, suite, suite_data)
    elif command == "eval":
        ref = local_or_hub(data)
        ev = recipe.evaluation_settings
        validation = None
        if not ref and not ev["path"]:
            with checked.check():  # the run's validation split: drawn after the leak guard, as training drew it
                checked.exclude = evaluation_inputs(recipe, template)
                checked.splits = build_splits(recipe, template, checked.exclude)
                validation = checked.splits.validation
        if ref or ev["path"] or validation is not None:
            with checked.check():
                checked.main_set = eval_set(recipe, template, validation, ref, split, limit)
    checked.raise_problems()
    return checked


def _log(text: str, markup: bool = True) -> None:
    """The preflight's notes (finsft.progress imports transformers): rich, quiet on every rank but the first."""
    from rich.console import Console

    rank = os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))
    Console(highlight=False, soft_wrap=True, quiet=rank not in ("", "0")).print(text, markup=markup)


def _evaluation_sets(checked: Checked, recipe: Recipe, template: Template) -> None:
    """The run's evaluation rows: evaluation.path or the validation split, and every set of evaluation.sets."""
    validation = checked.splits.validation if checked.splits is not None else None
    # plain-text (language-modelling) data has no prompt and answer to score: the run skips the task evaluation
    if not template.language_modeling and (recipe.evaluation_settings["path"] or validation is not None
                                           or checked.splits is not None):
        with checked.check():
            checked.main_set = eval_set(recipe, template, validation)
    for name, spec in (recipe.evaluation_settings.get("sets") or {}).items():
        with checked.check():
            t = set_template(spec, template)
            checked.sets.append((name, t, load_set(recipe, name, spec, t)))


def _suite(checked: Checked, suite: str, suite_data: str | None) -> None:
    """The suite's sets. From --suite-data, a file that is absent is reported as missing (a folder may hold some
    of the sets) and a file that is present but wrong is an error; from the hub, a set that cannot be loaded is
    missing."""
    if suite not in SUITES:
        checked.problems.append(f"unknown suite '{suite}'; available: {', '.join(SUITES)}")
        return
    folder = None
    if suite_data is not None:
        path = Path(suite_data).expanduser()
        try:  # the reading gate, for a folder
            check_readable(path, "--suite-data", folder=True)
        except UnreadableFile as exc:
            checked.problems.append(
                f"--suite-data '{suite_data}' {exc.reason}: name the folder that holds the suite's files "
                f"({', '.join(s.local_file + '.jsonl' for s in SETS)})")
            return
        folder = str(path.absolute())
    for s in SETS:
        if folder is not None and local_file(folder, s) is None:
            checked.suite_missing[s.name] = (f"no {s.local_file}.jsonl (or .json/.csv/.parquet) in {folder} (it "
                                             f"should hold {s.local_holds})")
            continue
        try:
            rows, where = load_suite_set(s, folder)
        except DataError as exc:
            if folder is not None:
                checked.problems.append(str(exc))
            else:
                checked.suite_missing[s.name] = str(exc)
            continue
        checked.suite_sets.append((s, rows, where))
    if not checked.suite_sets and not checked.problems:
        checked.problems.append(f"no set of suite '{suite}' could be loaded: " + "; ".join(
            f"{name}: {why}" for name, why in checked.suite_missing.items()))


def preflight_push(run: str, repo: str | None) -> tuple[Path, dict[str, Any], dict[str, Any], str]:
    """``finsft push``: the run folder is a finished run, the repository id is valid, the hub is switched on and
    there is a token; every problem at once. Returns (folder, recipe, manifest, repository id)."""
    checked = Checked()
    folder: Path | None = None
    recipe: dict[str, Any] = {}
    manifest: dict[str, Any] = {}
    with checked.check():
        folder = check_run_folder(run)
        recipe, manifest, _ = read_run(folder)
    output = recipe.get("output") or {}
    repo_id = repo or default_repo_id(output, str(manifest.get("recipe") or recipe.get("name")
                                                  or Path(run).expanduser().absolute().name))
    with checked.check():
        check_can_push(repo_id, "--repo" if repo else "output.hub_model_id")
    checked.raise_problems()
    assert folder is not None
    return folder, recipe, manifest, repo_id
