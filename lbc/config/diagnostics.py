"""A located finding about a configuration file."""

from __future__ import annotations

from dataclasses import dataclass

ERROR = "error"
WARNING = "warning"

Path = tuple[str | int, ...]


def format_path(path: Path) -> str:
    """JSONPath-like rendering: $.pools[0].backends[1].port"""
    out = ["$"]
    for part in path:
        if isinstance(part, int):
            out.append(f"[{part}]")
        else:
            out.append(f".{part}")
    return "".join(out)


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
        return f"{self.file}:{self.line}:{self.col}: {self.path}: {prefix}{self.message}"
