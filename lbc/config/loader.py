"""Read a configuration file into a plain tree that remembers where every key
and value was written.

The tree is built from ruamel.yaml's event stream (its C parser, libyaml), not
from its composer: the composer recurses per nesting level and a hostile file
(`[[[[…` a million deep) overflows the C stack. Building from events is a loop
with an explicit stack, so depth and node count are capped before anything
recurses, aliases are refused before anything could expand them, and
duplicate keys are caught with both locations.

Scalars are resolved with the YAML 1.2 core schema: `yes`/`on` are strings,
`010` is ten, and there are no timestamps.
"""

from __future__ import annotations

import codecs
import hashlib
import math
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path as FsPath
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.error import MarkedYAMLError, YAMLError
from ruamel.yaml.events import (
    AliasEvent,
    DocumentStartEvent,
    MappingEndEvent,
    MappingStartEvent,
    ScalarEvent,
    SequenceEndEvent,
    SequenceStartEvent,
)
from ruamel.yaml.reader import ReaderError

from lbc.config.diagnostics import Diagnostic, Path, format_path
from lbc.errors import ConfigInvalid

MAX_FILE_BYTES = 10 * 1024 * 1024
MAX_DEPTH = 64
MAX_NODES = 2_000_000

_STR_TAG = "tag:yaml.org,2002:str"
_ALLOWED_TAGS = {None, "!", _STR_TAG, "tag:yaml.org,2002:map", "tag:yaml.org,2002:seq"}

_NULL = re.compile(r"^(?:~|null|Null|NULL|)$")
_TRUE = re.compile(r"^(?:true|True|TRUE)$")
_FALSE = re.compile(r"^(?:false|False|FALSE)$")
_INT10 = re.compile(r"^[-+]?[0-9]+$")
_INT8 = re.compile(r"^0o[0-7]+$")
_INT16 = re.compile(r"^0x[0-9a-fA-F]+$")
_FLOAT = re.compile(r"^[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?$")
_SPECIAL_FLOAT = re.compile(r"^(?:[-+]?\.(?:inf|Inf|INF)|\.nan|\.NaN|\.NAN)$")
# Characters that can start a non-string plain scalar; anything else is a string.
_MAYBE_NOT_STR = set("~nNtTfF0123456789-+.")


@dataclass(frozen=True, slots=True)
class Document:
    """A parsed file: the plain tree plus where each part of it was written."""

    file: str  # the name diagnostics show
    sha256: str  # of the file's bytes
    data: Any
    # path -> (line, col), 1-based, of each value and of each mapping key
    positions: dict[Path, tuple[int, int]] = field(repr=False)
    key_positions: dict[Path, tuple[int, int]] = field(repr=False)
    directory: FsPath | None = None  # relative file references resolve here

    def written(self, path: Path) -> bool:
        """Was this value written in the file (as opposed to filled by a default)?"""
        return path in self.positions

    def locate(self, path: Path, *, key: bool = False) -> tuple[int, int]:
        if key and path in self.key_positions:
            return self.key_positions[path]
        while path:
            if path in self.positions:
                return self.positions[path]
            path = path[:-1]
        return self.positions.get((), (1, 1))

    def diagnostic(self, path: Path, message: str, *, severity: str = "error", key: bool = False) -> Diagnostic:
        line, col = self.locate(path, key=key)
        return Diagnostic(self.file, line, col, format_path(path), message, severity)


def read_file(path: str | os.PathLike[str]) -> Document:
    """Read and parse a file; every failure is a located ConfigInvalid."""
    fs_path = FsPath(path)
    name = str(path)

    def fail(message: str) -> ConfigInvalid:
        return ConfigInvalid((Diagnostic(name, 1, 1, "$", message),))

    try:
        st = os.stat(fs_path)
    except FileNotFoundError:
        raise fail("no such file") from None
    except OSError as e:
        raise fail(f"cannot read: {e.strerror}") from None
    if stat.S_ISDIR(st.st_mode):
        raise fail("is a directory, not a configuration file")
    if not stat.S_ISREG(st.st_mode):
        raise fail("is not a regular file")
    if st.st_size > MAX_FILE_BYTES:
        raise fail(f"file is {st.st_size} bytes; the limit is {MAX_FILE_BYTES} (10 MiB)")
    try:
        with open(fs_path, "rb") as f:
            raw = f.read(MAX_FILE_BYTES + 1)
    except OSError as e:
        raise fail(f"cannot read: {e.strerror}") from None
    if len(raw) > MAX_FILE_BYTES:
        raise fail(f"file is larger than the limit of {MAX_FILE_BYTES} bytes (10 MiB)")
    return parse_bytes(raw, name, directory=fs_path.resolve().parent)


