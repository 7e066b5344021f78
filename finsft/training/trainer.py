"""TRL's SFTTrainer as finsft builds it (also used by ``finsft bench``).

finsft's trainer is SFTTrainer with four additions, all through the Trainer's own hooks:

* the task metric (accuracy and F1 of a classification template) is computed inside each evaluation
  (``evaluation_loop``), so it is part of the metrics dict that ``Trainer.log`` hands to every ``report_to``
  integration (TensorBoard, W&B, MLflow...), to ``trainer_state.json``, to the best-checkpoint choice and to early
  stopping, exactly like ``eval_loss``;
* the scores before and after training go through ``Trainer.log`` too: before at the start of training (step 0,
  once the trackers have started), after at the final step; the trackers' end of run (``on_train_end``) waits
  for them (``end_tracking``);
* no model card stub: finsft writes the card of every output folder (TRL's ``checkpoints/README.md`` and PEFT's
  ``checkpoint-*/README.md`` are not written or are removed);
* the LM head where the plan says (``supervised_lm_head``): TRL 1.16's fused LM head (``add_fused_lm_head``) projects
  only the positions whose next-token label is not -100 on Triton devices (CUDA, XPU) and every position elsewhere
  (to keep tile shapes fixed for compilers such as Neuron's). On the CPU that is waste (eager kernels, no
  recompilation): a sentiment answer is 1-2 supervised tokens of ~60, and every position goes forward and backward
  through SmolLM2's 49,152-word head. With ``supervised_lm_head=True`` the same fused head scores only the supervised
  positions on every device (``compute_loss`` swaps TRL's per-call decision, ``trl.trainer.utils._use_triton``, for
  its duration: see :func:`lm_head_positions`); the loss, its reduction (``num_items_in_batch``) and TRL's ``entropy`` and
  ``mean_token_accuracy`` are unchanged, since TRL computes them on the supervised positions only either way.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from finsft.plan import get_peft_config
from finsft.recipe import Recipe
from finsft.training.tracking import add_training_callbacks, is_tracker

# model -> {"accuracy": ..., "macro_f1": ..., ...}: the task metric one evaluation adds (without its prefix)
TaskMetric = Callable[[Any], Mapping[str, float]]


def score_keys(phase: str, metrics: Mapping[str, Any], set_name: str | None = None) -> dict[str, float]:
    """Tracker keys of a set's headline scores ``before`` or ``after`` training: ``eval_before_weighted_f1`` for
    the main evaluation set, ``eval_<set>_after_accuracy`` for the others (transformers' ``eval_`` prefix, so
    TensorBoard and W&B show them under ``eval/`` next to ``eval/loss``)."""
    from finsft.evaluation.sets import summary

    prefix = f"eval_{set_name}_{phase}_" if set_name else f"eval_{phase}_"
    return {prefix + k: float(v) for k, v in summary(metrics).items()
            if k != "n" and isinstance(v, (int, float)) and not isinstance(v, bool)}


@contextlib.contextmanager
def lm_head_positions(supervised_only: bool | None) -> Iterator[None]:
    """Inside: TRL's fused LM head scores only the supervised positions (True), every position (False), or as TRL
    decides for the device (None: supervised positions on Triton devices only).

    TRL's fused forward decides per call with ``trl.trainer.utils._use_triton(device)`` (only that decision: the
    kernels' own choice between Triton and torch tiles reads ``trl.kernels.chunked_logprob._use_triton``, which is
    left alone). The decision is made in the forward pass; the backward reuses what the forward saved."""
    if supervised_only is None:
        yield
        return
    import trl.trainer.utils as trl_utils

    original = trl_utils._use_triton
    trl_utils._use_triton = lambda device: supervised_only
    try:
        yield
    finally:
        trl_utils._use_triton = original


def check_lm_head_hook() -> None:
    """FinsftError when the installed TRL has no fused LM head whose positions finsft can choose (TRL < 1.16)."""
    import trl.trainer.utils as trl_utils

    from finsft.errors import FinsftError

    if not (callable(getattr(trl_utils, "_use_triton", None)) and callable(getattr(trl_utils, "add_fused_lm_head",
                                                                                   None))):
        import trl

        raise FinsftError(f"training.supervised_lm_head needs TRL's fused LM head (trl >= 1.16; installed "
                          f"{trl.__version__}): upgrade TRL (pip install -U trl), or pin "
                          "training.supervised_lm_head=false")


@functools.cache
def trainer_class() -> type:
    """finsft's SFTTrainer subclass (built on first use: importing TRL is slow)."""
    from transformers import TrainerCallback
    from trl import SFTTrainer

    class LogAtStart(TrainerCallback):
        """Logs the scores before training at step 0, after every tracker has started (it is the last
        callback)."""

        def __init__(self, trainer: Any, logs: dict[str, float]):
            self.trainer, self.logs = trainer, logs

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if self.logs and state.global_step == 0:
                self.trainer.log(dict(self.logs))
            self.logs = {}

    class NoStubCards(TrainerCallback):
        """PEFT's save_pretrained writes a stub README.md into each checkpoint ("More Information Needed"):
        the checkpoint this run has just saved loses it."""

        def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.is_world_process_zero:
                card = Path(args.output_dir) / f"checkpoint-{state.global_step}" / "README.md"
                if card.is_file():
                    card.unlink()

    class FinsftTrainer(SFTTrainer):
        task_metric: TaskMetric | None = None

        def __init__(self, *args: Any, task_metric: TaskMetric | None = None,
                     supervised_lm_head: bool | None = None, **kwargs: Any):
            if supervised_lm_head:
                check_lm_head_hook()
            super().__init__(*args, **kwargs)
            self.task_metric = task_metric
            # True: the fused LM head scores only supervised positions on every device (see lm_head_positions)
            self.supervised_lm_head = supervised_lm_head
            self.scores_before: dict[str, float] = {}
            # True: the trackers' on_train_end waits for end_tracking (the caller logs scores after training)
            self.defer_tracker_end = False
            self._held_ends: list[Callable[[], Any]] = []
            self.add_callback(NoStubCards())

        def evaluation_loop(self, dataloader: Any, description: str, prediction_loss_only: bool | None = None,
                            ignore_keys: list[str] | None = None, metric_key_prefix: str = "eval") -> Any:
            output = super().evaluation_loop(dataloader, description, prediction_loss_only=prediction_loss_only,
                                             ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)
            if self.task_metric is not None and description == "Evaluation" and output.metrics is not None:
                # Trainer.evaluate logs this dict next, then hands it to on_evaluate and the best-model choice.
                output.metrics.update({f"{metric_key_prefix}_{k}": round(float(v), 6)
                                       for k, v in self.task_metric(self.model).items()})
            return output

        def compute_loss(self, model: Any, inputs: Any, return_outputs: bool = False,
                         num_items_in_batch: Any = None) -> Any:
            with lm_head_positions(self.supervised_lm_head):
                return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                            num_items_in_batch=num_items_in_batch)

        def create_model_card(self, *args: Any, **kwargs: Any) -> None:
            """finsft writes the model card of every output folder; TRL's draft ("fine-tuned version of None")
            is not written."""

        def train(self, *args: Any, **kwargs: Any) -> Any:
            if self.scores_before:
                self.add_callback(LogAtStart(self, self.scores_before))
            if self.defer_tracker_end:
                self._hold_tracker_ends()
            return super().train(*args, **kwargs)

        def _hold_tracker_ends(self) -> None:
            """The trackers close their run at on_train_end; the scores after training come later (after the
            adapter is saved and scored), so their on_train_end waits for ``end_tracking``."""
            for cb in self.callback_handler.callbacks:
                if is_tracker(cb) and "on_train_end" not in vars(cb):
                    end = cb.on_train_end

                    def hold(args: Any, state: Any, control: Any, _end: Any = end, **kw: Any) -> None:
                        self._held_ends.append(functools.partial(_end, args, state, control, **kw))

                    cb.on_train_end = hold

        def log_scores(self, scores: Mapping[str, float]) -> None:
            """Scores after training, logged at the final step to trainer_state.json and every tracker."""
            if scores:
                self.log(dict(scores))

        def end_tracking(self) -> None:
            """The trackers' held on_train_end (closes TensorBoard's writer, ends the MLflow run...). Idempotent."""
            held, self._held_ends = self._held_ends, []
            for end in held:
                end()

    return FinsftTrainer


def build_trainer(recipe: Recipe, model: Any, args: Any, tokenizer: Any, train_ds: Any, val_ds: Any = None,
                  callbacks: Sequence[Any] = (), task_metric: TaskMetric | None = None,
                  supervised_lm_head: bool | None = None) -> Any:
    """finsft's SFTTrainer (the recipe's LoRA), without TRL's console printer. ``callbacks`` run before finsft's
    own; ``task_metric`` scores the model at each evaluation (its numbers join eval_loss); ``supervised_lm_head``:
    the plan's choice (:func:`lm_head_positions`; None leaves it to TRL)."""
    from transformers.trainer_callback import PrinterCallback

    trainer = trainer_class()(model=model, args=args, train_dataset=train_ds, eval_dataset=val_ds,
                              processing_class=tokenizer, peft_config=get_peft_config(recipe),
                              task_metric=task_metric, supervised_lm_head=supervised_lm_head)
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
