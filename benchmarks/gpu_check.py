"""One command for one GPU machine (the device call that must not waste its first contact): is finsft GPU-ready?

Stages, in order of what they prove (each in its own process group, killed whole on timeout; a stage that cannot
fit in what is left of ``--deadline`` is skipped with the reason; the JSON at ``--out`` is rewritten atomically after
every stage, so a check killed at any point leaves the evidence of the stages it finished):

1. preflight: imports every package the check and finsft's training and evaluation need, prints their versions,
   the GPU, its CUDA capability and free memory; fails in seconds with what is missing and the pip line.
2. gemma: prepare: a random-weight model of Gemma-2B's real shape (``--tiny``: a 2-layer Gemma) with a trained
   byte-level BPE tokenizer, FiQA-shaped synthetic rows, the rows ``finsft bench`` times (exported for the
   expert), the settings finsft's plan chooses on this machine and ``finsft plan``'s memory estimate (its JSON).
3. gemma: warm-up: one untimed ``finsft bench`` process, so that Triton kernels (FlexAttention's, Liger's) are
   compiled into the on-disk caches before anything is timed (a cold first process ran 2.8x slower).
4. gemma: finsft vs expert: ``finsft bench`` and the hand-written TRL script (benchmarks/trl_handwritten.py: the
   anchor's QLoRA loading and its own choices: SDPA, paged 8-bit AdamW, no allocator setting; packing,
   checkpointing, Liger, precision, batch and max_length as finsft's plan) on the same rows, ``--repeats`` (3)
   pairs in alternating order, the median of same-pair ratios; MFU of both (4N FLOPs per token over the GPU's
   bf16 peak); every logged loss finite.
5. gemma: memory: the CUDA max allocated and max reserved peaks next to the plan's estimate (and the expert's).
6. gemma: attention choice / optimizer choice: the hand-written script with finsft's attention (FlexAttention or
   flash-attn) or finsft's optimizer swapped in, against its own runs of stage 4: a choice passes where it pays.
   The attention stage first checks packed FlexAttention gradients against each example alone (the CPU cannot).
7. mistral (``--models mistral``, a call of its own): prepare / warm-up / finsft vs expert / memory / choices for
   Mistral-7B bf16 LoRA (GPU only).
8. gemma: train + evaluate: ``finsft train`` for --train-steps steps, then its evaluation: the training loss falls
   and eval.json parses with the expected metric keys.
9. gemma: FSDP-QLoRA: one process under recipes/accelerate/fsdp.yaml that saves a checkpoint (GPU only).

Targets (GPU): finsft / expert >= 1.25x tokens/s (issue 23), each swapped choice >= 1.0x, finsft's recipe /
notebook baseline >= 1.5x (first pair), the plan's estimate within +-15% of the allocated peak and the reserved
peak at most 15% above the estimate. Exit code 1 when a stage FAILs (an expert crash included), 2 (PARTIAL) when
none failed but the deadline skipped a stage. The offline variables are set for every stage (no hub retries).

usage: python benchmarks/gpu_check.py [--deadline 500] [--out gpu_check.json] [--steps 10] [--repeats 3]
       python benchmarks/gpu_check.py --models mistral    # the second model, in a call of its own
       python benchmarks/gpu_check.py --tiny --deadline 540    # CPU: the same stages on a tiny Gemma
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
TARGET = 1.25  # finsft / hand-written TRL script, tokens/s (median of the alternating pairs): issue 23's target
# The check fits one device call of at most 9 minutes: the wheels install (~30 s) plus this deadline.
DEFAULT_DEADLINE = 500.0
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_HUB_DISABLE_TELEMETRY": "1", "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
SEEDS = {"gemma": ("recipes/gemma_qlora.json", "google--gemma-2b.json", "qa"),
         "mistral": ("recipes/mistral_lora.json", "mistralai--Mistral-7B-v0.1.json", "sentiment")}
# (import name, distribution, why) -- the check fails without these
REQUIRED = (("torch", "torch", "training"), ("transformers", "transformers", "models"),
            ("trl", "trl", "SFTTrainer"), ("peft", "peft", "LoRA"), ("bitsandbytes", "bitsandbytes", "QLoRA"),
            ("datasets", "datasets", "data"), ("accelerate", "accelerate", "launch, FSDP"),
            ("tokenizers", "tokenizers", "tokenizers"), ("safetensors", "safetensors", "weights"),
            ("jsonschema", "jsonschema", "recipes"), ("rich", "rich", "display"),
            ("huggingface_hub", "huggingface_hub", "model cards"), ("filelock", "filelock", "run lock"),
            ("numpy", "numpy", "data"), ("pyarrow", "pyarrow", "data"),
            ("rouge_score.rouge_scorer", "rouge-score", "ROUGE-L of the QA evaluation"))
# reported, never fatal: finsft checks them at setup (metrics) or skips their output with a note (plots)
OPTIONAL = (("sklearn", "scikit-learn", "classification metrics (not used by this check)"),
            ("matplotlib", "matplotlib", "loss.png / confusion.png (skipped with a note when missing)"),
            ("gguf", "gguf", "GGUF model files"),
            ("liger_kernel", "liger-kernel", "Liger kernels (finsft and the expert use them when installed)"),
            ("triton", "triton", "FlexAttention's kernels (finsft's attention for packed rows without flash-attn)"),
            ("flash_attn", "flash-attn", "variable-length attention (finsft's first choice for packed rows)"))
# imports that load the code paths the stages run (a version mismatch shows here, in seconds)
ENTRY_POINTS = ("from trl import SFTConfig, SFTTrainer", "from peft import LoraConfig, get_peft_model",
                "from transformers import BitsAndBytesConfig, AutoModelForCausalLM",
                "import finsft.cli, finsft.bench, finsft.training.run, finsft.evaluation.scorers")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------- processes


class Killed(Exception):
    """The check itself was told to stop (SIGTERM/SIGINT)."""


def _die_with_parent() -> None:  # runs in the child between fork and exec
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: SIGTERM if we are killed


def group_alive(pgid: int) -> bool:
    """Whether a live (not zombie) process is left in process group ``pgid``."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    proc = Path("/proc")
    if not proc.is_dir():
        return True
    for stat in proc.glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (comm)": state ppid pgrp ...
            if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
                return True
    return False


