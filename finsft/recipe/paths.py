"""Which recipe values are local paths, and how they resolve: relative to the recipe file that declares them
(overrides: relative to the current folder); anything else is a hub id or a ``package:MODULE`` reference."""

from __future__ import annotations

import os
from typing import Any

DATA_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")
PACKAGE_PREFIX = "package:"
# (section, key) of fields that name local files or hub ids; relative local paths resolve against the recipe
# file that declares them.
PATH_FIELDS = (("data", "path"), ("data", "validation_path"), ("evaluation", "path"), ("model", "name_or_path"))


# Fields that name local folders relative to the current folder (not the recipe file); only ~ is expanded.
CWD_PATH_FIELDS = (("output", "dir"),)


def is_local_path(value: str, base_dir: str) -> bool:
    """Whether a data/model reference is a local path (else a hub id or a package reference). An empty string is
    neither: the schema reports it (it must not resolve to the folder itself)."""
    if not value.strip() or value.startswith(PACKAGE_PREFIX):
        return False
    if value.startswith((".", "/", "~")) or value.lower().endswith(DATA_SUFFIXES):
        return True
    return os.path.exists(os.path.join(base_dir, value))


def resolve_paths(layer: dict[str, Any], base_dir: str) -> None:
    for section, key in PATH_FIELDS:
        sec = layer.get(section)
        if isinstance(sec, dict) and isinstance(sec.get(key), str) and sec[key]:
            value = sec[key]
            if is_local_path(value, base_dir):
                sec[key] = os.path.normpath(os.path.join(base_dir, os.path.expanduser(value)))


def expand_home(config: dict[str, Any]) -> None:
    """``~`` and ``~user`` in the fields that resolve against the current folder (output.dir), as a shell would:
    without this ``output.dir=~/runs/x`` (quoted, or from a recipe file) creates a folder literally named ``~``."""
    for section, key in CWD_PATH_FIELDS:
        sec = config.get(section)
        if isinstance(sec, dict) and isinstance(sec.get(key), str) and sec[key].startswith("~"):
            sec[key] = os.path.expanduser(sec[key])
