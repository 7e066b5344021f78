"""Which recipe values are local paths, and how they resolve: relative to the recipe file that declares them
(overrides: relative to the current folder); anything else is a hub id or a ``package:MODULE`` reference."""

from __future__ import annotations

import os
from typing import Any

DATA_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")
PACKAGE_PREFIX = "package:"
# (section, key) of fields that name local files or hub ids; relative local paths resolve against the recipe
# file that declares them.
PATH_FIELDS = (("data", "path"), ("data", "validation_path"), ("evaluation", "path"), ("evaluation", "suite_data"),
               ("model", "name_or_path"))


# Fields that name local folders relative to the current folder (not the recipe file); only ~ is expanded.
CWD_PATH_FIELDS = (("output", "dir"),)


def is_local_path(value: str, base_dir: str) -> bool:
    """Whether a data/model reference is a local path (else a hub id or a package reference). An empty string is
    neither: the schema reports it (it must not resolve to the folder itself)."""
    if not value.strip() or value.startswith(PACKAGE_PREFIX):
        return False
    if value.startswith((".", "/", "~")) or value.lower().endswith((*DATA_SUFFIXES, ".gguf")):
        return True
    return os.path.exists(os.path.join(base_dir, value))


def _resolve(node: dict[str, Any], key: str, base_dir: str) -> None:
    value = node.get(key)
    if isinstance(value, str) and value and is_local_path(value, base_dir):
        node[key] = os.path.normpath(os.path.join(base_dir, os.path.expanduser(value)))


def source_nodes(layer: dict[str, Any]) -> list[dict[str, Any]]:
    """The mixture sources (data.datasets[*]) and extra evaluation sets (evaluation.sets.*) of a recipe layer:
    objects whose 'path' (and a source's 'data_files') resolve like PATH_FIELDS."""
    data, ev = layer.get("data"), layer.get("evaluation")
    out: list[dict[str, Any]] = []
    if isinstance(data, dict) and isinstance(data.get("datasets"), list):
        out += [s for s in data["datasets"] if isinstance(s, dict)]
    if isinstance(ev, dict) and isinstance(ev.get("sets"), dict):
        out += [s for s in ev["sets"].values() if isinstance(s, dict)]
    return out


def resolve_source(node: dict[str, Any], base_dir: str) -> None:
    """A source's local path and data_files, relative to ``base_dir``."""
    _resolve(node, "path", base_dir)
    files = node.get("data_files")
    if isinstance(files, str):
        _resolve(node, "data_files", base_dir)
    elif isinstance(files, list):
        holder = {str(i): f for i, f in enumerate(files)}
        for k in holder:
            _resolve(holder, k, base_dir)
        node["data_files"] = list(holder.values())
    elif isinstance(files, dict):
        for k in list(files):
            _resolve(files, k, base_dir)


def resolve_paths(layer: dict[str, Any], base_dir: str) -> None:
    for section, key in PATH_FIELDS:
        sec = layer.get(section)
        if isinstance(sec, dict):
            _resolve(sec, key, base_dir)
    for node in source_nodes(layer):
        resolve_source(node, base_dir)


def expand_home(config: dict[str, Any]) -> None:
    """``~`` and ``~user`` in the fields that resolve against the current folder (output.dir), as a shell would:
    without this ``output.dir=~/runs/x`` (quoted, or from a recipe file) creates a folder literally named ``~``."""
    for section, key in CWD_PATH_FIELDS:
        sec = config.get(section)
        if isinstance(sec, dict) and isinstance(sec.get(key), str) and sec[key].startswith("~"):
            sec[key] = os.path.expanduser(sec[key])
