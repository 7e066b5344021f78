"""finsft bench: the baseline plan, the shipped model configs, the synthetic tokenizer and data, and the command
itself in a subprocess on the tiny model (JSON output, --random-weights from a folder holding only config.json,
4-bit, offline hub data). Also a short run of benchmarks/speed.py."""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from finsft.bench import (
    FINGPT9,
    baseline_plan,
    render,
    synthetic_rows,
    synthetic_tokenizer,
    timing_rows,
)
from finsft.errors import FinsftError
from finsft.plan import Hardware, plan_run
from finsft.recipe import load_recipe

REPO = Path(__file__).resolve().parent.parent
CPU = Hardware(device="cpu", name="test", bf16=False, tf32=False, memory_bytes=None, flash_attn=False, liger=False)
GPU = Hardware(device="cuda", name="H100", bf16=True, tf32=True, memory_bytes=80 * 2**30, flash_attn=False,
               liger=True)


def run_cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "finsft", *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


# ------------------------------------------------------------------------------------------------ planning


@pytest.mark.parametrize("hw", [CPU, GPU], ids=["cpu", "gpu"])
def test_baseline_is_the_notebook_way_with_everything_else_equal(make_recipe: Any, hw: Hardware) -> None:
    recipe = load_recipe(str(make_recipe()))
    plan = plan_run(recipe, hw, (135_000_000, 576, 30))
    base = baseline_plan(plan)
    assert (base.packing, base.group_by_length, base.gradient_checkpointing, base.use_liger_kernel) == (
        False, False, True, False)
    for same in ("precision", "dtype", "optim", "tf32", "hardware"):
        assert getattr(base, same) == getattr(plan, same)
    # FlexAttention is the plan's choice for packed rows; the padded baseline runs SDPA, as unpacked plans do
    assert (plan.attn_implementation, base.attn_implementation) == (
        ("flex_attention", "sdpa") if hw.is_gpu else ("sdpa", "sdpa"))
    changed = {c.setting: c for c in base.choices if c.reason == "notebook-style baseline"}
    assert set(changed) == {"training.packing", "training.group_by_length", "training.gradient_checkpointing",
                            "training.use_liger_kernel", "training.supervised_lm_head",
                            *(["model.attn_implementation"] if hw.is_gpu else [])}
    assert base.supervised_lm_head is None and plan.supervised_lm_head is True  # TRL's own choice in the baseline
    assert plan.packing is hw.is_gpu  # the recipe's own plan is untouched
    assert plan.gradient_checkpointing is False


# ------------------------------------------------------------------------------------- shipped model configs


@pytest.mark.parametrize(("hub_id", "cls", "shape"), [
    ("google/gemma-2b", "GemmaForCausalLM", dict(vocab_size=256000, hidden_size=2048, intermediate_size=16384,
                                                 num_hidden_layers=18, num_attention_heads=8,
                                                 num_key_value_heads=1, head_dim=256)),
    ("mistralai/Mistral-7B-v0.1", "MistralForCausalLM", dict(vocab_size=32000, hidden_size=4096,
                                                             intermediate_size=14336, num_hidden_layers=32,
                                                             num_attention_heads=32, num_key_value_heads=8)),
])
def test_seed_models_resolve_to_shipped_configs_with_random_weights(make_recipe: Any, hub_id: str, cls: str,
                                                                    shape: dict[str, int]) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, MistralConfig

    from finsft.models import model_shape, resolve_model, shipped_models

    recipe = load_recipe(str(make_recipe(model={"name_or_path": hub_id})))
    assert hub_id in shipped_models()
    assert resolve_model(recipe, log=print).path == hub_id  # real weights: the hub id, untouched
    source = resolve_model(recipe, log=print, random_weights=True)
    assert source.path.endswith(".json") and Path(source.path).is_file()
    config = AutoConfig.from_pretrained(source.path)
    assert config.architectures == [cls]
    for key, value in shape.items():
        assert getattr(config, key) == value, key
    if hub_id.startswith("mistralai"):
        defaults = MistralConfig()
        assert all(getattr(config, k) == getattr(defaults, k) for k in shape)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    n = sum(p.numel() for p in model.parameters())
    assert type(model).__name__ == cls
    assert 2.4e9 < n < 2.6e9 if "gemma" in hub_id else 7.1e9 < n < 7.3e9
    shape_estimate = model_shape(source)
    assert shape_estimate is not None
    assert (shape_estimate.hidden, shape_estimate.layers) == (config.hidden_size, config.num_hidden_layers)
    assert abs(shape_estimate.parameters() - n) / n < 0.02  # the memory model's count of the real model


