"""Stage 4 of a run: training. :func:`train` runs a :class:`TrainingRun` phase by phase; the output folder,
launcher, signals and out-of-memory advice each have a module. Imports the stages below (recipe, plan, data,
models, evaluation); nothing below imports it."""

from finsft.training.run import TrainingRun, train
from finsft.training.signals import RunInterrupted

__all__ = ["RunInterrupted", "TrainingRun", "train"]
