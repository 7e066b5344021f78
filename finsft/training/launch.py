"""How the run was launched (accelerate launch, torchrun, plain python): world size checks, collectives for the
main process's verdicts, and the command that resumes an interrupted run."""

from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import Any

from finsft.errors import FinsftError
from finsft.recipe import Recipe

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


def broadcast(value: Any, num_processes: int) -> Any:
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


