"""``finsft validate``: check recipe files, collect every result, then report once in the format asked for
(text for people, json for machines, github for GitHub Actions annotations).

Light on purpose: needs only jsonschema (no rich, torch or transformers), so it runs in a bare CI Python.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TextIO

from finsft.errors import Problem
from finsft.recipe import check_recipe


@dataclass
class FileResult:
    file: str
    errors: list[Problem]
    warnings: list[Problem] = field(default_factory=list)

    @property
    def valid(self) -> bool:
        return not self.errors


@dataclass
class ValidationResult:
    files: list[FileResult]
    seconds: float

    @property
    def n_invalid(self) -> int:
        return sum(1 for f in self.files if not f.valid)

    @property
    def n_errors(self) -> int:
        return sum(len(f.errors) for f in self.files)

    def summary(self) -> str:
        text = f"{len(self.files) - self.n_invalid}/{len(self.files)} recipes valid"
        if self.n_errors:
            text += f", {self.n_errors} problem{'s' if self.n_errors != 1 else ''}"
        return text


def validate_files(files: Sequence[str], overrides: Sequence[str] = ()) -> ValidationResult:
    start = time.perf_counter()
    results = []
    for path in files:
        recipe, problems = check_recipe(path, overrides)
        results.append(FileResult(path, problems, recipe.warnings if recipe else []))
    return ValidationResult(results, time.perf_counter() - start)


class Reporter:
    def __init__(self, stream: TextIO | None = None):
        self.stream = stream or sys.stdout

    def print(self, text: str) -> None:
        print(text, file=self.stream)

    def report(self, result: ValidationResult) -> None:
        raise NotImplementedError


class TextReporter(Reporter):
    """For people; ANSI colour on terminals (unless NO_COLOR is set)."""

    def report(self, result: ValidationResult) -> None:
        colour = self.stream.isatty() and "NO_COLOR" not in os.environ

        def paint(word: str, code: str) -> str:
            return f"\033[{code}m{word}\033[0m" if colour else word

        for f in result.files:
            self.print(f"{paint('ok', '32')}      {f.file}" if f.valid else f"{paint('invalid', '31')} {f.file}")
            for x in f.errors:
                self.print(f"  {x}")
            for x in f.warnings:
                self.print(f"  {paint('warning', '33')}: {x}")
        self.print(f"{result.summary()} ({result.seconds * 1000:.0f} ms)")


class JsonReporter(Reporter):
    def report(self, result: ValidationResult) -> None:
        self.print(json.dumps({
            "valid": result.n_invalid == 0,
            "files": [{"file": f.file, "valid": f.valid, "errors": [x.as_dict() for x in f.errors],
                       "warnings": [x.as_dict() for x in f.warnings]} for f in result.files],
            "seconds": round(result.seconds, 4),
        }, indent=2))


def _gh_data(text: str) -> str:
    """Escape the message of a GitHub Actions workflow command."""
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def _gh_property(text: str) -> str:
    """Escape a property value (file=...) of a GitHub Actions workflow command."""
    return _gh_data(text).replace(":", "%3A").replace(",", "%2C")


class GithubReporter(Reporter):
    """GitHub Actions workflow commands: one ::error / ::warning annotation per problem."""

    def report(self, result: ValidationResult) -> None:
        for f in result.files:
            for x in [*f.errors, *f.warnings]:
                loc = f"file={_gh_property(x.file)}"
                if x.line is not None:
                    loc += f",line={x.line}" + (f",col={x.column}" if x.column is not None else "")
                msg = f"{x.path}: {x.message}" + (f" (override {x.override})" if x.override else "")
                self.print(f"::{x.severity} {loc},title=finsft validate::{_gh_data(msg)}")
        self.print(result.summary().split(",")[0])


REPORTER_BY_NAME: dict[str, type[Reporter]] = {"text": TextReporter, "json": JsonReporter, "github": GithubReporter}