@pytest.mark.parametrize(("hub_id", "ids"), [("google/gemma-2b", (2, 1, 0)), ("mistralai/Mistral-7B-v0.1", (1, 2, 2))])
def test_synthetic_tokenizer_fits_the_model_vocabulary(hub_id: str, ids: tuple[int, int, int]) -> None:
    from transformers import AutoConfig

    from finsft.models import shipped_config

    path = shipped_config(hub_id)
    assert path is not None
    config = AutoConfig.from_pretrained(str(path))
    texts = [r["instruction"] + " " + r["input"] + " " + r["output"] for r in synthetic_rows("sentiment", 500)]
    tok = synthetic_tokenizer(config, texts)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == ids
    assert max(tok.get_vocab().values()) < config.vocab_size
    enc = tok(texts[:50])["input_ids"]
    assert all(e[0] == tok.bos_token_id for e in enc)
    words = statistics.mean(len(t.split()) for t in texts[:50])
    tokens = statistics.mean(len(e) for e in enc)
    assert words * 0.9 < tokens < words * 2.5  # word-level-ish counts, like a real tokenizer's
    assert tok.decode(enc[0], skip_special_tokens=True) == texts[0]


# ------------------------------------------------------------------------------------------ synthetic data


def test_synthetic_sentiment_rows_are_shaped_like_fingpt() -> None:
    rows = list(synthetic_rows("sentiment", 2000, seed=3))
    assert rows == list(synthetic_rows("sentiment", 2000, seed=3))
    assert set(rows[0]) == {"instruction", "input", "output"}
    assert {r["output"] for r in rows} == set(FINGPT9)
    assert 25 < statistics.mean(len(r["input"].split()) for r in rows) < 35
    assert len({r["instruction"] for r in rows}) >= 3
    qa = list(synthetic_rows("qa", 300))
    assert statistics.mean(len(r["output"].split()) for r in qa) > 100
    with pytest.raises(ValueError, match="unknown synthetic"):
        next(synthetic_rows("ner", 1))


def test_timing_rows_are_the_same_for_both_configurations(make_recipe: Any, tiny_model: Path) -> None:
    import datasets

    recipe = load_recipe(str(make_recipe(training={"per_device_train_batch_size": 2})))
    ds = datasets.Dataset.from_dict({"input_ids": [[1] * (5 + i % 7) for i in range(3000)],
                                     "completion_mask": [[1] * (5 + i % 7) for i in range(3000)]})
    a = timing_rows(ds, recipe, steps=5, warmup=1)
    b = timing_rows(ds, recipe, steps=5, warmup=1)
    assert a["input_ids"][:] == b["input_ids"][:]
    assert 400 <= len(a) < 3000  # at least 200 batches' worth for length grouping, not the whole set
    assert len(timing_rows(ds.select(range(50)), recipe, steps=5, warmup=1)) == 50


