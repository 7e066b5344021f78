"""``finsft push RUN``: upload a finished run folder to the Hugging Face hub. No recipe is needed: the run folder
holds recipe.json (the resolved recipe) and manifest.json. Imports neither torch nor transformers."""

from __future__ import annotations

from rich.console import Console

from finsft.files import run_lock
from finsft.preflight import preflight_push
from finsft.publish import PushResult, push_run


def push_command(run: str, *, repo: str | None = None, public: bool = False) -> PushResult:
    """Push ``run`` to ``repo`` (default: the run's output.hub_model_id, else its recipe name under your account),
    private unless ``public`` or the run's recipe says output.hub_private_repo=false."""
    con = Console(highlight=False, soft_wrap=True)  # not finsft.progress's: that imports transformers
    folder, recipe, _, repo_id = preflight_push(run, repo)  # run folder, repository id, hub, token
    output = recipe.get("output") or {}
    private = not public and bool(output.get("hub_private_repo", True))
    with run_lock(folder, "finsft push", "run folder"):  # no training (--overwrite) replaces it while it uploads
        result = push_run(folder, repo_id, private=private, log=con.print)
    con.print(f"pushed {len(result.files)} files to {result.url} ({'private' if result.private else 'public'} if "
              f"new; an existing repository keeps its visibility)\ncommit: {result.commit_url}")
    return result
