"""Signals: every phase of a run answers the first Ctrl-C or SIGTERM with what was kept and the command that
continues (the run exits with 128 + the signal number).

- Training checkpoints and stops at the end of the current step (on every rank at the same step).
- Saving and finishing (short, and writing files) complete what they are writing, then stop before publishing.
- Setup, model loading and the evaluations stop at once: the handler raises :class:`PhaseInterrupted` (a
  BaseException, so that no library's ``except Exception`` turns it into another error).

For tests only: with ``FINSFT_TEST_SIGNAL_AT_PHASE=PHASE`` (or ``PHASE:SIGINT``; PHASE one of :data:`PHASES`'
keys) the run sends itself SIGTERM (or SIGINT) as that phase begins, through the operating system and the real
handler, so that a test can interrupt a phase that lasts a fraction of a second on a tiny model.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any

from finsft.errors import FinsftError

# The phases of a run, in order: the key (used by FINSFT_TEST_SIGNAL_AT_PHASE) and the words in messages.
PHASES = {"setup": "setup", "model": "model loading", "before": "the evaluation of the base model",
          "training": "training", "saving": "saving", "after": "the evaluation of the trained model",
          "finish": "finishing", "push": "the upload to the hub"}
TEST_SIGNAL_ENV = "FINSFT_TEST_SIGNAL_AT_PHASE"


class PhaseInterrupted(BaseException):
    """A signal stopped a phase; the run turns it into :class:`RunInterrupted` with its message."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def enter_phase(state: dict[str, int], key: str, *, immediate: bool) -> None:
    """Mark the phase ``key`` as running: a signal during an ``immediate`` phase raises PhaseInterrupted at once,
    during another one it is only recorded (see :func:`check_deferred`)."""
    state["phase"] = list(PHASES).index(key)
    state["immediate"] = int(immediate)
    spec = os.environ.get(TEST_SIGNAL_ENV, "")
    if spec and spec.split(":")[0] == key:
        os.kill(os.getpid(), getattr(signal, spec.split(":")[1]) if ":" in spec else signal.SIGTERM)


def check_deferred(state: dict[str, int]) -> None:
    """Raise PhaseInterrupted when a signal came during a phase that finished what it was writing first."""
    if state.get("signal"):
        raise PhaseInterrupted(state["signal"])


def phase_key(state: dict[str, int]) -> str:
    return list(PHASES)[state.get("phase", 0)]


class RunInterrupted(FinsftError):
    """Training stopped on a signal after saving a checkpoint."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


@contextmanager
def graceful_signals() -> Iterator[dict[str, int]]:
    """Turn the first SIGINT/SIGTERM into a request to stop: recorded (training checkpoints and stops at the end
    of the step), or raised as PhaseInterrupted while the state says the phase is ``immediate``. A second Ctrl-C
    aborts at once, unless it comes within a second of the first (a launcher forwarding the same Ctrl-C)."""
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
        if state.get("immediate"):
            raise PhaseInterrupted(signum)

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


