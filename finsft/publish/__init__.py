"""Stage 5 of a run: publishing. The model card of every output folder (``card``) and the upload of a finished run
folder to the Hugging Face hub (``hub``). Imports the recipe and errors only; ``finsft.training`` and
``finsft.commands`` import it."""

from finsft.publish.card import is_finsft_card, prompt_example, read_run, write_model_card
from finsft.publish.hub import (
    PushError,
    PushResult,
    check_can_push,
    check_repo_id,
    check_run_folder,
    default_repo_id,
    push_run,
    repo_name,
)

__all__ = ["PushError", "PushResult", "check_can_push", "check_repo_id", "check_run_folder", "default_repo_id",
           "is_finsft_card", "prompt_example", "push_run", "read_run", "repo_name", "write_model_card"]
