"""The run's phases, called one by one (as an extension or a test would): the seed governs the LoRA layers."""

from __future__ import annotations

from typing import Any

import pytest

from finsft.recipe import load_recipe
from finsft.training import TrainingRun


def lora_init(make_recipe: Any, seed: int, name: str) -> dict[str, Any]:
    """The LoRA weights as built, before any training step, by a run with ``seed``."""
    recipe = load_recipe(str(make_recipe(name)), [f"training.seed={seed}"])
    with TrainingRun(recipe) as run:
        run.setup()
        run.load_model()
        trainer = run.build_trainer()
        return {k: v.detach().clone() for k, v in trainer.model.named_parameters() if "lora_A" in k}


@pytest.mark.slow
def test_the_training_seed_governs_lora_initialisation(make_recipe: Any) -> None:
    a = lora_init(make_recipe, 7, "a")
    b = lora_init(make_recipe, 7, "b")
    c = lora_init(make_recipe, 8, "c")
    assert a and a.keys() == b.keys() == c.keys()
    assert all((a[k] == b[k]).all() for k in a), "the same seed must build the same LoRA layers"
    assert any((a[k] != c[k]).any() for k in a), "another seed must build other LoRA layers"


def test_fsdp_on_a_machine_without_gpus_is_refused_before_any_process_waits(make_recipe: Any,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """accelerate's FSDP plugin has no CPU device (it raises "There are currently no available devices found" in
    every rank): finsft says so first, with the DDP launch line that works on CPU."""
    from finsft.errors import FinsftError

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")
    refused = pytest.raises(FinsftError, match=r"through DDP \(accelerate launch")
    with TrainingRun(load_recipe(str(make_recipe()))) as run, refused:
        run.setup()
    assert not run.dirs.work.exists()


def test_a_missing_metric_package_is_an_error_before_training(make_recipe: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The evaluation at the end of a run imports scikit-learn (classification) or rouge-score (QA): a missing one
    stops the run at setup, with the pip line, not after training."""
    import sys

    from finsft.errors import FinsftError

    monkeypatch.setitem(sys.modules, "sklearn", None)  # import sklearn -> ImportError, as when not installed
    recipe = load_recipe(str(make_recipe(evaluation={"max_samples": 4}, data={"validation_size": 0.2})))
    with TrainingRun(recipe) as run, pytest.raises(FinsftError, match="pip install scikit-learn"):
        run.setup()
    assert not run.dirs.work.exists()


def test_a_missing_plot_package_is_a_note_and_plots_are_skipped(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from finsft.evaluation.metrics import plots_note
    from finsft.evaluation.report import plot_confusion
    from finsft.training.report import plot_losses

    assert plots_note() is None
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert "matplotlib is not installed" in (plots_note() or "")
    assert plot_losses([{"step": 1, "loss": 2.0}], tmp_path / "loss.png") is False
    metrics = {"labels": ["a", "b"], "confusion_matrix": [[1, 0], [0, 1]]}
    assert plot_confusion(metrics, tmp_path / "confusion.png", "t") is False
    assert not list(tmp_path.iterdir())
