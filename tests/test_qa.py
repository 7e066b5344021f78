"""Question answering end to end: the answer perplexity against a hand computation with the model's own loss, the
shipped FiQA QLoRA recipe, a 4-bit QLoRA run on the tiny model that writes the QA metrics before and after training
with side-by-side samples, and 4-bit layers that stay trainable after an evaluation."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO

RECIPE = REPO / "recipes" / "fiqa_smollm2_qlora.json"
QA_ROWS = [
    {"instruction": "Answer the question.", "input": "Should I pay off my mortgage early?",
     "output": "It depends on the rate: paying it off is a risk-free return equal to the mortgage rate."},
    {"instruction": "Answer the question.", "input": "What is a dividend?", "output": "A share of the profits."},
    {"instruction": "Answer the question.", "input": "How are index funds taxed when they rebalance?",
     "output": "Rebalancing inside the fund can realise gains, which are passed on to holders as distributions "
               "and taxed in the year they are paid, even if you reinvest them."},
]


@pytest.fixture(scope="module")
def qa_model(tiny_model: Path) -> Any:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finsft.data import Formatter
    from finsft.templates import get_template

    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    return model, Formatter(get_template("fiqa_qa"), tok, chat=False, system=None)


def test_answer_perplexity_is_the_models_loss_on_answer_tokens(qa_model: Any) -> None:
    """Hand computation: for each row, the model's own loss with labels on the completion only (prompt -100),
    weighted by its number of answer tokens; the scorer pads, batches and sorts rows by length."""
    import torch

    from finsft.data import encode_continuation, encode_prompt
    from finsft.evaluation.scorers import answer_loss

    model, formatter = qa_model
    tok = formatter.tokenizer
    total, count = 0.0, 0
    for row in QA_ROWS:
        prompt = encode_prompt(tok, [formatter.prompt(row)], chat=False)[0]
        answer = encode_continuation(tok, [formatter.completion(row)])[0]
        assert answer[-1] == tok.eos_token_id  # the end of the answer counts, as in training
        labels = torch.tensor([[-100] * len(prompt) + answer])
        with torch.no_grad():
            loss = model(input_ids=torch.tensor([prompt + answer]), labels=labels).loss
        total += float(loss) * len(answer)  # the loss is a mean over the answer tokens of this row
        count += len(answer)
    got = answer_loss(model, formatter, QA_ROWS, batch_size=2, max_length=None)
    assert got["answer_tokens"] == count
    assert got["answer_loss"] == pytest.approx(total / count, rel=1e-5)
    assert got["answer_perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)

    # max_length cuts rows as training does: fewer answer tokens are scored
    cut = answer_loss(model, formatter, QA_ROWS, batch_size=3, max_length=48)
    assert 0 < cut["answer_tokens"] < count


def test_evaluate_model_qa_metrics_and_generation_subset(qa_model: Any) -> None:
    from finsft.evaluation import evaluate_model

    model, formatter = qa_model
    result = evaluate_model(model, formatter, QA_ROWS, scorer="generate", batch_size=2, max_new_tokens=4,
                            generate_samples=2)
    m = result.metrics
    assert m["n"] == 2 and len(result.predictions) == 2  # generations: the first two rows only
    assert m["answer_tokens"] > 0 and m["answer_perplexity"] == pytest.approx(math.exp(m["answer_loss"]))
    assert m["mean_reference_words"] == pytest.approx((17 + 5) / 2)
    assert m["length_ratio"] == pytest.approx(m["mean_generated_words"] / m["mean_reference_words"])
    assert [p["input"] for p in result.predictions] == [r["input"] for r in QA_ROWS[:2]]


def test_side_by_side_pairs_before_and_after() -> None:
    from finsft.evaluation.report import side_by_side

    before = [{"input": f"q{i}", "reference": f"r{i}", "answer": f"b{i}"} for i in range(8)]
    after = [{"input": f"q{i}", "reference": f"r{i}", "answer": f"a{i}"} for i in range(8)]
    samples = side_by_side(before, after)
    assert samples == [{"input": f"q{i}", "reference": f"r{i}", "before": f"b{i}", "after": f"a{i}"}
                       for i in range(5)]
    assert side_by_side(None, after) is None
    assert side_by_side([{"input": "q", "gold": "x", "pred": "x", "answer": "x"}],
                        [{"input": "q", "gold": "x", "pred": "x", "answer": "x"}]) is None  # classification


def test_shipped_recipe_validates_without_torch() -> None:
    import subprocess
    import sys

    code = ("import sys; from finsft.recipe import load_recipe; r = load_recipe(sys.argv[1]); "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules; print(r.config['template'])")
    proc = subprocess.run([sys.executable, "-c", code, str(RECIPE)], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    recipe = json.loads(RECIPE.read_text())
    q = recipe["quantization"]
    assert q["load_in_4bit"] and q["bnb_4bit_quant_type"] == "nf4" and q["bnb_4bit_use_double_quant"]
    assert recipe["template"]["name"] == "fiqa_qa" and recipe["lora"]
    assert recipe["evaluation"]["before_training"] and recipe["evaluation"]["scorer"] == "generate"
    for key in (recipe["data"]["path"], recipe["evaluation"]["path"]):
        assert (RECIPE.parent / key).is_file()
    assert "FinGPT/fingpt-fiqa_qa" in recipe["description"]


@pytest.mark.slow
def test_4bit_layers_stay_trainable_after_an_evaluation(tiny_model: Path) -> None:
    """bitsandbytes repacks 4-bit weights for its CPU inference kernel (no backward) on an eval-mode forward
    without gradients; a model loaded for training must not keep that layout for its next training step."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from finsft.models import keep_4bit_layout_trainable

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, quantization_config=quant, dtype=torch.float32)
    keep_4bit_layout_trainable(model)
    ids = torch.tensor([[1, 5, 9, 13, 17, 21]])
    model.eval()
    with torch.inference_mode():
        model(input_ids=ids)
    layers = [m for m in model.modules() if hasattr(m, "support_avx512bf16_for_cpu")]
    assert layers and not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)
    model.train()
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "an autograd kernel was not registered" would be a UserWarning
        model(inputs_embeds=embeds, labels=ids).loss.backward()
    assert embeds.grad is not None and float(embeds.grad.abs().sum()) > 0  # gradients pass the frozen 4-bit layers