def test_render_shows_both_configurations_and_the_ratio() -> None:
    from rich.console import Console

    def row(tps: float, ckpt: bool) -> dict[str, Any]:
        return {"tokens_per_s": tps, "s_per_step": 1000 / tps, "tokens_per_cpu_s": tps / 2, "peak_memory_gib": 1.5, "data_prep_s": 2.0,
                "data_from_cache": not ckpt, "warmup_steps": 4, "warmup_stable": not ckpt, "cold_start_s": 3.25,
                "startup_s": 9.0, "mfu_percent": None if ckpt else 31.5,
                "settings": {"packing": False, "group_by_length": not ckpt, "gradient_checkpointing": ckpt,
                             "use_liger_kernel": False, "precision": "fp32", "attn_implementation": "sdpa",
                             "supervised_lm_head": None if ckpt else True}}

    console = Console(width=140, record=True)
    console.print(render({"recipe": row(200.0, False), "baseline": row(100.0, True), "ratio": 2.0}, "t"))
    text = console.export_text()
    assert "2.00x" in text and "0.50x" in text and "notebook baseline" in text and "(cache)" in text
    assert "4 (stable)" in text and "4 (cap, unstable)" in text and "3.2 s" in text
    assert "31.5%" in text and "unknown" in text and "supervised" in text and "TRL's choice" in text


# ----------------------------------------------------------------------------------- warm-up, cold start, MFU


def test_warmup_ends_when_the_last_steps_agree_never_on_the_first_step() -> None:
    from finsft.bench import warmup_end

    assert warmup_end([]) is None
    assert warmup_end([1.0, 1.0, 1.0]) is None  # the first step never counts: 2 of the 3 needed
    assert warmup_end([9.0, 1.0, 1.0, 1.0]) == (4, True)
    assert warmup_end([9.0, 3.0, 1.05, 1.0, 0.95]) == (5, True)  # within 10% of the median 1.0
    assert warmup_end([9.0, 1.2, 1.0, 1.0]) is None  # 20% off the median
    assert warmup_end([9.0, 1.2, 1.0, 1.0], tolerance=0.25) == (4, True)
    assert warmup_end([9.0, 1.0, 1.0], window=2) == (3, True)
    assert warmup_end([9.0, 2.0, 1.0, 2.0, 1.0], window=2) is None
    # never stable: the cap ends the warm-up, flagged unstable
    noisy = [5.0, 1.0, 2.0, 1.0, 2.0, 1.0, 2.0, 1.0, 2.0, 1.0]
    assert all(warmup_end(noisy[:n]) is None for n in range(1, 10))
    assert warmup_end(noisy) == (10, False)
    assert warmup_end(noisy[:3], cap=3) == (3, False)
    assert warmup_end([0.0, 0.0, 0.0, 0.0], cap=5) is None  # a zero median is no evidence


def test_cold_start_is_the_warmup_time_beyond_the_warm_rate() -> None:
    from finsft.bench import cold_start_seconds

    # timed: 100 tokens in 10 s (0.1 s/token); warm-up: 50 + 50 tokens in 30 + 6 s -> 36 - 10 = 26 s extra
    assert cold_start_seconds([30.0, 6.0], [50, 50], 10.0, 100) == pytest.approx(26.0)
    assert cold_start_seconds([4.0], [50], 10.0, 100) == 0.0  # faster than the timed rate: never negative
    assert cold_start_seconds([], [], 10.0, 100) == 0.0
    assert cold_start_seconds([3.0], [10], 10.0, 0) == 0.0