def kill_group(proc: subprocess.Popen[str], grace: float = 5.0) -> None:
    """SIGTERM the process group (finsft bench's workers and accelerate's ranks included), SIGKILL what is left."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 2.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        end = time.monotonic() + wait
        while time.monotonic() < end:
            proc.poll()  # reap our own child, so that it does not count as alive
            if not group_alive(proc.pid):
                return
            time.sleep(0.2)


RUNNING: Callable[[dict[str, Any] | None], None] | None = None  # records the command in flight (its process group)


def run(cmd: list[str], timeout: float, log_path: Path | None = None, cap: float | None = None,
        env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``cmd`` in its own session (process group) for at most ``min(timeout, cap)`` seconds (``timeout``: what
    the deadline leaves; ``cap``: the command's own limit); on timeout or when the check is stopped, the whole group
    is killed. Returns rc, stdout, the end of stderr, seconds, timed_out and deadline_cut (the deadline, not the
    command's own limit, stopped it)."""
    deadline_cut = cap is not None and timeout < cap
    timeout = timeout if cap is None else min(timeout, cap)
    log("$ " + " ".join(cmd) + f"   (timeout {timeout:.0f} s)")
    t0 = time.monotonic()
    timed_out = False
    with tempfile.TemporaryFile(mode="w+", encoding="utf-8", errors="replace") as err_file:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=err_file, text=True, env=env,
                                start_new_session=True, preexec_fn=_die_with_parent)
        if RUNNING is not None:
            RUNNING({"pid": proc.pid, "command": cmd, "timeout_s": round(timeout)})
        try:
            out, _ = proc.communicate(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            timed_out = True
            kill_group(proc)
            out, _ = proc.communicate()
        except BaseException:
            kill_group(proc)
            proc.wait()
            raise
        finally:
            if RUNNING is not None:
                RUNNING(None)
        err_file.seek(0)
        err = err_file.read()
    if log_path is not None:
        log_path.write_text(f"$ {' '.join(cmd)}\n--- stdout\n{out}\n--- stderr\n{err}", encoding="utf-8")
    rc = 124 if timed_out else proc.returncode
    if rc:
        log(err[-3000:])
    return {"rc": rc, "stdout": out, "stderr_tail": err[-2500:], "seconds": round(time.monotonic() - t0, 1),
            "timed_out": timed_out, "deadline_cut": timed_out and deadline_cut}


def last_line(text: str) -> str:
    lines = [x for x in text.strip().splitlines() if x.strip()]
    return lines[-1] if lines else ""


def result_line(text: str) -> dict[str, Any] | None:
    line = next((x for x in reversed(text.splitlines()) if x.startswith("RESULT ")), None)
    return None if line is None else json.loads(line[len("RESULT "):])


def worker_cmd(worker: str, **kw: Any) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--worker", worker, json.dumps(kw)]


def finsft_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "finsft", *args]


# ------------------------------------------------------------------------------------------ the JSON record


