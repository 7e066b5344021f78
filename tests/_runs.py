"""Helpers shared by the resume, interrupt and distributed tests: run finsft in a real subprocess and read what a
run wrote."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

BIN = Path(sys.executable).parent


def subprocess_env() -> dict[str, str]:
    """The test's environment (offline hub, per-session FINSFT_CACHE) with one thread per process."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}


def start_finsft(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as f:
        return subprocess.Popen([sys.executable, "-m", "finsft", *args], stdout=f, stderr=subprocess.STDOUT,
                                env=subprocess_env())


def wait_for(condition: Callable[[], bool], proc: subprocess.Popen[bytes], timeout: float = 240.0) -> bool:
    """Poll every 10 ms until ``condition()`` holds; False if the process ended first."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return True
        if proc.poll() is not None:
            return condition()
        time.sleep(0.01)
    raise TimeoutError(f"condition not met within {timeout} s")


def metrics(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def loss_steps(run_dir: Path) -> list[int]:
    return [r["step"] for r in metrics(run_dir) if "loss" in r]


def adapter(run_dir: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "adapter_model.safetensors"))


def max_abs_diff(a: dict[str, Any], b: dict[str, Any]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)
