"""TRL's SFTTrainer as finsft builds it (also used by ``finsft bench``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from finsft.plan import get_peft_config
from finsft.recipe import Recipe
from finsft.training.tracking import add_training_callbacks


def build_trainer(recipe: Recipe, model: Any, args: Any, tokenizer: Any, train_ds: Any, val_ds: Any = None,
                  callbacks: Sequence[Any] = ()) -> Any:
    """TRL's SFTTrainer as finsft trains with it (the recipe's LoRA), without TRL's console printer. ``callbacks``
    run before finsft's own (early stopping reads the metrics they add)."""
    from transformers.trainer_callback import PrinterCallback
    from trl import SFTTrainer

    trainer = SFTTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=val_ds,
                         processing_class=tokenizer, peft_config=get_peft_config(recipe))
    trainer.remove_callback(PrinterCallback)
    for callback in callbacks:
        trainer.add_callback(callback)
    add_training_callbacks(trainer, recipe)  # early stopping; trackers' log folder and the recipe as their config
    return trainer


def model_is_sharded(trainer: Any) -> bool:
    """FSDP and DeepSpeed ZeRO-3 split the weights across processes: a forward pass needs every process."""
    if getattr(trainer, "is_fsdp_enabled", False):
        return True
    if getattr(trainer, "is_deepspeed_enabled", False):
        plugin = trainer.accelerator.state.deepspeed_plugin
        return plugin is not None and plugin.zero_stage == 3
    return False


