"""A located finding about a configuration file."""

from __future__ import annotations

import re
from dataclasses import dataclass

ERROR = "error"
WARNING = "warning"

Path = tuple[str | int, ...]

_PLAIN_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def format_path(path: Path) -> str:
    """JSONPath-like rendering: $.pools[0].backends[1].port, and
    $.listeners[0].add_request_headers['X Bad'] for keys that are not plain."""
    out = ["$"]
    for part in path:
        if isinstance(part, int):
            out.append(f"[{part}]")
        elif _PLAIN_KEY.match(part):
            out.append(f".{part}")
        else:
            out.append(f"[{part!r}]")
    return "".join(out)


def _one_line(text: str) -> str:
    """Escape line breaks and other control characters a file's values may bring."""
    return text if text.isprintable() else "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


@dataclass(frozen=True, slots=True, order=True)
class Diagnostic:
    file: str
    line: int  # 1-based
    col: int  # 1-based
    path: str
    message: str
    severity: str = ERROR

    def __post_init__(self) -> None:
        if self.severity not in (ERROR, WARNING):
            raise ValueError(f"bad severity {self.severity!r}")
        if self.line < 1 or self.col < 1:
            raise ValueError("line and column are 1-based")

    def __str__(self) -> str:
        prefix = "warning: " if self.severity == WARNING else ""
        return _one_line(f"{self.file}:{self.line}:{self.col}: {self.path}: {prefix}{self.message}")