def parse_bytes(raw: bytes, name: str, *, directory: FsPath | None = None) -> Document:
    sha = hashlib.sha256(raw).hexdigest()
    # The byte order mark is dropped here rather than by the utf-8-sig codec,
    # whose error offsets do not count it.
    bom = len(codecs.BOM_UTF8) if raw.startswith(codecs.BOM_UTF8) else 0
    try:
        text = raw[bom:].decode("utf-8")
    except UnicodeDecodeError as e:
        start = bom + e.start
        line = raw.count(b"\n", 0, start) + 1
        line_start = max(raw.rfind(b"\n", 0, start) + 1, bom)
        # In characters, as YAML's own marks are (the bytes before the bad one decode).
        col = len(raw[line_start:start].decode("utf-8")) + 1
        bad = raw[start : start + 1].hex()
        raise ConfigInvalid((Diagnostic(name, line, col, "$", f"file is not valid UTF-8 (byte 0x{bad})"),)) from None
    builder = _Builder(name)
    data = builder.build(text)
    return Document(name, sha, data, builder.positions, builder.key_positions, directory)


class _Frame:
    __slots__ = ("container", "path", "key", "slot", "is_map")

    def __init__(self, container: Any, path: Path, is_map: bool) -> None:
        self.container = container
        self.path = path
        self.is_map = is_map
        self.key: str | None = None  # the mapping key awaiting its value, as written
        self.slot: str | None = None  # where that value goes: the key, or a scratch slot for a duplicate

    def next_path(self) -> Path:
        """Path of the node that comes next here: a list item, a key's value, or (no key pending) the mapping."""
        if not self.is_map:
            return self.path + (len(self.container),)
        return self.path + (self.key,) if self.key is not None else self.path


