"""Real training runs of the tiny model through ``finsft.train.train``: LoRA, QLoRA 4-bit, 8-bit, full fine-tune,
every built-in template, a declarative template, chat templates, packing, completion-only masking, the output
folder contract, and save -> reload -> generate with identical logits.

The trainer a run builds is recorded by wrapping ``SFTTrainer.train`` (the wrapper calls the real method), so tests
can inspect the trained model and the batches TRL really collates.
"""

from __future__ import annotations

import itertools
import json
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import INVENTED_TRAIN

from finsft.errors import FinsftError, ModelLoadError
from finsft.recipe import load_recipe
from finsft.testing import write_jsonl
from finsft.training import train

pytestmark = pytest.mark.slow

PROMPT = "Instruction: What is the sentiment of this news?\nInput: Shares rose after earnings\nAnswer:"
FAST = {"warmup_steps": 0, "lr_scheduler_type": "constant"}  # every step moves the weights


@pytest.fixture
def trainers(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """The SFTTrainer objects that train() runs, in order."""
    from trl import SFTTrainer

    seen: list[Any] = []
    original = SFTTrainer.train

    def recording_train(self: Any, *args: Any, **kwargs: Any) -> Any:
        seen.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(SFTTrainer, "train", recording_train)
    return seen


@pytest.fixture(scope="module")
def tokenizer(tiny_model: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


def run(make_recipe: Any, name: str = "recipe", **sections: Any) -> Path:
    sections.setdefault("training", {})
    sections["training"] = {**FAST, **sections["training"]}
    return train(load_recipe(str(make_recipe(name, **sections))))


def first_batch(trainer: Any) -> dict[str, torch.Tensor]:
    return next(iter(trainer.get_train_dataloader()))


def logits(model: Any, tokenizer: Any, text: str = PROMPT) -> torch.Tensor:
    model.eval()
    enc = tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        return model(**enc).logits.float()


def base_model(tiny_model: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)


def loss_records(out: Path) -> list[dict[str, Any]]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "loss" in r]


# ------------------------------------------------------------------------------------------- LoRA + contract


def test_lora_run_writes_the_output_folder_contract(make_recipe: Any, trainers: list[Any], tiny_model: Path,
                                                    tokenizer: Any) -> None:
    from peft import PeftModel

    out = run(make_recipe)
    # artifacts
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "recipe.json", "metrics.jsonl", "loss.png", "manifest.json"):
        assert (out / name).is_file(), name
    assert not out.with_name(out.name + ".partial").exists()
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # recipe.json is the fully resolved recipe: defaults filled in
    saved = json.loads((out / "recipe.json").read_text())
    assert saved == load_recipe(str(out.parent / "recipe.json")).config
    assert saved["training"]["seed"] == 42 and saved["lora"]["target_modules"] == "all-linear"
    # metrics: one loss record per logged step
    losses = loss_records(out)
    assert [r["step"] for r in losses] == [1, 2]
    assert all(r["loss"] > 0 and r["tokens_per_s"] > 0 for r in losses)
    # manifest
    manifest = json.loads((out / "manifest.json").read_text())
    for lib in ("torch", "transformers", "trl", "peft", "datasets", "accelerate", "bitsandbytes"):
        assert manifest["libraries"][lib] == version(lib)
    assert manifest["hardware"]["device"] == "cpu" and manifest["hardware"]["world_size"] == 1
    assert len(manifest["data"]["fingerprint"]) == 16 and manifest["data"]["train_rows"] == 32
    assert manifest["train"]["global_step"] == 2 and manifest["train"]["train_loss"] > 0
    assert 0 < manifest["wall_seconds"] < 600
    assert {p["setting"] for p in manifest["plan"]} >= {"training.precision", "training.packing",
                                                         "training.supervised_lm_head"}
    adapter_cfg = json.loads((out / "adapter_config.json").read_text())
    assert adapter_cfg["r"] == 4 and adapter_cfg["lora_alpha"] == 8

    # save -> reload -> the same logits; training changed the model; generate produces tokens
    [trainer] = trainers
    assert trainer.supervised_lm_head is True  # the plan's choice reached the trainer (CPU: supervised positions)
    trained = logits(trainer.model, tokenizer)
    reloaded = PeftModel.from_pretrained(base_model(tiny_model), out)
    assert torch.allclose(logits(reloaded, tokenizer), trained, atol=1e-5)
    assert not torch.allclose(logits(base_model(tiny_model), tokenizer), trained, atol=1e-4)
    enc = tokenizer(PROMPT, return_tensors="pt")
    generated = reloaded.generate(**enc, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert generated.shape[1] > enc["input_ids"].shape[1]


def test_same_data_fingerprint_for_the_same_data(make_recipe: Any) -> None:
    a = json.loads((run(make_recipe, "a", training={"max_steps": 1}) / "manifest.json").read_text())
    b = json.loads((run(make_recipe, "b", training={"max_steps": 1}) / "manifest.json").read_text())
    c = json.loads((run(make_recipe, "c", training={"max_steps": 1}, data={"max_samples": 16}) /
                    "manifest.json").read_text())
    assert a["data"]["fingerprint"] == b["data"]["fingerprint"] != c["data"]["fingerprint"]


# ----------------------------------------------------------------------------------------------- quantized


def test_qlora_4bit_nf4_double_quant(make_recipe: Any, trainers: list[Any]) -> None:
    import bitsandbytes as bnb

    out = run(make_recipe, quantization={"load_in_4bit": True})
    [trainer] = trainers
    quantized = [m for m in trainer.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantized) == 2 * 7  # q, k, v, o, gate, up, down in both layers; not the output head
    for m in quantized:
        assert m.weight.quant_state.quant_type == "nf4"
        assert m.weight.quant_state.nested  # double quantization
    lora = [n for n, _ in trainer.model.named_modules() if n.endswith("lora_A")]
    assert len(lora) == 14
    assert (out / "adapter_model.safetensors").is_file() and not (out / "model.safetensors").exists()
    assert all(r["loss"] == r["loss"] for r in loss_records(out))  # finite, not NaN


def test_qlora_fp4_without_double_quant(make_recipe: Any, trainers: list[Any]) -> None:
    import bitsandbytes as bnb

    run(make_recipe, quantization={"load_in_4bit": True, "bnb_4bit_quant_type": "fp4",
                                   "bnb_4bit_use_double_quant": False}, training={"max_steps": 1})
    quantized = [m for m in trainers[0].model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert quantized and all(m.weight.quant_state.quant_type == "fp4" and not m.weight.quant_state.nested
                             for m in quantized)


def test_8bit(make_recipe: Any, trainers: list[Any]) -> None:
    import bitsandbytes as bnb

    out = run(make_recipe, quantization={"load_in_8bit": True})
    assert len([m for m in trainers[0].model.modules() if isinstance(m, bnb.nn.Linear8bitLt)]) == 14
    assert (out / "adapter_model.safetensors").is_file()
    assert len(loss_records(out)) == 2


# ---------------------------------------------------------------------------------------------- full tune


def test_full_fine_tune_saves_the_whole_model(make_recipe: Any, trainers: list[Any], tiny_model: Path,
                                              tokenizer: Any) -> None:
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    out = run(make_recipe, lora=None, training={"learning_rate": 1e-4})
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    assert not (out / "adapter_config.json").exists()
    trained = load_file(out / "model.safetensors")
    base = load_file(tiny_model / "model.safetensors")
    assert trained.keys() == base.keys()
    changed = [k for k in base if not torch.equal(trained[k], base[k])]
    assert len(changed) > len(base) // 2  # every weight trains, not an adapter
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert torch.allclose(logits(reloaded, tokenizer), logits(trainers[0].model, tokenizer), atol=1e-5)


# ------------------------------------------------------------------------------------------------ templates


def completions_in(trainer: Any, tokenizer: Any) -> list[str]:
    """The text of the tokens that carry loss, per training row TRL prepared."""
    ds = trainer.train_dataset
    return [tokenizer.decode([t for t, lab in zip(row["input_ids"], row["labels"], strict=True) if lab != -100])
            for row in ds]


@pytest.mark.parametrize("template", ["fingpt_sentiment", "short_sentiment", "custom"])
def test_classification_templates_train_on_the_label_only(make_recipe: Any, trainers: list[Any], tokenizer: Any,
                                                         template: str) -> None:
    section: dict[str, Any] = {"name": template}
    if template == "custom":
        section.update(prompt="Headline: {input}\nMood:", completion=" {output}", labels="fingpt3")
    out = run(make_recipe, template=section, training={"max_steps": 1})
    rows = [json.loads(line) for line in INVENTED_TRAIN.read_text().splitlines()]
    # fingpt_sentiment tokenizes the label apart after "Answer: " as a word; the others continue the prompt: either
    # way the loss covers " <label></s>"
    outputs = {f" {r['output']}{tokenizer.eos_token}" for r in rows}
    texts = completions_in(trainers[0], tokenizer)
    assert len(texts) == 32 and set(texts) <= outputs
    prompt = tokenizer.decode(trainers[0].train_dataset[0]["input_ids"])
    expected_start = {"fingpt_sentiment": "<s>Instruction: ", "short_sentiment": "<s>", "custom": "<s>Headline: "}
    assert prompt.startswith(expected_start[template])
    assert json.loads((out / "recipe.json").read_text())["template"]["name"] == template


def test_fiqa_qa_on_a_local_qa_file(make_recipe: Any, trainers: list[Any], tokenizer: Any, tmp_path: Path) -> None:
    qa = [{"input": f"What does ratio {i} measure?", "output": f"Ratio {i} compares earnings with price."}
          for i in range(8)]
    path = write_jsonl(tmp_path / "qa.jsonl", qa)
    out = run(make_recipe, template={"name": "fiqa_qa"}, data={"path": str(path)}, training={"max_steps": 1})
    texts = completions_in(trainers[0], tokenizer)
    assert sorted(texts) == sorted(f" {r['output']}{tokenizer.eos_token}" for r in qa)
    assert tokenizer.decode(trainers[0].train_dataset[0]["input_ids"]).startswith(
        "<s>Instruction: Utilize your financial knowledge")
    assert (out / "adapter_model.safetensors").is_file()


def test_chat_template_trains_the_end_of_turn_token(make_recipe: Any, trainers: list[Any], tokenizer: Any) -> None:
    run(make_recipe, template={"chat_template": True, "system": "You are a financial analyst."},
        training={"max_steps": 1})
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    batch = first_batch(trainers[0])
    for ids, labels in zip(batch["input_ids"], batch["labels"], strict=True):
        loss_ids = ids[labels != -100].tolist()
        assert end in loss_ids  # the model learns to close its turn
        assert tokenizer.decode(loss_ids).split("<|im_end|>")[0].strip() in ("negative", "neutral", "positive")
        prompt_ids = ids[(labels == -100) & (ids != tokenizer.pad_token_id)].tolist()
        prompt = tokenizer.decode(prompt_ids)
        assert prompt.startswith("<|im_start|>system\nYou are a financial analyst.<|im_end|>")
        assert prompt.endswith("<|im_start|>assistant\n")


# ------------------------------------------------------------------------------------------------- masking


def test_completion_only_loss_masks_everything_but_the_answer_and_eos(make_recipe: Any, trainers: list[Any],
                                                                      tokenizer: Any) -> None:
    run(make_recipe, training={"max_steps": 1})
    batch = first_batch(trainers[0])
    # FinGPT's prompt ends in "Answer: "; the label follows as a word, tokenized apart, then EOS
    answers = {tuple(tokenizer(f" {label}{tokenizer.eos_token}", add_special_tokens=False)["input_ids"])
               for label in ("negative", "neutral", "positive")}
    for ids, mask, labels in zip(batch["input_ids"], batch["attention_mask"], batch["labels"], strict=True):
        n = int(mask.sum())
        assert mask[:n].all() and not mask[n:].any()  # right padding
        carrying = (labels != -100).nonzero().flatten().tolist()
        k = len(carrying)
        assert carrying == list(range(n - k, n))  # one contiguous run at the end of the real tokens
        assert tuple(ids[n - k:n].tolist()) in answers  # exactly "<label></s>"
        assert torch.equal(labels[n - k:n], ids[n - k:n])  # labels are the ids (the model shifts them)
        prompt = tokenizer.decode(ids[:n - k])
        assert prompt.startswith("<s>Instruction: ") and prompt.endswith("\nAnswer: ")


def test_completion_only_loss_false_trains_on_every_token(make_recipe: Any, trainers: list[Any]) -> None:
    run(make_recipe, template={"completion_only_loss": False}, training={"max_steps": 1})
    batch = first_batch(trainers[0])
    real = batch["attention_mask"].bool()
    assert torch.equal(batch["labels"][real], batch["input_ids"][real])
    assert (batch["labels"][~real] == -100).all()


@pytest.mark.parametrize("packing", [True, False])
def test_packing_on_and_off(make_recipe: Any, trainers: list[Any], tokenizer: Any, packing: bool) -> None:
    out = run(make_recipe, training={"packing": packing, "max_length": 128})
    trainer = trainers[0]
    batch = first_batch(trainer)
    carrying = batch["labels"] != -100
    if packing:
        assert "seq_lengths" in trainer.train_dataset.column_names
        assert batch["input_ids"].shape[0] == 1  # padding-free: one packed row
        assert "position_ids" in batch
        starts = int((batch["position_ids"][0] == 0).sum())
        assert starts >= 4  # several examples, each restarting its positions
        # every packed example still carries loss on its label + EOS only
        eos = int(((batch["input_ids"] == tokenizer.eos_token_id) & carrying).sum())
        assert eos == starts
        assert_no_attention_across_examples(trainer, batch)
    else:
        assert batch["input_ids"].shape[0] == 4
    assert 0 < int(carrying.sum()) < batch["input_ids"].numel() // 4
    assert len(loss_records(out)) == 2


def assert_no_attention_across_examples(trainer: Any, batch: dict[str, torch.Tensor]) -> None:
    """The loss the trainer computes on a packed row equals the loss of its examples run one by one."""
    model = trainer.model.eval()
    positions = batch["position_ids"][0]
    bounds = [*(positions == 0).nonzero().flatten().tolist(), len(positions)]
    total, count = 0.0, 0
    with torch.no_grad():
        packed = float(trainer.compute_loss(model, dict(batch)))
        for start, end in itertools.pairwise(bounds):
            ids, labels = batch["input_ids"][:, start:end], batch["labels"][:, start:end]
            logits = model(input_ids=ids, use_cache=False).logits[0, :-1]
            target = labels[0, 1:]
            keep = target != -100
            total += float(torch.nn.functional.cross_entropy(logits[keep], target[keep], reduction="sum"))
            count += int(keep.sum())
    assert packed == pytest.approx(total / count, abs=1e-4)


# ------------------------------------------------------------------------------------- validation, eval


def test_validation_loss_and_task_evaluation(make_recipe: Any) -> None:
    out = run(make_recipe, data={"max_samples": 24, "validation_size": 8}, training={"eval_steps": 1},
              evaluation={"max_samples": 6, "batch_size": 6})
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "eval_loss" in r] == [1, 2]
    result = json.loads((out / "eval.json").read_text())
    assert result["settings"]["scorer"] == "likelihood" and 0 <= result["metrics"]["accuracy"] <= 1
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 6


# ---------------------------------------------------------------------------------------------- failures


def test_a_model_that_cannot_load_leaves_no_partial_folder(make_recipe: Any) -> None:
    recipe = load_recipe(str(make_recipe(model={"name_or_path": "finsft-test/no-such-model"})))
    with pytest.raises(ModelLoadError, match="finsft-test/no-such-model"):
        train(recipe)
    out = Path(recipe["output"]["dir"])
    assert not out.exists()
    # the next attempt fails the same way, not with "an interrupted run is in ...partial"
    with pytest.raises(ModelLoadError):
        train(recipe)
    assert not out.exists()


def test_a_data_error_does_not_block_the_next_run(make_recipe: Any, tmp_path: Path) -> None:
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"input": "Shares rose", "output": "bullish"}])
    with pytest.raises(FinsftError, match="bullish"):  # found by the preflight, before the output folder
        run(make_recipe, data={"path": str(bad)})
    out = run(make_recipe, training={"max_steps": 1})  # same output.dir, no --overwrite needed
    assert (out / "adapter_model.safetensors").is_file()