def is_check_record(path: Path) -> bool:
    """``path`` is a JSON record this check wrote (so --out may replace it): a JSON object with the record's own
    keys. Anything else (notes.md, a data file, another tool's JSON) is the user's and is never replaced."""
    try:
        with open(path, "rb") as f:  # a regular file (the gate checked it): at most 16 MiB of it
            record = json.loads(f.read(16 * 2**20).decode("utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and {"tiny", "deadline_s", "finished", "started_utc", "stages"} <= record.keys()


def check_out(out: Path) -> str | None:
    """Why --out cannot take the record (None: it can), before any stage runs."""
    if out.is_symlink():
        return f"--out {out} is a symbolic link; name the file itself or a new one"
    if out.exists():
        if out.is_dir():
            return f"--out {out} is a folder; name a file in it, e.g. --out {out / 'gpu_check.json'}"
        if not out.is_file():
            return f"--out {out} is not a regular file (a device or a FIFO?); name a new .json file"
        if not is_check_record(out):
            return (f"--out {out} already exists and is not a record of this check; it is never replaced: name a "
                    "new file, e.g. --out gpu_check.json")
    probe = out.parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        return f"--out {out}: {probe} is a file, so the record cannot be written under it"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"--out {out}: {probe} is not writable for you; name a file in a folder you can write to"
    return None


def positive_seconds(text: str) -> float:
    """--deadline: a positive, finite number of seconds (nan, inf, 0 and negatives are usage errors)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number of seconds, e.g. --deadline 540") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text}: give the check's time as a positive number of seconds, e.g. "
                                         "--deadline 540")
    return value


class Check:
    """The stages, the deadline and the JSON record, rewritten after every stage."""

    def __init__(self, out: Path, deadline: float, tiny: bool) -> None:
        self.out, self.deadline, self.tiny = out, deadline, tiny
        self.t0 = time.monotonic()
        self.current: str | None = None
        self.record: dict[str, Any] = {"tiny": tiny, "deadline_s": deadline, "finished": False,
                                       "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                       "offline": {k: v for k, v in OFFLINE.items() if k.endswith("OFFLINE")},
                                       "stages": []}
        self.results: dict[str, dict[str, Any]] = {}
        self.write()

    def running(self, command: dict[str, Any] | None) -> None:
        """The command in flight (pid = its process group), so that a killed check shows what it was doing."""
        if command is None:
            self.record.pop("running", None)
        else:
            self.record["running"] = {**command, "stage": self.current, "since_s": round(time.monotonic() - self.t0, 1)}
        self.write()

    def left(self) -> float:
        # kept back: the kill of a command that runs to its timeout (7 s) and the last write (3 s)
        return self.deadline - (time.monotonic() - self.t0) - 10.0

    def write(self) -> None:
        """The record through finsft's writing gate: whole or not at all (a reader, or a kill, never sees half a
        file), never over a file this check did not write, a full disk or a read-only folder as one message."""
        from finsft.files import write_errors, write_json

        self.record["elapsed_s"] = round(time.monotonic() - self.t0, 1)
        kept, then = "the stages run so far are in the console log", "run the check again"
        with write_errors(self.out.parent, kept, then):
            self.out.parent.mkdir(parents=True, exist_ok=True)
        write_json(self.out, self.record, replace=is_check_record, kept=kept, then=then)

    def stage(self, name: str, need: float, fn: Callable[[float], tuple[str, dict[str, Any]]],
              requires: tuple[str, ...] = (), skip: str | None = None) -> str:
        """Run ``fn(budget_seconds) -> (status, details)`` unless ``skip`` says why not, a stage it requires did not
        pass, or fewer than ``need`` seconds are left."""
        t = time.monotonic()
        left = self.left()
        by_deadline = False
        failed = [r for r in requires if self.results.get(r, {}).get("status") != "PASS"]
        if skip is None and failed:
            skip = f"needs {', '.join(failed)}, which did not pass"
        if skip is None and left < need:
            skip = f"needs about {need:.0f} s and {max(0.0, left):.0f} s of the {self.deadline:.0f} s deadline are left"
            by_deadline = True
        if skip is not None:
            status, details = "SKIP", {"reason": skip, **({"deadline": True} if by_deadline else {})}
        else:
            log(f"\n=== {name} ({left:.0f} s left)")
            self.current = name
            try:
                status, details = fn(left)
            except Killed:
                self._add(name, "FAIL", {"error": "the check was stopped (SIGTERM/SIGINT) during this stage"}, t)
                raise
            except Exception as exc:
                status, details = "FAIL", {"error": f"{type(exc).__name__}: {exc}",
                                           "traceback": traceback.format_exc()[-2500:]}
        self._add(name, status, details, t)
        return status

    def _add(self, name: str, status: str, details: dict[str, Any], t: float) -> None:
        entry = {"name": name, "status": status, "seconds": round(time.monotonic() - t, 1), "details": details}
        self.results[name] = entry
        self.record["stages"].append(entry)
        self.write()
        why = details.get("reason") or details.get("error") or details.get("summary") or ""
        log(f"--- {name}: {status} ({entry['seconds']:.0f} s) {str(why)[:300]}")

    def finish(self) -> int:
        """The table; exit code 1 when a stage failed, 2 when none failed but the deadline skipped one (PARTIAL)."""
        statuses = [s["status"] for s in self.record["stages"]]
        cut = [s["name"] for s in self.record["stages"] if s["details"].get("deadline")]
        self.record["finished"] = True
        self.record["skipped_by_deadline"] = cut
        self.record["result"] = "FAIL" if "FAIL" in statuses else "PARTIAL" if cut else "PASS"
        self.write()
        width = max(len(s["name"]) for s in self.record["stages"])
        print(f"{'stage':<{width}}  result  seconds  details")
        for s in self.record["stages"]:
            d = s["details"]
            text = d.get("summary") or d.get("reason") or d.get("error") or ""
            print(f"{s['name']:<{width}}  {s['status']:<6}  {s['seconds']:>7.0f}  {str(text)[:160]}")
        print(f"{self.record['result']} in {self.record['elapsed_s']:.0f} s (deadline {self.deadline:.0f} s)"
              + (f"; the deadline skipped: {', '.join(cut)}" if cut else "") + f"; details: {self.out}")
        return {"FAIL": 1, "PARTIAL": 2}.get(self.record["result"], 0)


# ---------------------------------------------------------------------------------------------- workers
# Each runs in its own process (python gpu_check.py --worker NAME JSON) and prints one RESULT line.


def worker_preflight(tiny: bool) -> dict[str, Any]:
    import importlib
    from importlib.metadata import PackageNotFoundError, version

    def probe(module: str, dist: str) -> tuple[str | None, str | None]:
        try:
            importlib.import_module(module)
        except Exception as exc:  # ImportError, or a package present but broken
            return None, f"{type(exc).__name__}: {exc}"
        try:
            return version(dist), None
        except PackageNotFoundError:
            return "?", None

    t0 = time.monotonic()
    versions: dict[str, str] = {}
    missing: dict[str, str] = {}
    optional_missing: dict[str, str] = {}
    for group, target in ((REQUIRED, missing), (OPTIONAL, optional_missing)):
        for module, dist, why in group:
            ver, problem = probe(module, dist)
            if problem:
                target[dist] = f"{why}: {problem}"
            else:
                versions[dist] = str(ver)
    broken = {}
    if not missing:
        for stmt in ENTRY_POINTS:
            try:
                exec(stmt, {})
            except Exception as exc:
                broken[stmt] = f"{type(exc).__name__}: {exc}"
    gpu: dict[str, Any] = {"cuda": False}
    with contextlib.suppress(Exception):
        import torch

        gpu["torch_cuda_build"] = torch.version.cuda
        if torch.cuda.is_available():
            free, total = torch.cuda.mem_get_info(0)
            gpu.update(cuda=True, name=torch.cuda.get_device_name(0),
                       capability=".".join(map(str, torch.cuda.get_device_capability(0))),
                       free_gib=round(free / 2**30, 1), total_gib=round(total / 2**30, 1),
                       bf16=torch.cuda.is_bf16_supported(), device_count=torch.cuda.device_count())
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    pip = None
    if missing or optional_missing:
        names = " ".join(sorted({*missing, *optional_missing}))
        pip = ("python3 -m pip download --no-deps --only-binary=:all: --python-version " + py + " --implementation cp"
               " --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64"
               f" --platform manylinux2014_x86_64 --platform any -d .whl {names}   (rouge-score has no wheel: "
               "pip wheel --no-deps rouge-score -w .whl; its needs: absl-py nltk regex joblib click)")
    return {"python": sys.version.split()[0], "executable": sys.executable, "versions": versions,
            "missing": missing, "optional_missing": optional_missing, "broken_imports": broken, "gpu": gpu,
            "pip": pip, "import_seconds": round(time.monotonic() - t0, 1), "tiny": tiny}


def tiny_gemma_config() -> dict[str, Any]:
    cfg = json.loads((ROOT / "finsft/model_configs/google--gemma-2b.json").read_text())
    cfg.update(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=1, head_dim=32, vocab_size=4096)  # bnb CPU kernels: 32 | out dims
    return cfg


def worker_prepare(name: str, tiny: bool, work: str, steps: int, warmup: int, rows: int,
                   overrides: dict[str, Any]) -> dict[str, Any]:
    """The model folder (config, trained BPE tokenizer, random weights unless built from the config on the GPU),
    the synthetic rows, the recipe, the rows finsft bench times (JSONL for the expert) and the plan's settings."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from speed import export_rows

    from finsft.bench import synthetic_tokenizer, write_synthetic

    seed_recipe, config_file, kind = SEEDS[name]
    folder = Path(work) / f"{name}-model"
    folder.mkdir(parents=True, exist_ok=True)
    cfg = tiny_gemma_config() if tiny else json.loads((ROOT / "finsft/model_configs" / config_file).read_text())
    (folder / "config.json").write_text(json.dumps(cfg))
    data = write_synthetic(Path(work) / f"{name}-{kind}.jsonl", kind, rows)
    config = AutoConfig.from_pretrained(str(folder))
    texts = [" ".join(r.values()) for r in map(json.loads, data.read_text().splitlines()[:5000])]
    t0 = time.monotonic()
    tok = synthetic_tokenizer(config, texts)
    tok.save_pretrained(folder)
    quantized = name == "gemma"  # 4-bit loading needs saved weights; bf16 LoRA builds them on the GPU itself
    if quantized:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        # Seeded: some random inits of the tiny Gemma leave the 24-step train stage's loss flat (8.2591 -> 8.2595
        # in one CI run); the check's verdicts must not depend on the draw.
        torch.manual_seed(0)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16 if device == "cuda" else None)
        model.save_pretrained(folder)
        del model
    build_s = time.monotonic() - t0
    recipe = {"extends": str(ROOT / seed_recipe), "name": f"gpu-check-{name}",
              "model": {"name_or_path": str(folder)},
              "data": {"path": str(data), "validation_size": 0.02},
              "training": {"save_steps": None, "eval_steps": None, **overrides},
              "output": {"dir": str(Path(work) / f"{name}-run"), "save_merged": False}}
    recipe_path = Path(work) / f"{name}.json"
    recipe_path.write_text(json.dumps(recipe, indent=2))
    timed_rows = Path(work) / f"{name}-timed-rows.jsonl"
    defaults, baseline = export_rows(recipe_path, steps, warmup, timed_rows)
    from finsft.cli import main as finsft_main

    with contextlib.redirect_stdout(io.StringIO()) as plan_out:
        plan_rc = finsft_main(["plan", str(recipe_path), "--format", "json"])
    if plan_rc:
        raise RuntimeError(f"finsft plan {recipe_path} failed (exit {plan_rc})")
    planned = json.loads(plan_out.getvalue())
    memory = planned.get("memory") or {}
    from finsft.plan.memory import ModelShape

    shape = (planned.get("model") or {}).get("shape")
    parameters = ModelShape(**shape).parameters() if shape else None
    choices = {k: planned["choices"][k] for k in ("model.attn_implementation", "training.optim",
                                                 "env.PYTORCH_ALLOC_CONF") if k in planned.get("choices", {})}
    return {"model_dir": str(folder), "random_weights": not quantized, "recipe": str(recipe_path),
            "data": str(data), "timed_rows": str(timed_rows),
            "timed_rows_count": sum(1 for _ in timed_rows.open()), "tokenizer_tokens": len(tok),
            "settings": defaults, "baseline_settings": baseline, "build_s": round(build_s, 1),
            "plan_memory": memory, "estimated_peak_gib": memory.get("estimated_peak_gib"),
            "parameters": parameters, "plan_choices": choices}


