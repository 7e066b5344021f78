"""Upload a finished run folder to a Hugging Face hub model repository (``output.push_to_hub``, ``finsft push``).

What goes up: the adapter (or fully fine-tuned model) and tokenizer at the top of the repository, the model card
(README.md), eval.json, recipe.json, manifest.json, loss.png, and ``merged/`` when the run saved a merged model
(load it with ``subfolder="merged"``). What stays: ``checkpoints/`` (resume state, often larger than the adapter),
``predictions.jsonl`` (rows of your evaluation data), finsft's marker file and ``mlruns/`` (finsft's default
MLflow store: its meta.yaml files hold this machine's absolute paths).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finsft.errors import FinsftError
from finsft.files import UnreadableFile, read_bytes
from finsft.publish.card import CARD, is_finsft_card, read_run, write_model_card

IGNORE = ["checkpoints/*", "predictions.jsonl", "*/predictions.jsonl", ".finsft", "*.tmp", "mlruns/*"]
_NAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9_.-]{0,94}[A-Za-z0-9])?$")


class PushError(FinsftError):
    """The run could not be uploaded; the message says why and what to do."""


@dataclass
class PushResult:
    repo_id: str
    url: str
    private: bool
    commit_url: str
    files: list[str] = field(default_factory=list)


def repo_name(name: str) -> str:
    """A hub repository name made from a recipe name (letters, digits, '-', '_', '.'; no '--' or '..')."""
    cleaned = re.sub(r"[^A-Za-z0-9_.-]+", "-", name)
    cleaned = re.sub(r"-{2,}", "-", re.sub(r"\.{2,}", ".", cleaned)).strip("-._")[:96].strip("-._")
    return cleaned or "finsft-model"


def check_repo_id(repo_id: str, what: str = "--repo") -> str:
    """``NAME`` or ``NAMESPACE/NAME`` as the hub allows them, else an error for people."""
    parts = repo_id.split("/")
    problem = None
    if not repo_id or len(parts) > 2 or not all(_NAME.match(p) for p in parts):
        problem = ("write NAME or NAMESPACE/NAME, each part 1-96 letters, digits, '-', '_' or '.', starting and "
                   "ending with a letter or digit")
    elif "--" in repo_id or ".." in repo_id:
        problem = "'--' and '..' are not allowed"
    elif parts[-1].endswith(".git"):
        problem = "the name may not end in .git"
    if problem:
        raise PushError(f"{what} '{repo_id}' is not a hub repository id: {problem} (e.g. my-model or "
                        "my-org/my-model)")
    return repo_id


def check_can_push(repo_id: str, what: str = "--repo") -> None:
    """Before anything is uploaded (or, for ``output.push_to_hub``, before training starts): the repository id is
    valid, the hub is not switched off, and there is a token."""
    from huggingface_hub import constants, get_token

    check_repo_id(repo_id, what)
    if constants.is_offline_mode():
        raise PushError("the hub is switched off on this machine (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE is set): "
                        "unset it to push, or push later from a machine that reaches the hub with: finsft push RUN "
                        f"--repo {repo_id}")
    if not get_token():
        raise PushError("not logged in to the Hugging Face hub: run `hf auth login` (or set HF_TOKEN to a token with "
                        "write access, from https://huggingface.co/settings/tokens)")


def check_run_folder(folder: str | Path) -> Path:
    """A finished finsft run: a folder with recipe.json and manifest.json (an unfinished one lives in
    ``<dir>.partial`` and has no manifest yet)."""
    path = Path(folder).expanduser().absolute()
    if not path.is_dir():
        partial = path.with_name(path.name + ".partial")
        hint = f" ({partial} holds an unfinished run: finish it with finsft train --resume)" if partial.is_dir() else ""
        raise PushError(f"run folder '{folder}' does not exist{hint}")
    missing = [n for n in ("recipe.json", "manifest.json") if not (path / n).is_file()]
    if missing:
        hint = (" (an unfinished run: finish it with finsft train --resume)" if path.name.endswith(".partial")
                else "")
        raise PushError(f"'{folder}' is not a finished finsft run: it has no {' or '.join(missing)}{hint}. Pass the "
                        "output.dir of a finished finsft train run")
    if not (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
        raise PushError(f"'{folder}' holds neither a LoRA adapter (adapter_config.json) nor a model (config.json)")
    return path


def _hub_error(exc: Exception, repo_id: str, endpoint: str, folder: Path) -> PushError:
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, OfflineModeIsEnabled

    again = f"push again with: finsft push {folder} --repo {repo_id}"
    if isinstance(exc, OfflineModeIsEnabled):
        return PushError(f"the hub is switched off on this machine (HF_HUB_OFFLINE): {again} where it is reachable")
    if isinstance(exc, HFValidationError):
        return PushError(f"'{repo_id}' is not a hub repository id: {exc}")
    if isinstance(exc, HfHubHTTPError):
        status = exc.response.status_code if exc.response is not None else None
        server = (exc.server_message or str(exc)).strip().splitlines()[0]
        if status == 401:
            return PushError(f"the hub at {endpoint} refused your token (401: {server}): log in again with `hf auth "
                             f"login` or set HF_TOKEN to a valid token; then {again}")
        if status == 403:
            return PushError(f"your token may not write to '{repo_id}' (403: {server}): use a token with write access "
                             f"to that namespace, or another --repo; then {again}")
        return PushError(f"the hub at {endpoint} answered {status}: {server}; {again}")
    return PushError(f"cannot reach the hub at {endpoint} ({type(exc).__name__}: {exc}): check the network, a proxy "
                     f"or HF_ENDPOINT; the run is kept in {folder}; {again}")


def push_run(folder: str | Path, repo_id: str, *, private: bool = True,
             log: Callable[[str], Any] = print) -> PushResult:
    """Create the repository (``private`` unless told otherwise; an existing one keeps its visibility) and upload
    the run folder to it with ``HfApi.upload_folder``. The model cards name the repository."""
    from huggingface_hub import HfApi, constants

    path = check_run_folder(folder)
    check_can_push(repo_id)
    recipe, manifest, report = read_run(path)
    api = HfApi()
    endpoint = api.endpoint or constants.ENDPOINT
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        full_id = url.repo_id
        for card_folder in (path, path / "merged"):
            if (card_folder / "config.json").is_file() or (card_folder / "adapter_config.json").is_file():
                if replaceable_card(card_folder / CARD):
                    write_model_card(card_folder, manifest, recipe, report, repo_id=full_id)
                else:
                    log(f"keeping {card_folder / CARD}: it was not written by finsft")
        files = sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file() and not _ignored(p, path))
        log(f"uploading {len(files)} files of {path} to {endpoint}/{full_id} ({'private' if private else 'public'} "
            "if new)")
        commit = api.upload_folder(folder_path=str(path), repo_id=full_id, repo_type="model",
                                   ignore_patterns=list(IGNORE),
                                   commit_message=f"finsft: {manifest.get('recipe') or recipe.get('name')}")
    except PushError:
        raise
    except (OSError, ValueError, RuntimeError) as exc:
        raise _hub_error(exc, repo_id, endpoint, path) from exc
    except Exception as exc:  # transport errors of the HTTP client (httpx, or the httpx2 it may ship) are not OSErrors
        if any(c.__module__.startswith(("httpx", "httpcore", "huggingface_hub", "requests", "urllib3"))
               for c in type(exc).__mro__):
            raise _hub_error(exc, repo_id, endpoint, path) from exc
        raise
    return PushResult(full_id, str(url), private, str(commit.commit_url), files)


def _ignored(p: Path, root: Path) -> bool:
    from fnmatch import fnmatch

    rel = p.relative_to(root).as_posix()
    return any(fnmatch(rel, pattern) for pattern in IGNORE) or rel.startswith(".git/")


def replaceable_card(path: Path) -> bool:
    """No README.md yet, finsft's card, or the empty template PEFT writes: finsft (re)writes it. A card someone
    wrote is kept."""
    if not path.exists() or is_finsft_card(path):
        return True
    try:
        return "[More Information Needed]" in read_bytes(path, "model card").decode("utf-8", errors="replace")
    except UnreadableFile:
        return False


def default_repo_id(output: dict[str, Any], recipe_name: str) -> str:
    """output.hub_model_id, else the recipe's name (under the account of the token)."""
    return str(output.get("hub_model_id") or repo_name(recipe_name))
