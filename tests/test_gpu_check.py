"""benchmarks/gpu_check.py's plumbing on CPU (--tiny): bench, plan, a real training run with an evaluation,
one table and PASS/FAIL per target. On a GPU machine the same script checks the real shapes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_gpu_check_tiny_runs_every_step_and_reports_targets(tmp_path: Path) -> None:
    out = tmp_path / "check.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--tiny", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["gemma"]["bench"]["recipe"]["tokens_per_s"] > 0
    assert data["gemma"]["plan"]["estimated_peak_gib"] > 0
    assert data["train"]["rc"] == 0 and data["train"]["evaluation_files"]
    assert "PASS" in proc.stdout and "training steps + evaluation" in proc.stdout
    assert not [t for t in data["targets"] if t["ok"] is False]