def worker_attention(impl: str, rows: int = 8, length: int = 4096, device: str = "cuda",
                     dtype: str = "bfloat16") -> dict[str, Any]:
    """On the GPU, FlexAttention's gradients (which the CPU cannot compute): a 2-layer model with Gemma-2B's
    attention (8 heads, 1 KV head, head_dim 256, bf16) on one packed row of ``rows`` examples (TRL's padding-free
    collator), ``impl`` against each example run alone under SDPA; the packed SDPA row is the bf16 noise reference.
    Then forward + backward of the packed row timed under SDPA and ``impl``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    if device == "cuda" and not torch.cuda.is_available():
        return {"skipped": "no CUDA device"}
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    cfg = json.loads((ROOT / "finsft/model_configs/google--gemma-2b.json").read_text())
    cfg.update(num_hidden_layers=2, vocab_size=4096)
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    torch.manual_seed(0)
    models = {}
    for name in ("sdpa", impl):
        with torch.device(device):
            models[name] = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype),
                                                            attn_implementation=name)
    models[impl].load_state_dict(models["sdpa"].state_dict())
    cuts = sorted(torch.randperm(length - 1)[: rows - 1].add(1).tolist())
    lengths = [b - a for a, b in zip([0, *cuts], [*cuts, length], strict=True)]
    examples = [torch.randint(3, 4096, (n,)).tolist() for n in lengths]
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in DataCollatorForLanguageModeling(
        pad_token_id=0, padding_free=True)([{"input_ids": e} for e in examples]).items()}
    predicted = sum(n - 1 for n in lengths)

    def grads(model: Any, packed: bool) -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        if packed:
            model(**batch, use_cache=False).loss.backward()
        else:
            for e in examples:
                ids = torch.tensor([e], device=device)
                (model(input_ids=ids, labels=ids, use_cache=False).loss * (len(e) - 1) / predicted).backward()
        return torch.cat([p.grad.float().flatten() for p in model.parameters() if p.grad is not None])

    want = grads(models["sdpa"], packed=False)
    errors = {name: ((grads(models[name], packed=True) - want).norm() / want.norm()).item() for name in ("sdpa", impl)}

    def timed(model: Any) -> float:
        for _ in range(2):
            model(**batch, use_cache=False).loss.backward()
        sync()
        t0 = time.perf_counter()
        for _ in range(5):
            model(**batch, use_cache=False).loss.backward()
        sync()
        return round((time.perf_counter() - t0) / 5 * 1000, 2)

    ms = {name: timed(models[name]) for name in ("sdpa", impl)}
    return {"impl": impl, "lengths": lengths, "grad_rel_error": {k: round(v, 5) for k, v in errors.items()},
            "ms_forward_backward": ms, "speedup": round(ms["sdpa"] / ms[impl], 3) if ms[impl] else None}


WORKERS: dict[str, Callable[..., dict[str, Any]]] = {"preflight": worker_preflight, "prepare": worker_prepare,
                                                     "attention": worker_attention}


# ------------------------------------------------------------------------------------------------ stages


def preflight(check: Check, budget: float) -> tuple[str, dict[str, Any]]:
    r = run(worker_cmd("preflight", tiny=check.tiny), min(budget, 180))
    info = result_line(r["stdout"])
    if info is None:
        return "FAIL", {"error": f"the preflight process failed (exit {r['rc']}): {last_line(r['stderr_tail'])}",
                        "stderr_tail": r["stderr_tail"]}
    gpu = info["gpu"]
    print(f"python {info['python']}; " + ", ".join(f"{k} {v}" for k, v in sorted(info["versions"].items())))
    print("GPU: " + (f"{gpu['name']} (capability {gpu['capability']}, {gpu['free_gib']} of {gpu['total_gib']} GiB "
                     f"free, bf16 {gpu['bf16']})" if gpu["cuda"] else f"none (torch CUDA build {gpu.get('torch_cuda_build')})"))
    problems = [f"missing {k} ({v})" for k, v in info["missing"].items()]
    problems += [f"broken: {k} -> {v}" for k, v in info["broken_imports"].items()]
    if not check.tiny and not gpu["cuda"]:
        problems.append("no CUDA GPU visible to torch (on a CPU machine run --tiny)")
    for k, v in info["optional_missing"].items():
        print(f"note: optional {k} is not installed: {v}")
    if problems:
        if info["pip"]:
            print("carry the missing wheels: " + info["pip"])
        return "FAIL", {"error": "; ".join(problems), **info}
    summary = (f"{len(info['versions'])} packages import in {info['import_seconds']} s; "
               + (f"{gpu['name']}, {gpu['free_gib']} GiB free" if gpu["cuda"] else "CPU only (--tiny)"))
    return "PASS", {"summary": summary, **info}


def prepare(check: Check, name: str, args: argparse.Namespace, budget: float) -> tuple[str, dict[str, Any]]:
    overrides: dict[str, Any] = {"logging_steps": args.logging_steps}
    if check.tiny:  # CPU: short rows (the plan picks fp32 and fused AdamW)
        overrides.update(max_length=64, per_device_train_batch_size=2)
    r = run(worker_cmd("prepare", name=name, tiny=check.tiny, work=str(args.work), steps=args.steps,
                       warmup=args.warmup, rows=args.rows, overrides=overrides), min(budget, 300),
            args.work / f"{name}-prepare.log")
    info = result_line(r["stdout"])
    if info is None:
        return "FAIL", {"error": f"prepare failed (exit {r['rc']}): {last_line(r['stderr_tail'])}",
                        "stderr_tail": r["stderr_tail"]}
    s = info["settings"]
    info["summary"] = (f"{info['tokenizer_tokens']}-token BPE tokenizer, {info['timed_rows_count']} timed rows; "
                       f"plan: {s['precision']}, attention {s['attn_implementation']}, optim {s['optim']}, "
                       f"packing {s['packing']}, checkpointing "
                       f"{s['gradient_checkpointing']}, Liger {s['use_liger_kernel']}; estimate "
                       f"{info['estimated_peak_gib']} GiB")
    return "PASS", info


# What the hand-written script chooses itself, as the anchor does (../shared/anchors/trl_handwritten_bench.py):
# SDPA, paged 8-bit AdamW on CUDA (plain AdamW on the CPU), no allocator setting. Packing, checkpointing, Liger,
# precision, batch and max_length follow finsft's plan (the anchor's best mode: packed, no checkpointing).
EXPERT_ATTENTION = "sdpa"
ALLOCATOR_VARIABLES = ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")


def expert_optim(tiny: bool) -> str:
    return "adamw_torch" if tiny else "paged_adamw_8bit"


def expert_cmd(prep: dict[str, Any], args: argparse.Namespace, quantized: bool, *, attn: str | None = None,
               optim: str | None = None, steps: int | None = None, warmup: int | None = None) -> list[str]:
    """The hand-written TRL script on the timed rows: the expert's own attention and optimizer unless ``attn`` /
    ``optim`` name another (the choice stages swap one of them for finsft's)."""
    s = prep["settings"]
    recipe = json.loads(Path(prep["recipe"]).read_text())
    base = json.loads((ROOT / recipe["extends"]).read_text())
    train = {**base.get("training", {}), **recipe["training"]}
    lora = base["lora"]
    cmd = [sys.executable, str(ROOT / "benchmarks/trl_handwritten.py"), "--model", prep["model_dir"],
           "--data", prep["timed_rows"], "--steps", str(steps or args.steps),
           "--warmup", str(args.warmup if warmup is None else warmup),
           "--batch", str(train["per_device_train_batch_size"]), "--max-length", str(train["max_length"]),
           "--precision", s["precision"], "--attn", attn or EXPERT_ATTENTION,
           "--optim", optim or expert_optim(args.tiny),
           "--lr", str(train["learning_rate"]), "--lora-r", str(lora["r"]), "--lora-alpha", str(lora["lora_alpha"]),
           "--lora-dropout", str(lora["lora_dropout"]), "--target-modules", str(lora["target_modules"]),
           "--logging-steps", str(args.logging_steps), "--seed", "42"]
    for flag, key in (("--packing", "packing"), ("--group-by-length", "group_by_length"),
                      ("--gradient-checkpointing", "gradient_checkpointing"), ("--liger", "use_liger_kernel")):
        if s[key]:
            cmd.append(flag)
    if quantized:
        cmd += ["--quant", "4bit"]
    if prep["random_weights"]:
        cmd.append("--random-weights")
    return cmd


def expert_env() -> dict[str, str]:
    """The environment of a hand-written script: no allocator configuration (finsft sets its own)."""
    return {k: v for k, v in os.environ.items() if k not in ALLOCATOR_VARIABLES}


# bf16 dense tensor-core peaks (TFLOP/s), by a substring of torch.cuda.get_device_name(), most specific first.
PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("B200", 2250.0), ("A100", 312.0),
               ("L40S", 362.0), ("L4", 121.0))