def test_mfu_arithmetic_and_the_device_peaks() -> None:
    from transformers import LlamaConfig

    from finsft.bench import mfu_percent, peak_flops, training_flops_per_token

    cfg = LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    layer = 2 * 64 * (4 * 16 + 2 * 2 * 16) + 2 * 4 * 16 * 64 + 2 * 2 * 4 * 16 * 100 + 2 * 3 * 64 * 256
    forward = 2 * layer + 2 * 1000 * 64  # two layers and the LM head, at 100 tokens of context
    assert training_flops_per_token(cfg, 100, full_fine_tune=True) == 3 * forward  # ~6N
    assert training_flops_per_token(cfg, 100, full_fine_tune=False) == 2 * forward  # ~4N: no weight gradients
    # 1,000 tokens/s x 1e6 FLOPs/token on a 1e12 FLOP/s device = 0.1%
    assert mfu_percent(1000.0, 10**6, 1e12) == pytest.approx(0.1)
    assert mfu_percent(1000.0, 10**9, None) is None
    assert peak_flops("NVIDIA H100 80GB HBM3", "bf16")[0] == pytest.approx(989.4e12)
    assert peak_flops("NVIDIA H100 PCIe", "bf16")[0] == pytest.approx(756e12)
    assert peak_flops("NVIDIA H200", "bf16")[0] == pytest.approx(989.4e12)
    assert peak_flops("NVIDIA A100-SXM4-80GB", "bf16")[0] == pytest.approx(312e12)
    assert peak_flops("NVIDIA L4", "bf16")[0] == pytest.approx(121e12)
    assert peak_flops("NVIDIA L40S", "bf16")[0] == pytest.approx(362.1e12)
    assert peak_flops("Tesla T4", "fp16")[0] == pytest.approx(65e12)
    assert peak_flops("NVIDIA A10G", "bf16")[0] == pytest.approx(70e12)
    assert peak_flops("NVIDIA GeForce RTX 4090", "bf16")[0] == pytest.approx(165.2e12)
    assert peak_flops("NVIDIA H100 80GB HBM3", "fp32")[0] is None
    none, why = peak_flops("Some Future GPU", "bf16")
    assert none is None and "not in finsft's table" in why


