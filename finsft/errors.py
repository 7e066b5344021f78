"""Errors meant for people: every problem names the file, the JSON path, what was wrong and what is allowed."""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Problem:
    """One defect found in a recipe."""

    file: str
    path: str  # JSON path such as "$.training.learning_rate"
    message: str
    line: int | None = None
    column: int | None = None
    override: str | None = None  # the command-line override ``key.path=value`` the problem comes from
    severity: str = "error"  # "error" makes the recipe invalid; "warning" is shown and allowed

    def location(self) -> str:
        where = self.file + (f" (override {self.override})" if self.override else "")
        if self.line is not None:
            where += f":{self.line}"
            if self.column is not None:
                where += f":{self.column}"
        return where

    def __str__(self) -> str:
        return f"{self.location()}: {self.path}: {self.message}"

    def as_dict(self) -> dict[str, object]:
        return {"file": self.file, "path": self.path, "message": self.message, "line": self.line, "column": self.column,
                "override": self.override, "severity": self.severity}


class FinsftError(Exception):
    """Base class of the errors finsft reports to users (the CLI turns them into exit codes)."""


class RecipeError(FinsftError):
    """A recipe (or one of the recipes it extends) is invalid. Carries every problem found."""

    def __init__(self, problems: Sequence[Problem]):
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


class DataError(FinsftError):
    """The data a recipe names cannot be used (missing file or column, empty, unknown labels...)."""


class ModelLoadError(FinsftError):
    """The model a recipe names cannot be loaded."""


class OutputDirError(FinsftError):
    """The output folder is in a state the run must not touch."""


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """' Did you mean 'x'?' for the closest choice, or ''."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" Did you mean '{close[0]}'?" if close else ""
