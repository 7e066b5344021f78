"""Signals: the first Ctrl-C or SIGTERM checkpoints and stops the run at the end of the current step (on every
rank at the same step); the run then exits with 128 + the signal number and the command that resumes it."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any

from finsft.errors import FinsftError


class RunInterrupted(FinsftError):
    """Training stopped on a signal after saving a checkpoint."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


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


def stop_callback(flags: dict[str, int], world_size: int) -> Any:
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