def peak_tflops(gpu_name: str | None) -> float | None:
    return next((v for k, v in PEAK_TFLOPS if gpu_name and k in gpu_name), None)


def mfu(tokens_per_s: float | None, parameters: int | None, gpu_name: str | None) -> float | None:
    """Model FLOPs utilisation of LoRA training: 4N FLOPs per token (forward 2N, backward through the frozen
    weights 2N; no weight gradients; attention's own FLOPs not counted), over the GPU's bf16 peak. gpu_check's
    own small function: finsft bench may print MFU itself later (i23cpu); this one reads only bench's JSON."""
    peak = peak_tflops(gpu_name)
    if not tokens_per_s or not parameters or peak is None:
        return None
    return round(4 * parameters * tokens_per_s / (peak * 1e12), 4)


def warm_up(check: Check, name: str, args: argparse.Namespace, budget: float) -> tuple[str, dict[str, Any]]:
    """One untimed process before anything is timed: ``finsft bench`` on the same rows for a few steps, so that the
    Triton kernels (FlexAttention's, Liger's) are compiled into the on-disk caches that every later process of this
    machine reads. The first process on a fresh H100 ran 2.8x slower than the later ones (../shared/GPU.md)."""
    prep = check.results[f"{name}: prepare"]["details"]
    cmd = finsft_cmd("bench", prep["recipe"], "--steps", "2", "--warmup", "1", "--no-baseline", "--format", "json")
    if prep["random_weights"]:
        cmd.append("--random-weights")
    p = run(cmd, budget, args.work / f"{name}-warm-up.log", cap=args.command_timeout, env=expert_env())
    if p["deadline_cut"]:
        return "SKIP", {"reason": f"the deadline stopped the warm-up after {p['seconds']:.0f} s", "deadline": True}
    details: dict[str, Any] = {"seconds": p["seconds"], "untimed": True}
    try:
        details["tokens_per_s_cold"] = json.loads(p["stdout"])["recipe"]["tokens_per_s"]
    except (json.JSONDecodeError, KeyError, TypeError):
        details["error"] = (f"the warm-up bench failed (exit {p['rc']}{', timed out' if p['timed_out'] else ''}): "
                            f"{last_line(p['stderr_tail'])}")
        details["stderr_tail"] = p["stderr_tail"]
        return "FAIL", details
    details["summary"] = (f"one untimed finsft bench process in {p['seconds']:.0f} s (cold: "
                          f"{details['tokens_per_s_cold']} tokens/s, not judged)")
    return "PASS", details


def finite(losses: list[Any]) -> bool:
    return bool(losses) and all(isinstance(x, (int, float)) and math.isfinite(x) for x in losses)


