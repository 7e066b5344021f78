"""The validated recipe object."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Recipe:
    """A validated recipe: ``config`` has every default filled in; ``raw`` is what the files and overrides say."""

    source: str
    raw: dict[str, Any]
    config: dict[str, Any]
    files: list[str] = field(default_factory=list)  # the recipe and every file it extends, child first

    def __getitem__(self, key: str) -> Any:
        return self.config[key]

    @property
    def name(self) -> str:
        """The recipe's "name", or its file's stem when it has none (not the schema's generic default)."""
        return str(self.raw.get("name") or Path(self.source).stem)
