"""`finsft merge` and output.save_merged: the merged folder loads with AutoModelForCausalLM.from_pretrained and
computes what the adapter model computes, for a LoRA adapter and for a QLoRA (4-bit) one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import INVENTED_TRAIN

from finsft.cli import main


def _recipe(tiny_model: Path, out: Path, **extra: Any) -> dict[str, Any]:
    recipe: dict[str, Any] = {
        "name": "tiny-merge",
        "model": {"name_or_path": str(tiny_model)},
        # A large lr so the adapter moves the logits well away from the base model's.
        "lora": {"r": 4, "lora_alpha": 16, "lora_dropout": 0.0},
        "data": {"path": str(INVENTED_TRAIN), "max_samples": 16},
        "template": {"name": "fingpt_sentiment"},
        "training": {"max_steps": 2, "per_device_train_batch_size": 4, "learning_rate": 5e-2, "max_length": 128},
        "output": {"dir": str(out / "run"), "plot": False},
    }
    recipe.update(extra)
    return recipe


def _train(tiny_model: Path, folder: Path, **extra: Any) -> dict[str, Path]:
    from finsft.recipe import load_recipe
    from finsft.training import train

    path = folder / "recipe.json"
    path.write_text(json.dumps(_recipe(tiny_model, folder, **extra)))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FINSFT_CACHE", str(folder / "cache"))
        run = train(load_recipe(str(path)))
    return {"recipe": path, "run": run}


@pytest.fixture(scope="module")
def lora_run(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return _train(tiny_model, tmp_path_factory.mktemp("merge-lora"))


@pytest.fixture(scope="module")
def qlora_run(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A 4-bit NF4 QLoRA run that also saves the merged model (output.save_merged)."""
    out = tmp_path_factory.mktemp("merge-qlora")
    return _train(tiny_model, out, quantization={"load_in_4bit": True},
                  output={"dir": str(out / "run"), "plot": False, "save_merged": True})


PROMPTS = ["Instruction: What is the sentiment of this news?\nInput: Profit fell sharply.\nAnswer:",
           "The company raised its dividend."]


def _logits(model: Any, tokenizer: Any) -> list[Any]:
    import torch

    with torch.inference_mode():
        return [model(input_ids=tokenizer(p, return_tensors="pt")["input_ids"]).logits.float() for p in PROMPTS]


def _adapter_model(tiny_model: Path, run: Path, quantized: bool) -> Any:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs: dict[str, Any] = {"dtype": torch.float32}
    if quantized:
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                           bnb_4bit_use_double_quant=True,
                                                           bnb_4bit_compute_dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(tiny_model, **kwargs)
    model = PeftModel.from_pretrained(base, str(run))
    # In eval mode bitsandbytes runs 4-bit layers on CPU through its own inference kernel, which rounds
    # differently; in train mode (no dropout here) they compute as in training: de-quantize, then matmul.
    return model.train() if quantized else model.eval()


def _check_merged(tiny_model: Path, run: Path, merged: Path, quantized: bool) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(merged)
    plain = AutoModelForCausalLM.from_pretrained(merged).eval()
    assert not any("lora" in name for name, _ in plain.named_parameters())
    assert getattr(plain.config, "quantization_config", None) is None
    assert plain.dtype == torch.float32
    expected = _logits(_adapter_model(tiny_model, run, quantized), tok)
    got = _logits(plain, tok)
    base = _logits(AutoModelForCausalLM.from_pretrained(tiny_model).eval(), tok)
    for e, g, b in zip(expected, got, base, strict=True):
        assert torch.allclose(e, g, atol=1e-4), float((e - g).abs().max())
        assert float((e - b).abs().max()) > 1e-3  # the adapter changed the model: the check above means something
    report = json.loads((merged / "finsft_merge.json").read_text())
    assert report["dequantized_base"] is quantized
    assert report["max_abs_logit_diff"]["saved"] <= report["tolerance"]


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "finsft", *args], capture_output=True, text=True, env=env,
                          timeout=600)


@pytest.mark.slow
def test_merge_lora(tiny_model: Path, lora_run: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "merged"
    r = _cli("merge", str(lora_run["recipe"]), "--adapter", str(lora_run["run"]), "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "max |logit difference|" in r.stdout
    _check_merged(tiny_model, lora_run["run"], out, quantized=False)
    # the merged folder's model card, from the run's records, parsed by huggingface_hub
    from huggingface_hub import ModelCard

    card = ModelCard.load(out / "README.md")
    assert "finsft" in card.data.tags and card.data.library_name == "transformers"
    assert "merged into its base model" in card.text and "This run trained for" in card.text
    assert str(tmp_path.parent) not in card.content and 'AutoModelForCausalLM.from_pretrained("PATH/TO/THIS/FOLDER")' \
        in card.text
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".merged.tmp")]


@pytest.mark.slow
def test_merge_qlora_into_dequantized_base(tiny_model: Path, qlora_run: dict[str, Path], tmp_path: Path) -> None:
    from finsft.commands.merge import merge_command
    from finsft.recipe import load_recipe

    out = tmp_path / "merged"
    report = merge_command(load_recipe(str(qlora_run["recipe"])), adapter=str(qlora_run["run"]), out=str(out))
    assert report["dequantized_base"] is True and report["dtype"] == "float32"
    _check_merged(tiny_model, qlora_run["run"], out, quantized=True)


@pytest.mark.slow
def test_save_merged_after_qlora_training(tiny_model: Path, qlora_run: dict[str, Path]) -> None:
    _check_merged(tiny_model, qlora_run["run"], qlora_run["run"] / "merged", quantized=True)


@pytest.mark.slow
def test_merge_refuses_a_non_empty_out(lora_run: dict[str, Path], tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["merge", str(lora_run["recipe"]), "--adapter", str(lora_run["run"]), "--out", str(out)]) == 1
    assert "not empty" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    # An existing empty folder is fine.
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["merge", str(lora_run["recipe"]), "--adapter", str(lora_run["run"]), "--out", str(empty)]) == 0
    assert (empty / "config.json").exists()


def test_merge_needs_an_adapter(tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps(_recipe(tiny_model, tmp_path)))
    assert main(["merge", str(recipe), "--adapter", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 1
    assert "does not exist" in capsys.readouterr().err
    # A fully fine-tuned model folder has nothing to merge.
    assert main(["merge", str(recipe), "--adapter", str(tiny_model), "--out", str(tmp_path / "o")]) == 1
    assert "nothing to merge" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