def compare(check: Check, name: str, args: argparse.Namespace, budget: float) -> tuple[str, dict[str, Any]]:
    prep = check.results[f"{name}: prepare"]["details"]
    quantized = name == "gemma"
    end = time.monotonic() + budget
    repeats: list[dict[str, Any]] = []
    errors: list[str] = []
    cut: list[str] = []  # runs the deadline stopped: not finsft's fault, the stage is SKIP unless something failed
    for r in range(args.repeats):
        order = ("finsft", "expert") if r % 2 == 0 else ("expert", "finsft")
        one: dict[str, Any] = {"order": list(order)}
        for side in order:
            left = end - time.monotonic()
            if left < 5:
                cut.append(f"repeat {r + 1} {side}: no time left")
                break
            if side == "finsft":
                cmd = finsft_cmd("bench", prep["recipe"], "--steps", str(args.steps), "--warmup", str(args.warmup),
                                 "--format", "json")
                if prep["random_weights"]:
                    cmd.append("--random-weights")
                if r > 0 or check.tiny:  # the notebook baseline once (GPU), its ratio is not a CPU target
                    cmd.append("--no-baseline")
                p = run(cmd, left, args.work / f"{name}-finsft-{r + 1}.log", cap=args.command_timeout,
                        env=expert_env())
                if p["deadline_cut"]:
                    cut.append(f"repeat {r + 1} finsft bench: stopped by the deadline after {p['seconds']:.0f} s")
                    break
                try:
                    out = json.loads(p["stdout"])
                    one["finsft"], one["baseline"], one["baseline_ratio"] = out["recipe"], out["baseline"], out["ratio"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    errors.append(f"repeat {r + 1}: finsft bench failed (exit {p['rc']}"
                                  f"{', timed out' if p['timed_out'] else ''}): {last_line(p['stderr_tail'])}")
            else:
                p = run(expert_cmd(prep, args, quantized), left, args.work / f"{name}-expert-{r + 1}.log",
                        cap=args.command_timeout, env=expert_env())
                res = result_line(p["stdout"])
                if p["deadline_cut"]:
                    cut.append(f"repeat {r + 1} expert: stopped by the deadline after {p['seconds']:.0f} s")
                    break
                if p["rc"] or res is None:
                    errors.append(f"repeat {r + 1}: the expert script failed (exit {p['rc']}"
                                  f"{', timed out' if p['timed_out'] else ''}): {last_line(p['stderr_tail'])}")
                else:
                    one["expert"] = res
        repeats.append(one)
        if errors or cut:
            break
    details: dict[str, Any] = {"repeats": repeats}
    pairs = [x for x in repeats if "finsft" in x and "expert" in x]
    ratios = [x["finsft"]["tokens_per_s"] / x["expert"]["tokens_per_s"] for x in pairs
              if x["expert"]["tokens_per_s"] > 0]
    details["finsft_over_expert"] = [round(x, 3) for x in ratios]
    details["median_finsft_over_expert"] = round(statistics.median(ratios), 3) if ratios else None
    base = next((x["baseline_ratio"] for x in repeats if x.get("baseline_ratio") is not None), None)
    details["recipe_over_baseline"] = base
    bad_loss = [f"repeat {i + 1} {side}" for i, x in enumerate(repeats) for side in ("finsft", "expert", "baseline")
                if x.get(side) and not finite(x[side].get("losses") or [x[side].get("final_loss")])]
    details["losses"] = {f"{i + 1}-{side}": x[side].get("losses") for i, x in enumerate(repeats)
                         for side in ("finsft", "expert", "baseline") if x.get(side)}
    problems = list(errors)
    if bad_loss:
        problems.append("no finite loss logged by " + ", ".join(bad_loss))
    if len(pairs) < args.repeats and not errors and not cut:
        problems.append(f"{len(pairs)} of {args.repeats} repeats completed")
    med = details["median_finsft_over_expert"]
    gpu_name = check.results.get("preflight", {}).get("details", {}).get("gpu", {}).get("name")
    for side in ("finsft", "expert"):
        tps = [x[side]["tokens_per_s"] for x in repeats if x.get(side)]
        details[f"median_{side}_tokens_per_s"] = round(statistics.median(tps), 1) if tps else None
        details[f"mfu_{side}"] = mfu(details[f"median_{side}_tokens_per_s"], prep.get("parameters"), gpu_name)
    if not check.tiny:
        if med is not None and med < TARGET:
            problems.append(f"finsft / expert = {med:.2f}x tokens/s, below the {TARGET}x target")
        if base is not None and base < 1.5:
            problems.append(f"recipe / notebook baseline = {base:.2f}x tokens/s, below the 1.5x target")
        if base is None and not errors and not cut:
            problems.append("the notebook baseline did not run")
    details["summary"] = (f"finsft / expert tokens/s: {details['finsft_over_expert']} (median {med}, target "
                          f"{TARGET}x); MFU finsft {details['mfu_finsft']}, expert {details['mfu_expert']} (4N "
                          f"FLOPs/token); recipe / baseline: {base}; losses finite: {not bad_loss}")
    print(f"{name}: MFU finsft {details['mfu_finsft']}, expert {details['mfu_expert']} "
          f"({details['median_finsft_tokens_per_s']} vs {details['median_expert_tokens_per_s']} tokens/s, "
          f"{prep.get('parameters')} parameters, {gpu_name or 'no GPU'})")
    if problems:
        details["error"] = "; ".join(problems + cut)
        return "FAIL", details
    if cut:
        details["reason"] = "the deadline cut it: " + "; ".join(cut) + f" ({len(pairs)} of {args.repeats} repeats)"
        details["deadline"] = True
        return "SKIP", details
    return "PASS", details


CHOICES = {"attention": ("attn_implementation", "--attn"), "optimizer": ("optim", "--optim")}


def choice(check: Check, name: str, which: str, args: argparse.Namespace,
           budget: float) -> tuple[str, dict[str, Any]]:
    """The hand-written script with ONE of finsft's choices swapped in (the attention, or the optimizer), timed
    against the same script's own runs of the finsft-vs-expert stage on this warm machine: the choice is kept only
    where it pays (>= 1.0x tokens/s on the GPU). The attention stage first checks FlexAttention's gradients on
    packed rows against each example alone (worker_attention)."""
    prep = check.results[f"{name}: prepare"]["details"]
    key, _flag = CHOICES[which]
    ours = prep["settings"][key]
    theirs = EXPERT_ATTENTION if which == "attention" else expert_optim(args.tiny)
    reason = (prep.get("plan_choices") or {}).get("model.attn_implementation" if which == "attention"
                                                  else "training.optim", {}).get("reason")
    details: dict[str, Any] = {"finsft": ours, "expert": theirs, "plan_reason": reason}
    if ours == theirs:
        return "SKIP", {**details, "reason": f"the plan chose the expert's own {which} ({ours}): nothing to compare"
                        + (" (CPU: FlexAttention has no backward here)" if args.tiny and which == "attention" else "")}
    end = time.monotonic() + budget
    problems: list[str] = []
    if which == "attention" and not args.tiny:
        w = run(worker_cmd("attention", impl=ours), min(budget, 240), args.work / f"{name}-attention-grads.log")
        res = result_line(w["stdout"])
        details["gradients"] = res
        if res is None:
            problems.append(f"the gradient check under {ours} failed (exit {w['rc']}): {last_line(w['stderr_tail'])}")
        elif "grad_rel_error" in res:
            err, ref = res["grad_rel_error"][ours], res["grad_rel_error"]["sdpa"]
            if not err <= max(2 * ref, 0.02):
                problems.append(f"packed {ours} gradients are {err:.4f} off each example alone (packed SDPA: "
                                f"{ref:.4f}, bf16 noise)")
    quantized = name == "gemma"
    runs: list[dict[str, Any]] = []
    for r in range(args.choice_repeats):
        left = end - time.monotonic()
        if left < 5:
            break
        p = run(expert_cmd(prep, args, quantized, **{"attn" if which == "attention" else "optim": ours}), left,
                args.work / f"{name}-{which}-{r + 1}.log", cap=args.command_timeout, env=expert_env())
        res = result_line(p["stdout"])
        if p["deadline_cut"]:
            break
        if p["rc"] or res is None:
            problems.append(f"the expert script with {key}={ours} failed (exit {p['rc']}): "
                            f"{last_line(p['stderr_tail'])}")
            break
        runs.append(res)
    reps = check.results.get(f"{name}: finsft vs expert", {}).get("details", {}).get("repeats") or []
    own = [x["expert"]["tokens_per_s"] for x in reps if x.get("expert")]
    swapped = [x["tokens_per_s"] for x in runs]
    details.update(expert_tokens_per_s=own, swapped_tokens_per_s=swapped,
                   swapped_peak_reserved_gib=[x.get("peak_reserved_gib") for x in runs],
                   losses={f"{i + 1}": x.get("losses") for i, x in enumerate(runs)})
    ratio = round(statistics.median(swapped) / statistics.median(own), 3) if swapped and own else None
    details["ratio"] = ratio
    if any(not finite(x.get("losses") or []) for x in runs):
        problems.append(f"no finite loss with {key}={ours}")
    if not problems and ratio is None:
        return "SKIP", {**details, "reason": "no timed run with the swapped choice, or none of the expert's own",
                        "deadline": True}
    if not args.tiny and ratio is not None and ratio < 1.0:
        problems.append(f"{ours} does not pay: {ratio:.2f}x the tokens/s of {theirs} in the hand-written script")
    grads = details.get("gradients") or {}
    details["summary"] = (f"{theirs} -> {ours}: {ratio}x tokens/s in the hand-written script ({len(swapped)} runs vs "
                          f"{len(own)})" + (f"; packed gradients off by {grads['grad_rel_error']}, forward+backward "
                                           f"{grads['ms_forward_backward']} ms" if "grad_rel_error" in grads else ""))
    if problems:
        details["error"] = "; ".join(problems)
        return "FAIL", details
    return "PASS", details


def memory(check: Check, name: str, tolerance: float) -> tuple[str, dict[str, Any]]:
    est = check.results[f"{name}: prepare"]["details"].get("estimated_peak_gib")
    reps = check.results.get(f"{name}: finsft vs expert", {}).get("details", {}).get("repeats") or []
    if not any(x.get("finsft") for x in reps):
        return "SKIP", {"reason": "no finsft bench result to compare with the plan"}
    rows = []
    for i, x in enumerate(reps):
        for side in ("finsft", "expert"):
            if x.get(side):
                rows.append({"repeat": i + 1, "side": side, "allocated_gib": x[side].get("peak_memory_gib"),
                             "reserved_gib": x[side].get("peak_reserved_gib")})
    details: dict[str, Any] = {"estimated_peak_gib": est, "tolerance": tolerance, "peaks": rows}
    fin = [r for r in rows if r["side"] == "finsft" and r["reserved_gib"] is not None]
    if not fin or not est:
        return "FAIL", {**details, "error": "no CUDA peak or no plan estimate to compare"}
    alloc = max(r["allocated_gib"] for r in fin)
    reserved = max(r["reserved_gib"] for r in fin)
    details.update(allocated_error=round(est / alloc - 1, 3), reserved_over_estimate=round(reserved / est - 1, 3))
    problems = []
    if abs(est / alloc - 1) > tolerance:
        problems.append(f"the plan's {est:.2f} GiB is {est / alloc - 1:+.0%} off the allocated peak {alloc:.2f} GiB")
    if reserved > est * (1 + tolerance):
        problems.append(f"the reserved peak {reserved:.2f} GiB is {reserved / est - 1:+.0%} above the plan's "
                        f"{est:.2f} GiB")
    expert = [r for r in rows if r["side"] == "expert" and r["reserved_gib"] is not None]
    details["summary"] = (f"plan {est:.2f} GiB vs allocated {alloc:.2f} GiB ({est / alloc - 1:+.0%}), reserved "
                          f"{reserved:.2f} GiB ({reserved / est - 1:+.0%}); expert (no allocator setting) allocated "
                          f"{max((r['allocated_gib'] for r in expert), default=None)} GiB, reserved "
                          f"{max((r['reserved_gib'] for r in expert), default=None)} GiB")
    if problems:
        details["error"] = "; ".join(problems)
        return "FAIL", details
    return "PASS", details


def train_and_evaluate(check: Check, args: argparse.Namespace, budget: float) -> tuple[str, dict[str, Any]]:
    prep = check.results["gemma: prepare"]["details"]
    out_dir = args.work / "train-run"
    # A constant learning rate, high enough that LoRA on random weights learns the data's token frequencies
    # within the few steps: the loss must fall by more than the batch-to-batch noise.
    overrides = [f"training.max_steps={args.train_steps}", "training.logging_steps=1",
                 "training.lr_scheduler_type=constant", "training.warmup_steps=0",
                 f"training.learning_rate={0.02 if check.tiny else 5e-4}",
                 "evaluation.max_samples=8", "evaluation.max_new_tokens=16", "evaluation.before_training=false",
                 f"output.dir={out_dir}"]
    if check.tiny:
        overrides += ["training.per_device_train_batch_size=4"]
    p = run(finsft_cmd("train", prep["recipe"], *overrides), budget, args.work / "train.log", cap=420)
    if p["deadline_cut"]:
        return "SKIP", {"reason": f"the deadline stopped finsft train after {p['seconds']:.0f} s", "deadline": True,
                        "stderr_tail": p["stderr_tail"]}
    details: dict[str, Any] = {"rc": p["rc"], "seconds": p["seconds"], "output_dir": str(out_dir)}
    metrics = out_dir / "metrics.jsonl"
    losses = ([float(r["loss"]) for r in map(json.loads, metrics.read_text().splitlines()) if "loss" in r]
              if metrics.exists() else [])
    details["losses"] = losses
    problems = []
    if p["rc"]:
        problems.append(f"finsft train failed (exit {p['rc']}{', timed out' if p['timed_out'] else ''}): "
                        f"{last_line(p['stderr_tail'])}")
        details["stderr_tail"] = p["stderr_tail"]
    third = max(1, len(losses) // 3)
    first, last = (statistics.mean(losses[:third]), statistics.mean(losses[-third:])) if losses else (None, None)
    details.update(first_third_loss=first, last_third_loss=last)
    if not finite(losses):
        problems.append(f"no finite training loss in {metrics}")
    elif len(losses) < 3 or not last < first:  # type: ignore[operator]
        problems.append(f"the training loss did not fall ({len(losses)} logged; first third {first:.4f}, last "
                        f"third {last:.4f})")
    eval_path = out_dir / "eval.json"
    expected = ("n", "rougeL", "token_f1")
    try:
        ev = json.loads(eval_path.read_text())
        m = ev["metrics"]
        details["eval_metrics"] = {k: m.get(k) for k in expected}
        if any(k not in m for k in expected) or not m["n"] > 0 or not all(math.isfinite(m[k]) for k in expected):
            problems.append(f"{eval_path} lacks the metrics {expected} (has {sorted(m)})")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        problems.append(f"no readable evaluation at {eval_path}: {exc}")
    details["summary"] = (f"{len(losses)} losses, {first and round(first, 3)} -> {last and round(last, 3)}; "
                          f"eval {details.get('eval_metrics')}")
    if problems:
        details["error"] = "; ".join(problems)
        return "FAIL", details
    return "PASS", details


def fsdp_qlora(check: Check, args: argparse.Namespace, budget: float) -> tuple[str, dict[str, Any]]:
    prep = check.results["gemma: prepare"]["details"]
    out_dir = args.work / "fsdp-run"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "recipes/accelerate/fsdp.yaml"), "--num_processes", "1", "-m", "finsft", "train",
           prep["recipe"], "training.max_steps=4", "training.save_steps=2", "training.logging_steps=1",
           "evaluation=null", f"output.dir={out_dir}"]
    p = run(cmd, budget, args.work / "fsdp.log", cap=300)
    if p["deadline_cut"]:
        return "SKIP", {"reason": f"the deadline stopped the FSDP run after {p['seconds']:.0f} s", "deadline": True,
                        "stderr_tail": p["stderr_tail"]}
    checkpoints = sorted(str(c.relative_to(args.work)) for c in args.work.glob("fsdp-run*/**/checkpoint-*")
                         if c.is_dir())
    details = {"rc": p["rc"], "checkpoints": checkpoints, "command": " ".join(cmd)}
    if p["rc"] or not checkpoints:
        details["error"] = (f"FSDP-QLoRA run failed (exit {p['rc']}{', timed out' if p['timed_out'] else ''}): "
                            f"{last_line(p['stderr_tail'])}" if p["rc"] else "no checkpoint saved")
        details["stderr_tail"] = p["stderr_tail"]
        return "FAIL", details
    details["summary"] = f"4 steps under FSDP, checkpoints {checkpoints}"
    return "PASS", details


