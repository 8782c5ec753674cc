"""Small readers over a plain config tree that may not have validated:
they skip what has the wrong type instead of failing on it."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from lbc.config.diagnostics import Path


def dicts(parent: Any, key: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """(index, item) for each mapping in the list parent[key]."""
    items = parent.get(key) if isinstance(parent, dict) else None
    if isinstance(items, list):
        for i, item in enumerate(items):
            if isinstance(item, dict):
                yield i, item


def get(data: Any, path: Path) -> Any:
    for part in path:
        data = data[part]
    return data
