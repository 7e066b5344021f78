"""Shared fixtures: a tiny random Llama with a real BPE tokenizer (built once per session, no hub), small
sentiment files of INVENTED headlines (tests/fixtures/invented_headlines_*.jsonl: fictional companies, written
for the tests, not real data), and a helper that writes recipes."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
# Invented headlines (fictional companies) in FinGPT's sentiment format: 260 train, 80 test. Test data only; the
# real data shipped for the quickstart is the TFNS subset in recipes/data (see its README.md).
INVENTED_TRAIN = REPO / "tests" / "fixtures" / "invented_headlines_train.jsonl"
INVENTED_TEST = REPO / "tests" / "fixtures" / "invented_headlines_test.jsonl"
SHARED_DATA = REPO.parent / "shared" / "data"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """finsft's cache (converted GGUF models, tokenized data) in a per-session temp folder."""
    monkeypatch.setenv("FINSFT_CACHE", str(tmp_path_factory.getbasetemp() / "finsft-cache"))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder of a tiny random LlamaForCausalLM + BPE tokenizer with a ChatML chat template."""
    from finsft.testing import build_tiny_model

    texts = [json.loads(line)["input"] for line in INVENTED_TRAIN.read_text().splitlines()]
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"), texts=texts)


def deep_update(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            deep_update(base[k], v)
        else:
            base[k] = v
    return base


@pytest.fixture
def make_recipe(tmp_path: Path, tiny_model: Path):  # type: ignore[no-untyped-def]
    """make_recipe(**sections) -> path of a recipe training the tiny model on the invented headlines for a few
    steps; keyword arguments deep-merge over the defaults (pass lora=None for a full fine-tune)."""

    def make(name: str = "recipe", **sections: Any) -> Path:
        recipe: dict[str, Any] = {
            "name": "tiny",
            "model": {"name_or_path": str(tiny_model)},
            "lora": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0},
            "data": {"path": str(INVENTED_TRAIN), "max_samples": 32},
            "template": {"name": "fingpt_sentiment"},
            "training": {"max_steps": 2, "per_device_train_batch_size": 4, "learning_rate": 1e-3,
                         "logging_steps": 1, "max_length": 128},
            "output": {"dir": str(tmp_path / f"{name}-out")},
        }
        deep_update(recipe, sections)
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(recipe, indent=2))
        return path

    return make
