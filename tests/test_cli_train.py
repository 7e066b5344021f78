"""Training from the command line in real subprocesses: ``python -m finsft train``, the ``finsft RECIPE`` shorthand,
``accelerate launch -m finsft``; the output folder is never silently replaced; and the console stays readable when
stdout is not a terminal (compact progress lines, a summary table, no library progress bars or known-harmless
warnings)."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest

BIN = Path(sys.executable).parent
CLUTTER = ("Map", "Saving the dataset", "Loading weights", "Writing model shards", "Building labels",
           "Truncating train dataset", "FutureWarning", "gemm_4bit_forward", "it/s]", "examples/s]")


def finsft(*args: str, cwd: Path, launcher: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "120"}
    cmd = launcher or [sys.executable, "-m", "finsft"]
    return subprocess.run([*cmd, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_readable(proc: subprocess.CompletedProcess[str]) -> None:
    """Compact lines with the current step and loss, the plan and the summary tables, and no clutter."""
    assert re.search(r"^step 2/2\s+epoch [\d.]+\s+loss \d+\.\d{4}\s+lr ", proc.stdout, re.M), proc.stdout
    assert "finsft: tiny" in proc.stdout and "finsft: done" in proc.stdout
    assert re.search(r"│ train loss\s+│ \d+\.\d{4}", proc.stdout), proc.stdout
    assert "\x1b[" not in proc.stdout  # no terminal escape codes in logs
    both = proc.stdout + proc.stderr
    found = [c for c in CLUTTER if c in both]
    assert not found, f"library clutter {found} in:\n{both}"


@pytest.mark.slow
def test_train_refuse_and_overwrite(make_recipe: Any, tmp_path: Path) -> None:
    recipe = make_recipe(quantization={"load_in_4bit": True})  # QLoRA: bitsandbytes' CPU path is loaded too
    out = tmp_path / "recipe-out"

    first = finsft("train", str(recipe), cwd=tmp_path)
    assert first.returncode == 0, first.stdout + first.stderr
    assert_readable(first)
    assert (out / "adapter_model.safetensors").is_file()
    before = snapshot(out)

    # an existing non-empty output folder is refused, and left untouched
    again = finsft("train", str(recipe), cwd=tmp_path)
    assert again.returncode == 1
    assert f"output folder {out} holds an earlier run" in again.stderr
    assert "--overwrite" in again.stderr
    assert "Traceback" not in again.stderr
    assert snapshot(out) == before
    assert not out.with_name(out.name + ".partial").exists()

    # --overwrite replaces it (the shorthand `finsft RECIPE` trains)
    (out / "stale-file.txt").write_text("from an earlier run")
    replaced = finsft(str(recipe), "--overwrite", cwd=tmp_path, launcher=[str(BIN / "finsft")])
    assert replaced.returncode == 0, replaced.stdout + replaced.stderr
    assert not (out / "stale-file.txt").exists()
    assert (out / "adapter_model.safetensors").is_file()
    assert json.loads((out / "manifest.json").read_text())["train"]["global_step"] == 2
    assert not list(tmp_path.glob("recipe-out.*"))  # no .partial or .old-* left behind


def test_invalid_override_is_reported_without_training(make_recipe: Any, tmp_path: Path) -> None:
    proc = finsft("train", str(make_recipe()), "training.learning_rate=-1", cwd=tmp_path)
    assert proc.returncode == 1
    assert "learning_rate" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "recipe-out").exists()


@pytest.mark.slow
def test_accelerate_launch(make_recipe: Any, tmp_path: Path) -> None:
    recipe = make_recipe(training={"max_steps": 2})
    proc = finsft(str(recipe), cwd=tmp_path, launcher=[
        str(BIN / "accelerate"), "launch", "--num_processes", "1", "--mixed_precision", "no",
        "--dynamo_backend", "no", "-m", "finsft"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = tmp_path / "recipe-out"
    assert (out / "adapter_model.safetensors").is_file() and (out / "manifest.json").is_file()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["hardware"]["world_size"] == 1 and manifest["train"]["global_step"] == 2
    assert "step 2/2" in proc.stdout


def test_quiet_libraries_drops_only_the_known_harmless_messages(caplog: pytest.LogCaptureFixture) -> None:
    import datasets
    import transformers

    from finsft.quiet import quiet_libraries

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_libraries()
        quiet_libraries()  # idempotent
        warnings.warn("`gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning,
                      stacklevel=1)
        warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning,
                      stacklevel=1)
        warnings.warn("`foo` is deprecated and will be removed in v6.", FutureWarning, stacklevel=1)
        warnings.warn("something real", UserWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["`foo` is deprecated and will be removed in v6.", "something real"]

    bnb = logging.getLogger("bitsandbytes.backends.cpu.ops")
    assert len(bnb.filters) == 1
    with caplog.at_level(logging.WARNING, logger="bitsandbytes.backends.cpu.ops"):
        bnb.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please ...", "no kernels")
        bnb.warning("a real bitsandbytes problem")
    assert [r.getMessage() for r in caplog.records] == ["a real bitsandbytes problem"]

    assert datasets.utils.is_progress_bar_enabled() is False
    assert transformers.utils.logging.is_progress_bar_enabled() is False