# -------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="CPU: the same stages on a 2-layer Gemma (no GPU targets)")
    p.add_argument("--deadline", type=positive_seconds, default=DEFAULT_DEADLINE,
                   help=f"seconds for the whole check (default {DEFAULT_DEADLINE:.0f})")
    p.add_argument("--out", type=Path, default=Path("gpu_check.json"),
                   help="the JSON record: a new file, or one this check wrote before (never replaced otherwise)")
    p.add_argument("--steps", type=int, help="timed bench steps (default 10; --tiny 2)")
    p.add_argument("--warmup", type=int, help="untimed warm-up steps (default 3; --tiny 1)")
    p.add_argument("--repeats", type=int, default=3, help="finsft/expert pairs in alternating order (default 3)")
    p.add_argument("--choice-repeats", type=int, help="runs of each choice stage (default 2; --tiny 1)")
    p.add_argument("--train-steps", type=int, help="steps of the training stage (default 30; --tiny 24)")
    p.add_argument("--models", default="gemma",
                   help="comma-separated: gemma, mistral (default gemma: each model's stages fill one 9-minute call)")
    p.add_argument("--work", type=Path, help="work folder (default: a new temporary folder)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("worker_args", nargs="?", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    os.environ.update(OFFLINE)
    if a.worker:
        print("RESULT " + json.dumps(WORKERS[a.worker](**json.loads(a.worker_args or "{}")), default=str),
              flush=True)
        return 0
    a.out = a.out.expanduser().absolute()
    problem = check_out(a.out)
    if problem:
        p.error(problem)
    if str(ROOT) not in sys.path:  # finsft.files (the writing gate) from this checkout
        sys.path.insert(0, str(ROOT))
    a.steps = a.steps or (2 if a.tiny else 10)
    a.warmup = a.warmup if a.warmup is not None else (1 if a.tiny else 3)
    a.train_steps = a.train_steps or (24 if a.tiny else 30)
    a.choice_repeats = a.choice_repeats or (1 if a.tiny else 2)
    a.logging_steps = 1 if a.tiny else 5
    a.rows = 200 if a.tiny else 3000
    a.command_timeout = 240 if a.tiny else 300
    a.work = (a.work or Path(tempfile.mkdtemp(prefix="gpu-check-"))).resolve()
    a.work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("FINSFT_CACHE", str(a.work / "finsft-cache"))
    os.environ.setdefault("HF_DATASETS_CACHE", str(a.work / "hf-datasets"))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))

    from finsft.errors import FinsftError

    try:
        return _run(a)
    except FinsftError as exc:  # the record could not be written (a full disk, a read-only folder...)
        print(f"gpu_check: error: {exc}", file=sys.stderr)
        return 1


