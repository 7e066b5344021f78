"""Files finsft writes: JSON Lines, and JSON written whole or not at all (a temporary file renamed into place)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any


def cache_dir() -> Path:
    """finsft's cache (converted GGUF models, tokenized data): $FINSFT_CACHE, else $XDG_CACHE_HOME/finsft."""
    root = os.environ.get("FINSFT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "finsft")
    return Path(root)


def write_jsonl(path: Path, records: Iterable[dict[str, Any]]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as indented JSON; a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
