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


# A recipe is a few KiB of JSON; the largest in recipes/ is under 10 KiB. 10 MiB is far above any real recipe and far
# below what hurts a machine (a device such as /dev/zero or a mistyped data file would otherwise be read whole).
MAX_RECIPE_BYTES = 10 * 2**20


class NotASmallFile(ValueError):
    """A path that is not a regular file, or one larger than the limit, where a small text file is expected."""


def _describe_mode(mode: int) -> str:
    import stat

    for test, what in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a named pipe (FIFO)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return what
    return "not a regular file"


def read_small_text(path: str | Path, limit: int = MAX_RECIPE_BYTES) -> str:
    """The text of a regular file of at most ``limit`` bytes (UTF-8, a byte-order mark tolerated). A folder, a
    device, a FIFO or a socket is refused without opening it (opening a FIFO blocks until a writer comes), and a
    file is never read past ``limit`` bytes. Raises FileNotFoundError, OSError, UnicodeDecodeError or
    NotASmallFile (with the reason in words)."""
    import stat

    st = os.stat(path)  # follows a symbolic link to its target, which must be a regular file too
    if not stat.S_ISREG(st.st_mode):
        raise NotASmallFile(f"{_describe_mode(st.st_mode)}, not a JSON file")
    if st.st_size > limit:
        raise NotASmallFile(f"{st.st_size:,} bytes, more than the {limit // 2**20} MiB a recipe may have: this is "
                            "not a recipe (a data file?)")
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:  # it grew since stat
        raise NotASmallFile(f"more than the {limit // 2**20} MiB a recipe may have")
    return data.decode("utf-8-sig")
