"""The configuration: a YAML file in, a checked, frozen Config out.

    read (loader) -> schema check -> defaults -> semantic checks + referenced files
                  -> Config (frozen), or ConfigInvalid with every located error
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from os import PathLike
from types import MappingProxyType
from typing import Any

from lbc.config import files, schema, semantic
from lbc.config.diagnostics import ERROR, Diagnostic
from lbc.config.files import CertInfo, FileBlob
from lbc.config.loader import Document, read_file
from lbc.errors import ConfigInvalid


@dataclass(frozen=True, slots=True)
class Config:
    source: str  # the path as given
    source_sha256: str
    tree: Mapping[str, Any]  # defaults filled; mappings read-only, lists as tuples
    files: Mapping[str, FileBlob]  # referenced files, keyed by the path as written
    certs: Mapping[str, CertInfo]  # keyed by the certificate file's sha256
    warnings: tuple[Diagnostic, ...]


def load(path: str | PathLike[str], *, now: datetime | None = None) -> Config:
    """Read, check and freeze a configuration file. Raises ConfigInvalid with
    all errors (and the warnings beside them), sorted by position."""
    return check_document(read_file(path), now=now)


def check_document(doc: Document, *, now: datetime | None = None) -> Config:
    findings = schema.check(doc)
    schema.fill_defaults(doc.data)
    findings += semantic.check(doc)
    found = files.collect(doc, now or files.utcnow())
    findings += found.diagnostics
    findings = sorted(set(findings))
    if any(d.severity == ERROR for d in findings):
        raise ConfigInvalid(tuple(findings))
    return Config(
        source=doc.file,
        source_sha256=doc.sha256,
        tree=freeze(doc.data),
        files=MappingProxyType(found.blobs),
        certs=MappingProxyType(found.certs),
        warnings=tuple(findings),
    )


def freeze(value: Any) -> Any:
    if isinstance(value, dict):
        return MappingProxyType({k: freeze(v) for k, v in value.items()})
    if isinstance(value, list):
        return tuple(freeze(v) for v in value)
    return value
