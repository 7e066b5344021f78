"""The LM head only where labels are supervised (training.supervised_lm_head): the same loss (to 1e-5), the same
gradients and the same TRL metrics (entropy, mean_token_accuracy) as the full-logits path, on the tiny model's real
batches: LoRA with padded batches, LoRA with padding-free packed rows, QLoRA 4-bit (bitsandbytes on the CPU), and a
full fine-tune (the head's own gradient). In process, one forward/backward per path; no training run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from finsft.bench import prepare_bench_data
from finsft.models import load_training_model, model_shape, resolve_model
from finsft.plan import Hardware, get_sft_config, plan_run
from finsft.recipe import load_recipe
from finsft.training.trainer import build_trainer, lm_head_positions

CPU = Hardware(device="cpu", name="test", bf16=False, tf32=False, memory_bytes=None, flash_attn=False, liger=False)


def _trainer(make_recipe: Any, tmp_path: Path, **sections: Any) -> Any:
    recipe = load_recipe(str(make_recipe(**sections)))
    source = resolve_model(recipe, log=lambda m: None)
    plan = plan_run(recipe, CPU, model_shape(source))
    assert plan.supervised_lm_head is True  # "auto" on the CPU
    data = prepare_bench_data(recipe, source, steps=1, warmup=0, random_weights=False, workdir=tmp_path,
                              shared={}, log=lambda m: None)
    torch.manual_seed(0)
    model = load_training_model(source, recipe, plan)
    args = get_sft_config(recipe, plan, str(tmp_path / "checkpoints"))
    trainer = build_trainer(recipe, model, args, data.tokenizer, data.rows,
                            supervised_lm_head=plan.supervised_lm_head)
    trainer.model.train()
    return trainer


def _batch(trainer: Any) -> dict[str, Any]:
    batch = next(iter(trainer.get_train_dataloader()))
    return trainer._prepare_inputs(batch)  # type: ignore[no-any-return]


def _step(trainer: Any, batch: dict[str, Any], supervised: bool | None,
          num_items: Any = None) -> tuple[float, dict[str, torch.Tensor], dict[str, float]]:
    """Loss, gradients of the trainable parameters and TRL's logged metrics of one forward/backward."""
    model = trainer.model
    model.zero_grad(set_to_none=True)
    for v in trainer._metrics["train"].values():
        v.clear()
    trainer.supervised_lm_head = supervised  # the plan's choice, as build_trainer passes it
    loss = trainer.compute_loss(model, dict(batch), num_items_in_batch=num_items)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None for g in grads.values())
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items() if k in ("entropy", "mean_token_accuracy")}
    return float(loss.detach()), grads, metrics


def _reference_loss(trainer: Any, batch: dict[str, Any], num_items: Any = None) -> float:
    """The model's own forward with labels: full logits and transformers' ForCausalLMLoss."""
    with torch.no_grad():
        out = trainer.model(**{k: v for k, v in batch.items() if k != "labels"}, labels=batch["labels"],
                            use_cache=False, **({"num_items_in_batch": num_items} if num_items is not None else {}))
    return float(out.loss)


CASES = {
    "lora": {},
    "lora-packed": {"training": {"packing": True}},
    "qlora-4bit": {"quantization": {"load_in_4bit": True}},
    "full": {"lora": None},
}


@pytest.mark.parametrize("case", list(CASES))
def test_supervised_positions_give_the_full_logits_loss_gradients_and_metrics(
        make_recipe: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str) -> None:
    trainer = _trainer(make_recipe, tmp_path, **CASES[case])
    batch = _batch(trainer)
    labels = batch["labels"][:, 1:]
    supervised = int((labels != -100).sum())
    assert 0 < supervised < labels.numel() // 4  # completion-only: most positions are prompt (or padding)
    if case == "lora-packed":
        assert batch["input_ids"].shape[0] == 1 and "position_ids" in batch and "attention_mask" not in batch

    seen: list[int] = []  # positions projected through the head, per call
    import trl.trainer.utils as trl_utils

    chunked = trl_utils._ChunkedLogProbFunction

    class Counting:
        @staticmethod
        def apply(hidden: torch.Tensor, *args: Any) -> Any:
            seen.append(hidden.shape[0])
            return chunked.apply(hidden, *args)

    monkeypatch.setattr(trl_utils, "_ChunkedLogProbFunction", Counting)
    full_loss, full_grads, full_metrics = _step(trainer, batch, False)
    fast_loss, fast_grads, fast_metrics = _step(trainer, batch, True)
    # the full path projects every position, the fast one only the supervised ones
    assert seen == [labels.numel(), supervised]

    assert fast_loss == pytest.approx(full_loss, abs=1e-5)
    assert fast_loss == pytest.approx(_reference_loss(trainer, batch), abs=1e-5)
    for name, g in full_grads.items():
        torch.testing.assert_close(fast_grads[name], g, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
    assert set(fast_metrics) == {"entropy", "mean_token_accuracy"}
    for key, value in full_metrics.items():
        assert fast_metrics[key] == pytest.approx(value, abs=1e-5), key


def test_num_items_in_batch_reduces_like_gradient_accumulation(make_recipe: Any, tmp_path: Path) -> None:
    """Under gradient accumulation the Trainer passes the supervised-token count of the whole accumulated batch:
    the loss is the sum over this micro-batch divided by it, as transformers' ForCausalLMLoss does."""
    trainer = _trainer(make_recipe, tmp_path)
    batch = _batch(trainer)
    supervised = int((batch["labels"][:, 1:] != -100).sum())
    total = torch.tensor(3 * supervised)  # as if two more micro-batches of the same size followed
    fast, _, _ = _step(trainer, batch, True, num_items=total)
    full, _, _ = _step(trainer, batch, False, num_items=total)
    mean, _, _ = _step(trainer, batch, True)
    assert fast == pytest.approx(full, abs=1e-6)
    assert fast == pytest.approx(_reference_loss(trainer, batch, total), abs=1e-6)
    assert fast == pytest.approx(mean / 3, rel=1e-5)


def test_the_choice_is_scoped_to_the_trainer_and_restored() -> None:
    import trl.trainer.utils as trl_utils

    original = trl_utils._use_triton
    cpu = torch.device("cpu")
    assert original(cpu) is False  # TRL's own choice off Triton devices: every position
    with lm_head_positions(True):
        assert trl_utils._use_triton(cpu) is True
    assert trl_utils._use_triton is original
    with lm_head_positions(None):
        assert trl_utils._use_triton is original
    with pytest.raises(RuntimeError), lm_head_positions(False):
        assert trl_utils._use_triton(cpu) is False
        raise RuntimeError
    assert trl_utils._use_triton is original


def test_a_trl_without_the_fused_head_hook_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    import trl.trainer.utils as trl_utils

    from finsft.errors import FinsftError
    from finsft.training.trainer import check_lm_head_hook

    check_lm_head_hook()  # the installed TRL has it
    monkeypatch.delattr(trl_utils, "_use_triton")
    with pytest.raises(FinsftError, match=r"trl >= 1\.16.*supervised_lm_head=false"):
        check_lm_head_hook()
