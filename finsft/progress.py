"""Console output: a rich live training display on terminals, compact periodic lines otherwise (CI logs), and
a JSONL metrics log. Only the main process prints and writes."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table
from transformers import TrainerCallback

from finsft.files import append_jsonl


def is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


def console() -> Console:
    # Non-main ranks print nothing.
    return Console(highlight=False, soft_wrap=True, quiet=not is_main_process())


def _fmt_time(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def gpu_memory() -> str | None:
    import torch

    if not torch.cuda.is_available():
        return None
    return f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB"


class ProgressCallback(TrainerCallback):
    """Shows step/total, epoch, loss, learning rate, grad norm, tokens/s, ETA (and GPU memory) while training,
    and appends every log record to ``metrics_path`` as JSONL."""

    def __init__(self, metrics_path: str | None, out: Console | None = None, live: bool | None = None,
                 line_every_s: float = 10.0):
        self.out = out or console()
        self.metrics_path = metrics_path
        self.live_enabled = (self.out.is_terminal if live is None else live) and is_main_process()
        self.line_every_s = line_every_s
        self.live: Live | None = None
        self.start = 0.0
        self.start_step = 0
        self.start_tokens = 0
        self.last_line = 0.0
        self.pending_line = False
        self.end: float | None = None
        self.last: dict[str, Any] = {}
        self.history: list[dict[str, Any]] = []

    # -- trainer events
    def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.start = time.perf_counter()
        self.end = None
        self.start_step = state.global_step
        self.start_tokens = int(getattr(state, "num_input_tokens_seen", 0) or 0)
        if self.live_enabled:
            self.live = Live(self._table(state), console=self.out, refresh_per_second=2, transient=False)
            self.live.start()

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        now = time.perf_counter()
        if self.live is not None:
            self.live.update(self._table(state))
        elif is_main_process() and (now - self.last_line >= self.line_every_s or state.global_step == state.max_steps):
            self.last_line = now
            if control.should_log:
                self.pending_line = True  # this step's loss is logged next: print the line with it (on_log)
            else:
                self.out.print(self._line(state))

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kw: Any) -> None:
        if not logs or not is_main_process():
            return
        record = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4),
                  "time_s": round(time.perf_counter() - self.start, 2), **logs}
        tps = self.tokens_per_s(state)
        if tps is not None and "loss" in logs:
            record["tokens_per_s"] = round(tps, 1)
        self.last.update({k: v for k, v in logs.items() if isinstance(v, (int, float))})
        self.history.append(record)
        if self.metrics_path:
            append_jsonl(Path(self.metrics_path), record)
        if self.pending_line and "loss" in logs:
            self.pending_line = False
            self.out.print(self._line(state))
        if "eval_loss" in logs:
            self.out.print(f"step {state.global_step}: eval_loss {logs['eval_loss']:.4f}")
        if "eval_weighted_f1" in logs:
            self.out.print(f"step {state.global_step}: task accuracy {logs['eval_accuracy']:.3f}, macro F1 "
                           f"{logs['eval_macro_f1']:.3f}, weighted F1 {logs['eval_weighted_f1']:.3f}")

    def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.end = time.perf_counter()  # the summary's tokens/s excludes saving and evaluation after training
        if self.live is not None:
            self.live.update(self._table(state))
            self.live.stop()
            self.live = None

    # -- rendering
    def tokens_per_s(self, state: Any) -> float | None:
        elapsed = (self.end or time.perf_counter()) - self.start
        tokens = int(getattr(state, "num_input_tokens_seen", 0) or 0) - self.start_tokens
        return tokens / elapsed if elapsed > 0 and tokens > 0 else None

    def _stats(self, state: Any) -> dict[str, str]:
        elapsed = time.perf_counter() - self.start
        done = state.global_step - self.start_step
        left = state.max_steps - state.global_step
        eta = elapsed / done * left if done else 0.0
        tps = self.tokens_per_s(state)
        stats = {
            "step": f"{state.global_step}/{state.max_steps}",
            "epoch": f"{state.epoch or 0:.2f}",
            "loss": f"{self.last['loss']:.4f}" if "loss" in self.last else "-",
            "lr": f"{self.last['learning_rate']:.2e}" if "learning_rate" in self.last else "-",
            "grad_norm": f"{self.last['grad_norm']:.3f}" if "grad_norm" in self.last else "-",
            "tokens/s": f"{tps:,.0f}" if tps else "-",
            "elapsed": _fmt_time(elapsed),
            "eta": _fmt_time(eta) if done else "-",
        }
        mem = gpu_memory()
        if mem:
            stats["gpu mem"] = mem
        return stats

    def _table(self, state: Any) -> Table:
        stats = self._stats(state)
        table = Table(title="training", show_header=True, header_style="bold")
        for k in stats:
            table.add_column(k, justify="right")
        table.add_row(*stats.values())
        return table

    def _line(self, state: Any) -> str:
        return "  ".join(f"{k} {v}" for k, v in self._stats(state).items())


def summary_table(title: str, rows: Iterable[tuple[str, Any]]) -> Table:
    table = Table(title=title, show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value", overflow="fold")
    for k, v in rows:
        table.add_row(k, str(v))
    return table


def stdout_is_terminal() -> bool:
    return sys.stdout.isatty()