@pytest.mark.slow
def test_qlora_run_writes_qa_metrics_before_and_after(make_recipe: Any, tmp_path: Path) -> None:
    from finsft.recipe import load_recipe
    from finsft.training import train

    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in QA_ROWS * 4))
    path = make_recipe(quantization={"load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
                                     "bnb_4bit_use_double_quant": True},
                       data={"path": str(data), "max_samples": 8}, template={"name": "fiqa_qa"},
                       evaluation={"path": str(data), "max_samples": 3, "generate_samples": 2, "max_new_tokens": 4,
                                   "batch_size": 2, "before_training": True})
    run = train(load_recipe(str(path)))
    report = json.loads((run / "eval.json").read_text())
    for metrics in (report["base_metrics"], report["metrics"]):
        assert metrics["answer_perplexity"] > 1 and 0 <= metrics["rougeL"] <= 1 and metrics["n"] == 2
        assert metrics["answer_tokens"] > 0 and "mean_generated_words" in metrics
    assert report["metrics"]["answer_perplexity"] != report["base_metrics"]["answer_perplexity"]  # it trained
    assert report["settings"]["generate_samples"] == 2 and report["settings"]["max_length"] == 128
    assert len(report["samples"]) == 2 and {s["input"] for s in report["samples"]} <= {r["input"] for r in QA_ROWS}
    assert all(set(s) == {"input", "reference", "before", "after"} for s in report["samples"])
    assert json.loads((run / "manifest.json").read_text())["train"]["global_step"] == 2
