"""benchmarks/gpu_check.py, the one GPU-machine command, on CPU (--tiny): the preflight, the stages and their JSON
rewritten after every stage, the deadline, process groups killed whole, and a check killed mid-way that keeps the
evidence of the stages it finished."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def gpu_check() -> Any:
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def gone(pgid: int) -> bool:
    """No live process left in the group (zombies of reparented grandchildren do not count)."""
    return not gpu_check().group_alive(pgid)


def test_stages_are_written_after_each_one_and_the_deadline_skips_what_cannot_fit(tmp_path: Path) -> None:
    gc = gpu_check()
    out = tmp_path / "check.json"
    check = gc.Check(out, deadline=30.0, tiny=True)
    assert json.loads(out.read_text())["stages"] == []
    check.stage("first", 1, lambda budget: ("PASS", {"summary": f"{budget:.0f} s budget"}))
    assert [s["name"] for s in json.loads(out.read_text())["stages"]] == ["first"]
    check.stage("too long", 3600, lambda budget: ("PASS", {}))
    check.stage("needs first", 1, lambda budget: ("PASS", {}), requires=("too long",))
    check.stage("broken", 1, lambda budget: 1 / 0)
    stages = json.loads(out.read_text())["stages"]
    assert [s["status"] for s in stages] == ["PASS", "SKIP", "SKIP", "FAIL"]
    assert "needs about 3600 s" in stages[1]["details"]["reason"]
    assert "too long" in stages[2]["details"]["reason"]
    assert "ZeroDivisionError" in stages[3]["details"]["error"]
    assert stages[1]["details"]["deadline"] and "deadline" not in stages[2]["details"]
    assert check.finish() == 1
    data = json.loads(out.read_text())
    assert data["finished"] and data["result"] == "FAIL" and data["skipped_by_deadline"] == ["too long"]
    assert not list(tmp_path.glob(".*tmp"))  # atomic writes leave no temporary file


def test_a_command_past_its_timeout_is_killed_with_its_whole_process_group(tmp_path: Path) -> None:
    gc = gpu_check()
    pid_file = tmp_path / "grandchild.pid"
    code = ("import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; "
            f"time.sleep(120)']); open({str(pid_file)!r}, 'w').write(str(p.pid)); time.sleep(120)")
    t0 = time.monotonic()
    r = gc.run([sys.executable, "-c", code], timeout=3, cap=60)  # 3 s left of the deadline, 60 s of its own
    assert r["timed_out"] and r["deadline_cut"] and r["rc"] == 124 and time.monotonic() - t0 < 30
    grandchild = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(grandchild, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail("the grandchild outlived the timeout")


@pytest.mark.slow
def test_gpu_check_tiny_passes_every_stage(tmp_path: Path) -> None:
    out = tmp_path / "check.json"
    # 2 pairs here to keep the test's time modest (a CPU process costs ~20-45 s); the GPU check runs 3
    proc = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--deadline", "540", "--repeats", "2", "--out",
                           str(out), "--work", str(tmp_path / "work")], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env=env())
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    data = json.loads(out.read_text())
    stages = {s["name"]: s for s in data["stages"]}
    status = {name: s["status"] for name, s in stages.items()}
    assert data["finished"] and data["result"] == "PASS" and not data["skipped_by_deadline"]
    assert status["preflight"] == status["gemma: prepare"] == status["gemma: finsft vs expert"] == "PASS"
    assert status["gemma: optimizer choice"] == status["gemma: train + evaluate"] == "PASS"
    # the CPU plan keeps SDPA (FlexAttention has no backward there): no attention choice to time; no Triton
    # kernels to warm up either (on the GPU that stage runs before anything is timed)
    for skipped in ("gemma: warm-up", "gemma: memory vs plan", "gemma: attention choice",
                    "gemma: FSDP-QLoRA checkpoint"):
        assert status[skipped] == "SKIP" and stages[skipped]["details"]["reason"]
    names = [s["name"] for s in data["stages"]]
    assert names.index("gemma: warm-up") < names.index("gemma: finsft vs expert")
    pre = stages["preflight"]["details"]
    assert not pre["missing"] and {"trl", "peft", "bitsandbytes", "datasets", "rouge-score"} <= set(pre["versions"])
    prep = stages["gemma: prepare"]["details"]
    assert prep["tokenizer_tokens"] >= 100 and prep["estimated_peak_gib"] > 0
    cmp = stages["gemma: finsft vs expert"]["details"]
    assert [r["order"] for r in cmp["repeats"]] == [["finsft", "expert"], ["expert", "finsft"]]
    assert len(cmp["finsft_over_expert"]) == 2 and cmp["median_finsft_over_expert"] > 0
    assert cmp["median_finsft_tokens_per_s"] > 0 and cmp["mfu_finsft"] is None  # no GPU peak to divide by
    # the optimizer stage swaps finsft's choice (fused AdamW, also on the CPU) into the expert's script
    opt = stages["gemma: optimizer choice"]["details"]
    assert (opt["finsft"], opt["expert"]) == ("adamw_torch_fused", "adamw_torch") and opt["ratio"] > 0
    # the same rows in the same order: both sides log the same first loss
    first = {side: cmp["repeats"][0][side]["losses"][0] for side in ("finsft", "expert")}
    assert first["finsft"] == pytest.approx(first["expert"], rel=1e-3)
    train = stages["gemma: train + evaluate"]["details"]
    assert train["last_third_loss"] < train["first_third_loss"]
    assert train["eval_metrics"]["n"] > 0 and set(train["eval_metrics"]) == {"n", "rougeL", "token_f1"}
    assert "PASS" in proc.stdout and "stage" in proc.stdout


@pytest.mark.slow
def test_a_check_killed_mid_way_keeps_the_finished_stages(tmp_path: Path) -> None:
    out = tmp_path / "check.json"
    proc = subprocess.Popen([sys.executable, str(SCRIPT), "--tiny", "--models", "gemma", "--out", str(out),
                             "--work", str(tmp_path / "work")], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=env(), start_new_session=True)
    running: dict[str, Any] = {}
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:  # until a stage after the preflight runs
            try:
                data = json.loads(out.read_text())
            except (OSError, ValueError):
                data = {}
            running = data.get("running") or {}
            if data.get("stages") and running.get("stage") not in (None, "preflight"):
                break
            time.sleep(0.3)
        assert running, "no stage after the preflight started"
        os.killpg(proc.pid, signal.SIGTERM)  # the check's own process group, as a launcher's timeout does
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    data = json.loads(out.read_text())
    assert not data["finished"] and data["result"] == "INCOMPLETE"
    assert data["stages"][0]["name"] == "preflight" and data["stages"][0]["status"] == "PASS"
    assert data["stages"][-1]["name"] == running["stage"] and data["stages"][-1]["status"] == "FAIL"
    assert "stopped" in data["stages"][-1]["details"]["error"]
    deadline = time.monotonic() + 15
    while not gone(running["pid"]) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert gone(running["pid"]), "the stage's process group outlived the check"


def test_mfu_counts_4n_flops_per_token_over_the_bf16_peak() -> None:
    gc = gpu_check()
    # Gemma-2B (2.5e9 parameters) at 15,009 tokens/s on an H100 SXM: 4 x 2.5e9 x 15,009 / 989e12 = 15%
    assert gc.mfu(15009, 2_506_172_416, "NVIDIA H100 80GB HBM3") == pytest.approx(0.152, abs=0.001)
    assert gc.peak_tflops("NVIDIA H100 PCIe") == 756.0 and gc.peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert gc.mfu(15009, 2_506_172_416, None) is None and gc.mfu(15009, None, "NVIDIA A100") is None


def test_the_expert_keeps_its_own_choices_unless_a_stage_swaps_one(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import argparse

    gc = gpu_check()
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps({"extends": "recipes/gemma_qlora.json", "training": {}}))
    prep = {"recipe": str(recipe), "model_dir": "m", "timed_rows": "rows.jsonl", "random_weights": False,
            "settings": {"precision": "bf16", "attn_implementation": "flex_attention", "optim": "adamw_torch_fused",
                         "packing": True, "group_by_length": False, "gradient_checkpointing": False,
                         "use_liger_kernel": True}}
    args = argparse.Namespace(steps=10, warmup=3, logging_steps=5, tiny=False)

    def flag(cmd: list[str], name: str) -> str:
        return cmd[cmd.index(name) + 1]

    own = gc.expert_cmd(prep, args, quantized=True)
    assert (flag(own, "--attn"), flag(own, "--optim")) == ("sdpa", "paged_adamw_8bit")
    assert "--packing" in own and "--liger" in own and "--gradient-checkpointing" not in own
    swapped = gc.expert_cmd(prep, args, quantized=True, attn="flex_attention")
    assert (flag(swapped, "--attn"), flag(swapped, "--optim")) == ("flex_attention", "paged_adamw_8bit")
    # the hand-written script runs without an allocator setting, whatever the check inherited
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    assert not set(gc.ALLOCATOR_VARIABLES) & set(gc.expert_env())


def test_the_preflight_names_what_is_missing_with_the_pip_line(monkeypatch: pytest.MonkeyPatch) -> None:
    gc = gpu_check()
    monkeypatch.setitem(sys.modules, "trl", None)  # import trl -> ImportError, as on a machine without it
    info = gc.worker_preflight(tiny=True)
    assert "trl" in info["missing"] and "SFTTrainer" in info["missing"]["trl"]
    assert "pip download" in info["pip"] and " trl" in info["pip"]
    assert "transformers" in info["versions"] and "trl" not in info["versions"]
