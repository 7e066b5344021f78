"""Failures that lose nothing: SIGTERM/Ctrl-C checkpoint and name the resume command, a crash leaves no
half-written output folder, CUDA out-of-memory is explained as concrete overrides, and a hub id that cannot be
reached offline says how to use a local path."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import pytest
from _runs import start_finsft, wait_for

import finsft.training.run as train_module
from finsft.cli import main as cli
from finsft.plan import Hardware, plan_run
from finsft.progress import ProgressCallback
from finsft.recipe import load_recipe
from finsft.training.advice import oom_message
from finsft.training.output import latest_checkpoint

# ------------------------------------------------------------------------------------------------- signals


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_saves_a_checkpoint_and_names_the_resume_command(make_recipe: Any, tmp_path: Path,
                                                                sig: signal.Signals) -> None:
    path = make_recipe(training={"max_steps": 100000, "save_steps": 100000})  # would run for hours
    out = tmp_path / "recipe-out"
    work = out.with_name(out.name + ".partial")
    metrics = work / "metrics.jsonl"
    proc = start_finsft([str(path), "--overwrite", "training.learning_rate=0.002"], tmp_path / "run.log")
    try:
        assert wait_for(lambda: metrics.exists() and metrics.stat().st_size > 0, proc), "training never started"
        proc.send_signal(sig)
        proc.wait(120)
    finally:
        if proc.poll() is None:
            proc.kill()
    log = (tmp_path / "run.log").read_text()
    assert proc.returncode == 128 + sig, log
    assert not out.exists() and work.is_dir()
    ckpt = latest_checkpoint(work)
    assert ckpt is not None, log
    step = json.loads((Path(ckpt) / "trainer_state.json").read_text())["global_step"]
    assert 1 <= step < 100000
    assert (Path(ckpt) / "adapter_model.safetensors").is_file() and (Path(ckpt) / "optimizer.pt").is_file()
    assert f"{sig.name}: stopped at step {step}/100000 and saved {ckpt}" in log
    # the exact command: same recipe and overrides, --resume instead of --overwrite
    assert f"Resume with:\n  finsft train {path} training.learning_rate=0.002 --resume\n" in log
    assert "Traceback" not in log


# -------------------------------------------------------------------------------------------------- crashes


def _failing_progress(exc: BaseException, at_step: int) -> type[ProgressCallback]:
    class Failing(ProgressCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            super().on_step_end(args, state, control, **kw)
            if state.global_step == at_step:
                raise exc

    return Failing


@pytest.mark.slow
def test_a_crash_mid_training_leaves_no_half_written_output(make_recipe: Any, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    path = make_recipe(training={"max_steps": 4, "save_steps": 1})
    assert cli([str(path)]) == 0
    out = tmp_path / "recipe-out"
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    capsys.readouterr()

    monkeypatch.setattr(train_module, "ProgressCallback", _failing_progress(RuntimeError("broken batch"), 3))
    with pytest.raises(RuntimeError, match="broken batch"):
        cli([str(path), "--overwrite", "training.learning_rate=0.01"])
    # the earlier output is untouched; the failed run is kept aside with its checkpoints
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    work = out.with_name(out.name + ".partial")
    assert latest_checkpoint(work) == str(work / "checkpoints" / "checkpoint-2")
    assert not list(tmp_path.glob("recipe-out.old-*"))
    printed = " ".join(capsys.readouterr().out.split())
    assert "training failed at step 3" in printed and str(work) in printed
    assert "training.learning_rate=0.01 --resume" in printed


@pytest.mark.slow
def test_cuda_out_of_memory_is_explained(make_recipe: Any, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    path = make_recipe(training={"max_steps": 3, "per_device_train_batch_size": 4})
    oom = torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(train_module, "ProgressCallback", _failing_progress(oom, 1))
    assert cli([str(path)]) == 1
    err = capsys.readouterr().err
    assert "CUDA ran out of memory during training" in err
    assert "training.per_device_train_batch_size=2 training.gradient_accumulation_steps=2" in err
    assert "Traceback" not in err


# ------------------------------------------------------------------------------------------ out of memory


GPU = Hardware(device="cuda", name="NVIDIA H100 80GB HBM3", bf16=True, tf32=True, memory_bytes=80 * 2**30,
               flash_attn=False, liger=False, world_size=2)


def test_oom_message_gives_concrete_overrides(make_recipe: Any) -> None:
    recipe = load_recipe(str(make_recipe(training={"per_device_train_batch_size": 8, "gradient_accumulation_steps": 2,
                                                   "max_length": 1024, "packing": False,
                                                   "gradient_checkpointing": False})))
    text = oom_message(recipe, plan_run(recipe, GPU), "training", "finsft r.json --resume")
    assert text.startswith("CUDA ran out of memory during training (NVIDIA H100 80GB HBM3, 80 GiB; "
                           "per-device batch 8, max_length 1024)")
    # effective batch 8 x 2 x 2 processes = 32 is kept
    assert "same effective batch (32): training.per_device_train_batch_size=4 training.gradient_accumulation_steps=4" \
        in text
    assert "training.gradient_checkpointing=true" in text
    assert "training.packing=true" in text
    assert "quantization.load_in_4bit=true" in text
    assert "training.max_length=512" in text
    assert "--overwrite" in text and "finsft r.json --resume" in text


def test_oom_message_when_little_is_left_to_try(make_recipe: Any) -> None:
    recipe = load_recipe(str(make_recipe(
        training={"per_device_train_batch_size": 1, "max_length": 128, "packing": True,
                  "gradient_checkpointing": True},
        quantization={"load_in_4bit": True})))
    text = oom_message(recipe, plan_run(recipe, GPU), "evaluation of the trained model")
    assert "during evaluation of the trained model" in text
    assert "already 1" in text
    for absent in ("gradient_checkpointing=true", "packing=true", "load_in_4bit=true", "max_length=", "--overwrite"):
        assert absent not in text
    full = load_recipe(str(make_recipe(lora=None)))
    assert 'add a "lora" section and quantization.load_in_4bit=true' in oom_message(full, plan_run(full, GPU), "x")


# ------------------------------------------------------------------------------------------------ offline hub


def test_unreachable_hub_model_names_the_id_and_the_local_alternative(make_recipe: Any, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = make_recipe(model={"name_or_path": "finsft-test/does-not-exist"})
    assert cli([str(path)]) == 1
    err = " ".join(capsys.readouterr().err.split())
    assert "cannot load model 'finsft-test/does-not-exist'" in err
    assert "local Hugging Face cache" in err and "model.name_or_path to a local model folder" in err
    assert not (tmp_path / "recipe-out").exists()


def test_unreachable_hub_dataset_names_the_id_and_the_local_alternative(make_recipe: Any, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = make_recipe(data={"path": "finsft-test/does-not-exist"})
    assert cli([str(path)]) == 1
    err = " ".join(capsys.readouterr().err.split())
    assert "cannot load dataset 'finsft-test/does-not-exist'" in err
    assert "data.path to a local .jsonl/.csv/.parquet file" in err
    assert not (tmp_path / "recipe-out").exists()