class _Builder:
    def __init__(self, name: str) -> None:
        self.name = name
        self.positions: dict[Path, tuple[int, int]] = {}
        self.key_positions: dict[Path, tuple[int, int]] = {}
        self.errors: list[Diagnostic] = []

    def error(self, mark: tuple[int, int], path: Path, message: str) -> None:
        self.errors.append(Diagnostic(self.name, mark[0], mark[1], format_path(path), message))

    def fatal(self, mark: tuple[int, int], path: Path, message: str) -> ConfigInvalid:
        self.error(mark, path, message)
        return ConfigInvalid(tuple(sorted(self.errors)))

    def build(self, text: str) -> Any:
        try:
            root = self._walk(text)
        except ReaderError as e:
            line, col = _index_to_line_col(text, e.position)
            raise self.fatal((line, col), (), f"unacceptable character in YAML: {e.reason}") from None
        except MarkedYAMLError as e:
            mark = e.problem_mark or e.context_mark
            where = (mark.line + 1, mark.column + 1) if mark is not None else (1, 1)
            message = e.problem or "invalid YAML"
            if _char_at(text, where) == "\t":
                message = "tabs cannot indent YAML: use spaces"
            elif e.context:
                started = e.context_mark
                if started is not None and (started.line + 1, started.column + 1) != where:
                    message = f"{e.context} (started at line {started.line + 1}, column {started.column + 1}): {message}"
                else:
                    message = f"{e.context}: {message}"
            if "unexpected ':'" in message:
                message += " (inside {...} or [...], quote values that contain ':', such as \"127.0.0.1:80\")"
            raise self.fatal(where, (), f"YAML syntax error: {message}") from None
        except YAMLError as e:
            raise self.fatal((1, 1), (), f"YAML error: {e}") from None
        if self.errors:
            raise ConfigInvalid(tuple(sorted(self.errors)))
        if root is _EMPTY:
            raise self.fatal((1, 1), (), "file is empty: expected a mapping with version, listeners and pools")
        return root

    def _walk(self, text: str) -> Any:
        yaml = YAML(typ="safe", pure=False)
        stack: list[_Frame] = []
        root: Any = _EMPTY
        documents = 0
        nodes = 0
        for ev in yaml.parse(text):
            kind = type(ev)
            if kind is ScalarEvent or kind is MappingStartEvent or kind is SequenceStartEvent:
                nodes += 1
                mark = (ev.start_mark.line + 1, ev.start_mark.column + 1)
                if nodes > MAX_NODES:
                    raise self.fatal(mark, (), f"more than {MAX_NODES} YAML nodes")
                top = stack[-1] if stack else None
                is_key = top is not None and top.is_map and top.key is None
                path: Path = top.next_path() if top is not None else ()
                if is_key and kind is ScalarEvent:
                    path += (ev.value,)
                if ev.anchor is not None:
                    raise self.fatal(mark, path, f"anchors (&{ev.anchor}) are not supported: write the value out")
                if ev.tag not in _ALLOWED_TAGS:
                    raise self.fatal(mark, path, f"YAML tag {ev.tag} is not supported")
                if is_key:
                    if kind is not ScalarEvent:
                        raise self.fatal(mark, path, "mapping keys must be plain strings")
                    self._key(top, ev.value, mark)
                    continue
                if kind is ScalarEvent:
                    if top is None and ev.implicit[0] and not ev.value:
                        continue  # an empty document (`---` alone): reported as an empty file
                    value = _scalar(ev)
                    if value is _NON_FINITE:
                        self.error(mark, path, f"{ev.value} is not a finite number")
                        value = None
                    elif value is _TOO_LONG:
                        self.error(mark, path, f"a number of {len(ev.value)} characters is too large")
                        value = None
                else:
                    if len(stack) >= MAX_DEPTH:
                        raise self.fatal(mark, path, f"nesting deeper than {MAX_DEPTH} levels")
                    value = {} if kind is MappingStartEvent else []
                self.positions[path] = mark
                if top is None:
                    root = value
                elif top.is_map:
                    top.container[top.slot] = value
                    top.key = None
                else:
                    top.container.append(value)
                if kind is not ScalarEvent:
                    stack.append(_Frame(value, path, kind is MappingStartEvent))
            elif kind is MappingEndEvent or kind is SequenceEndEvent:
                stack.pop()
            elif kind is AliasEvent:
                mark = (ev.start_mark.line + 1, ev.start_mark.column + 1)
                path = stack[-1].next_path() if stack else ()
                raise self.fatal(mark, path, f"aliases (*{ev.anchor}) are not supported: write the value out")
            elif kind is DocumentStartEvent:
                documents += 1
                if documents > 1:
                    mark = (ev.start_mark.line + 1, ev.start_mark.column + 1)
                    raise self.fatal(mark, (), "only one YAML document per file is allowed")
        return root

    def _key(self, frame: _Frame, key: str, mark: tuple[int, int]) -> None:
        path = frame.path + (key,)
        if key in frame.container:
            first = self.key_positions[path]
            self.error(mark, path, f"duplicate key '{key}' (first written at line {first[0]})")
            # Later values of a duplicate key are still parsed, into a scratch slot.
            frame.key = key
            frame.slot = f"\0dup{len(self.errors)}"
            return
        frame.key = frame.slot = key
        self.key_positions[path] = mark


_EMPTY = object()
_NON_FINITE = object()
_TOO_LONG = object()


def _scalar(ev: ScalarEvent) -> Any:
    value: str = ev.value
    if ev.tag == _STR_TAG or not ev.implicit[0]:
        return value  # quoted, or explicitly a string
    if not value:
        return None
    if value[0] not in _MAYBE_NOT_STR:
        return value
    if _NULL.match(value):
        return None
    if _TRUE.match(value):
        return True
    if _FALSE.match(value):
        return False
    if _INT10.match(value):
        try:
            return int(value, 10)
        except ValueError:  # more digits than Python converts (sys.get_int_max_str_digits(), 4300)
            return _TOO_LONG
    if _INT8.match(value):
        return int(value[2:], 8)
    if _INT16.match(value):
        return int(value[2:], 16)
    if _FLOAT.match(value):
        f = float(value)
        return f if math.isfinite(f) else _NON_FINITE
    if _SPECIAL_FLOAT.match(value):
        return _NON_FINITE
    return value


def _char_at(text: str, where: tuple[int, int]) -> str:
    lines = text.split("\n")
    line = lines[where[0] - 1] if where[0] <= len(lines) else ""
    return line[where[1] - 1] if where[1] <= len(line) else ""


def _index_to_line_col(text: str, index: int) -> tuple[int, int]:
    line = text.count("\n", 0, index) + 1
    col = index - (text.rfind("\n", 0, index) + 1) + 1
    return line, col