def _run(a: argparse.Namespace) -> int:
    check = Check(a.out, a.deadline, a.tiny)
    check.record.update(work=str(a.work), steps=a.steps, warmup=a.warmup, repeats=a.repeats,
                        train_steps=a.train_steps)
    check.write()
    global RUNNING
    RUNNING = check.running

    def on_signal(signum: int, frame: Any) -> None:
        raise Killed(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    models = [m.strip() for m in a.models.split(",") if m.strip()]
    try:
        check.stage("preflight", 10, lambda b: preflight(check, b))
        gpu_only = "GPU only: a 7B model does not train on a CPU (--tiny covers the same code path with gemma)"
        for name in models:
            if name not in SEEDS:
                raise SystemExit(f"unknown model '{name}' (use: {', '.join(SEEDS)})")
        # The most important first: per model, the untimed warm-up, finsft vs the expert (the 1.25x target), memory
        # vs the plan, then what each of finsft's GPU choices is worth; training + evaluation and FSDP last.
        for name in models:
            skip = gpu_only if (a.tiny and name != "gemma") else None
            check.stage(f"{name}: prepare", 40 if not a.tiny else 15, lambda b, n=name: prepare(check, n, a, b),
                        requires=("preflight",), skip=skip)
            check.stage(f"{name}: warm-up", 40, lambda b, n=name: warm_up(check, n, a, b),
                        requires=(f"{name}: prepare",),
                        skip=skip or ("CPU: no Triton kernels to compile (on the GPU, one untimed finsft bench "
                                      "process runs here)" if a.tiny else None))
            check.stage(f"{name}: finsft vs expert", (200 if name == "gemma" else 240) if not a.tiny else 40,
                        lambda b, n=name: compare(check, n, a, b), requires=(f"{name}: prepare",), skip=skip)
            check.stage(f"{name}: memory vs plan", 0, lambda b, n=name: memory(check, n, 0.15),
                        requires=(f"{name}: prepare",),
                        skip=skip or ("CPU: the plan estimates GPU memory; a process's RSS is not comparable"
                                      if a.tiny else None))
            for which in ("attention", "optimizer"):
                check.stage(f"{name}: {which} choice", 60 if not a.tiny else 15,
                            lambda b, n=name, w=which: choice(check, n, w, a, b),
                            requires=(f"{name}: prepare",), skip=skip)
        if "gemma" in models:
            check.stage("gemma: train + evaluate", 90 if not a.tiny else 30,
                        lambda b: train_and_evaluate(check, a, b), requires=("gemma: prepare",))
        check.stage("gemma: FSDP-QLoRA checkpoint", 75, lambda b: fsdp_qlora(check, a, b),
                    requires=("gemma: prepare",),
                    skip="GPU only: accelerate's FSDP has no CPU device" if a.tiny else
                    (None if "gemma" in models else "gemma not among --models"))
    except Killed as exc:
        check.record["stopped"] = str(exc)
        check.record["result"] = "INCOMPLETE"
        check.write()
        log(f"stopped by {exc}; the stages finished so far are in {check.out}")
        return 143
    return check.finish()


if __name__ == "__main__":
    sys.exit(main())