def test_compile_caches_live_under_finsfts_cache_unless_the_user_set_them(monkeypatch: pytest.MonkeyPatch,
                                                                          tmp_path: Path) -> None:
    from finsft.bench import compile_cache_env

    monkeypatch.setenv("FINSFT_CACHE", str(tmp_path / "cache"))
    env = compile_cache_env({})
    assert env == {"TRITON_CACHE_DIR": str(tmp_path / "cache" / "compile" / "triton"),
                   "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "cache" / "compile" / "inductor")}
    assert compile_cache_env({"TRITON_CACHE_DIR": "/mine"}) == {
        "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "cache" / "compile" / "inductor")}
    assert compile_cache_env({"TRITON_CACHE_DIR": "/a", "TORCHINDUCTOR_CACHE_DIR": "/b"}) == {}


def test_warmup_option_is_a_count_or_auto() -> None:
    import argparse

    from finsft.cli import _warmup_steps

    assert _warmup_steps("auto") is None and _warmup_steps("0") == 0 and _warmup_steps("3") == 3
    for bad in ("-1", "two", "1.5"):
        with pytest.raises(argparse.ArgumentTypeError, match="auto"):
            _warmup_steps(bad)


# --------------------------------------------------------------------------------------------- the command


def test_bench_rejects_bad_step_counts(make_recipe: Any) -> None:
    from finsft.bench import bench

    recipe = load_recipe(str(make_recipe()))
    with pytest.raises(FinsftError, match="--steps"):
        bench(recipe, steps=0)


@pytest.mark.slow
def test_bench_json_on_the_tiny_model(make_recipe: Any, tmp_path: Path) -> None:
    path = make_recipe(data={"max_samples": 48})
    recipe = json.loads(path.read_text())
    proc = run_cli("bench", str(path), "--steps", "3", "--warmup", "1", "--format", "json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)  # stdout is exactly the JSON document
    assert set(out) == {"recipe", "baseline", "ratio"}
    r, b = out["recipe"], out["baseline"]
    for res in (r, b):
        assert res["tokens_per_s"] > 0 and res["s_per_step"] > 0 and res["peak_memory_gib"] > 0.05
        assert res["tokens_per_cpu_s"] > 0 and res["cpu_s_per_step"] > 0
        assert res["timed_steps"] == 3 and res["timed_tokens"] > 0
        assert res["memory_kind"] == "process peak RSS" and res["data_prep_s"] >= 0
        assert res["tokenizer"] == "the model's"
        assert res["warmup_steps"] == 1 and res["warmup_stable"] is None  # a fixed --warmup
        assert res["cold_start_s"] >= 0 and res["startup_s"] > 0 and res["first_step_s"] > 0
        assert res["mfu_percent"] is None and "CPU" in res["mfu_note"] and res["flops_per_token"] > 0
    assert out["ratio"] == pytest.approx(r["tokens_per_s"] / b["tokens_per_s"], abs=1e-3)
    assert r["settings"]["group_by_length"] and not r["settings"]["gradient_checkpointing"]
    assert b["settings"]["gradient_checkpointing"] and not b["settings"]["group_by_length"]
    assert r["settings"]["supervised_lm_head"] is True and b["settings"]["supervised_lm_head"] is None
    assert not r["data_from_cache"] and b["data_from_cache"]  # the baseline reuses the prepared data
    assert not Path(recipe["output"]["dir"]).exists()  # nothing written to the output folder
    assert "timing the baseline" in proc.stderr


@pytest.mark.slow
def test_bench_random_weights_from_a_config_folder_4bit_offline_data(make_recipe: Any, tiny_model: Path,
                                                                      tmp_path: Path) -> None:
    folder = tmp_path / "config-only"
    folder.mkdir()
    shutil.copy(tiny_model / "config.json", folder / "config.json")
    path = make_recipe(model={"name_or_path": str(folder)}, quantization={"load_in_4bit": True},
                       data={"path": "FinGPT/fingpt-sentiment-train", "max_samples": 64},
                       template={"name": "fingpt_sentiment", "labels": "fingpt9"})
    proc = run_cli("bench", str(path), "--steps", "2", "--warmup", "auto", "--random-weights", "--no-baseline")
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert "until the time per token is stable" in text and "warm-up steps" in text and "MFU" in text
    assert "random weights" in text and "4-bit quantized" in text and "tokenizer: synthetic" in text
    assert "synthetic rows" in text and "is not available" in text
    assert "recipe (finsft)" in text and "notebook baseline" not in text
    # quantized random weights were saved once, for from_pretrained to load them in 4 bits
    assert list((Path(os.environ["FINSFT_CACHE"]) / "random").glob("*/config.json"))


def test_random_weights_needs_a_readable_config(make_recipe: Any, tmp_path: Path) -> None:
    from finsft.bench import _check_config
    from finsft.errors import ModelLoadError
    from finsft.models import resolve_model

    for ref in ("some-org/unknown-model", str(tmp_path)):  # a hub id without a shipped config; an empty folder
        recipe = load_recipe(str(make_recipe(model={"name_or_path": ref})))
        with pytest.raises(ModelLoadError, match=r"google/gemma-2b.*config\.json"):
            _check_config(recipe, resolve_model(recipe, log=print, random_weights=True))


# ------------------------------------------------------------------------------------------ speed benchmark


@pytest.mark.slow
def test_speed_benchmark_short_run(tmp_path: Path, tiny_model: Path) -> None:
    """finsft bench and the hand-written TRL script on the same rows (the data-prep part is covered by
    tests/test_dataprep_speed.py; it is skipped here to keep the run short)."""
    out = tmp_path / "speed.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "speed.py"), "--models", "tiny",
                           "--tiny-model", str(tiny_model), "--steps", "2", "--warmup", "1", "--repeats", "1",
                           "--rows", "600", "--no-baseline", "--no-prep", "--json", str(out),
                           "--workdir", str(tmp_path / "work")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())
    (tiny,) = results["models"]
    d = tiny["defaults"]
    assert d["finsft_tokens_per_s"] > 0 and d["trl_tokens_per_s"] > 0
    assert d["finsft_over_trl"] == pytest.approx(d["finsft_tokens_per_s"] / d["trl_tokens_per_s"], rel=1e-2)
    assert d["finsft_over_trl_cpu"] == pytest.approx(d["finsft_tokens_per_cpu_s"] / d["trl_tokens_per_cpu_s"],
                                                     rel=1e-2)
    run = tiny["runs"][0]
    assert run["finsft"]["defaults"]["timed_tokens"] == run["trl"]["defaults"]["timed_tokens"]  # same rows
    assert "| tiny | finsft defaults" in proc.stdout
