"""Durations and sizes as written in the config, and back for display.
The schema has already checked the shape; these only convert."""

from __future__ import annotations

import re
from decimal import Decimal

_DURATION = re.compile(r"^([0-9]+(?:\.[0-9]+)?)(ms|s|m|h|d)$")
_DURATION_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}
_SIZE = re.compile(r"^([0-9]+) ?(B|KiB|MiB|GiB|KB|MB|GB)$")
_SIZE_BYTES = {"B": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3, "KB": 1000, "MB": 1000**2, "GB": 1000**3}


def duration_ms(value: int | float | str) -> int:
    """'250ms', '5s', '1.5m', '1h', '1d', or a number of seconds -> milliseconds.
    Decimal keeps '0.1s' from becoming 100.00000000000001."""
    if isinstance(value, bool):
        raise ValueError("not a duration")
    if isinstance(value, (int, float)):
        return int((Decimal(str(value)) * 1000).to_integral_value())
    m = _DURATION.match(value)
    if not m:
        raise ValueError(f"not a duration: {value!r}")
    return int((Decimal(m.group(1)) * _DURATION_MS[m.group(2)]).to_integral_value())


def size_bytes(value: int | str) -> int:
    if isinstance(value, bool):
        raise ValueError("not a size")
    if isinstance(value, int):
        return value
    m = _SIZE.match(value)
    if not m:
        raise ValueError(f"not a size: {value!r}")
    return int(m.group(1)) * _SIZE_BYTES[m.group(2)]


def format_ms(ms: int) -> str:
    """The shortest exact spelling: 30000 -> '30s', 90000 -> '90s', 1500 -> '1500ms'."""
    for unit, factor in (("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1000)):
        if ms and ms % factor == 0:
            return f"{ms // factor}{unit}"
    return f"{ms}ms"
