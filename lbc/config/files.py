"""Files a configuration names (TLS certificates and keys, CA bundles, cookie
secrets): read here, by the loader side, so the compiler stays free of I/O.
Each enters the Config as (sha256, bytes); the table keeps only the digest."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path as FsPath
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from lbc.config.diagnostics import WARNING, Diagnostic, Path
from lbc.config.loader import Document
from lbc.config.tree import dicts, get

MAX_REFERENCED_BYTES = 1024 * 1024
EXPIRY_WARNING = timedelta(days=14)


@dataclass(frozen=True, slots=True)
class FileBlob:
    path: str  # absolute path it was read from
    sha256: str
    data: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if hashlib.sha256(self.data).hexdigest() != self.sha256:
            raise ValueError("FileBlob digest does not match its bytes")


@dataclass(frozen=True, slots=True)
class CertInfo:
    """What a plan and the SNI selection need to know of a certificate."""

    subject: str
    names: tuple[str, ...]  # SAN DNS names and addresses, lowercase
    not_after: str  # ISO 8601, UTC


@dataclass(slots=True)
class FileSet:
    blobs: dict[str, FileBlob] = field(default_factory=dict)  # keyed by the path as written
    certs: dict[str, CertInfo] = field(default_factory=dict)  # keyed by the certificate file's sha256
    diagnostics: list[Diagnostic] = field(default_factory=list)


def collect(doc: Document, now: datetime) -> FileSet:
    found = FileSet()
    for path, kind in _references(doc.data):
        written = get(doc.data, path)
        if not isinstance(written, str) or written in found.blobs:
            continue
        blob = _read(doc, path, written, found)
        if blob is None:
            continue
        found.blobs[written] = blob
        if kind == "ca":
            _check_ca(doc, path, blob, found)
        elif kind == "secret" and not blob.data.strip():
            found.diagnostics.append(doc.diagnostic(path, "secret file is empty"))
    for cert_path, key_path in _certificate_pairs(doc.data):
        cert, key = get(doc.data, cert_path), get(doc.data, key_path)
        if isinstance(cert, str) and isinstance(key, str) and cert in found.blobs and key in found.blobs:
            _check_pair(doc, cert_path, key_path, found.blobs[cert], found.blobs[key], now, found)
    return found


def _references(data: Any) -> Iterator[tuple[Path, str]]:
    for i, listener in dicts(data, "listeners"):
        tls = listener.get("tls")
        if isinstance(tls, dict):
            for j, pair in dicts(tls, "certificates"):
                base = ("listeners", i, "tls", "certificates", j)
                for kind in ("cert", "key"):
                    if kind in pair:  # else the schema reported it missing
                        yield base + (kind,), kind
            if "client_ca" in tls:
                yield ("listeners", i, "tls", "client_ca"), "ca"
    glob = data.get("global") if isinstance(data, dict) else None
    if isinstance(glob, dict) and isinstance(glob.get("admin"), dict) and "token_file" in glob["admin"]:
        yield ("global", "admin", "token_file"), "secret"
    for i, pool in dicts(data, "pools"):
        if isinstance(pool.get("tls"), dict) and "ca_file" in pool["tls"]:
            yield ("pools", i, "tls", "ca_file"), "ca"
        if isinstance(pool.get("sticky"), dict) and "secret_file" in pool["sticky"]:
            yield ("pools", i, "sticky", "secret_file"), "secret"


def _certificate_pairs(data: Any) -> Iterator[tuple[Path, Path]]:
    for i, listener in dicts(data, "listeners"):
        if isinstance(listener.get("tls"), dict):
            for j, pair in dicts(listener["tls"], "certificates"):
                base = ("listeners", i, "tls", "certificates", j)
                if "cert" in pair and "key" in pair:
                    yield base + ("cert",), base + ("key",)


def _read(doc: Document, path: Path, written: str, found: FileSet) -> FileBlob | None:
    fs_path = FsPath(written)
    if not fs_path.is_absolute() and doc.directory is not None:
        fs_path = doc.directory / fs_path
    try:
        with open(fs_path, "rb") as f:
            data = f.read(MAX_REFERENCED_BYTES + 1)
    except FileNotFoundError:
        found.diagnostics.append(doc.diagnostic(path, f"file not found: {fs_path}"))
        return None
    except IsADirectoryError:
        found.diagnostics.append(doc.diagnostic(path, f"is a directory: {fs_path}"))
        return None
    except OSError as e:
        found.diagnostics.append(doc.diagnostic(path, f"cannot read {fs_path}: {e.strerror}"))
        return None
    if len(data) > MAX_REFERENCED_BYTES:
        found.diagnostics.append(doc.diagnostic(path, f"{fs_path} is larger than 1 MiB"))
        return None
    return FileBlob(str(fs_path), hashlib.sha256(data).hexdigest(), data)


def _check_ca(doc: Document, path: Path, blob: FileBlob, found: FileSet) -> None:
    try:
        x509.load_pem_x509_certificates(blob.data)
    except ValueError:
        found.diagnostics.append(doc.diagnostic(path, f"{blob.path} holds no PEM certificate"))


def _check_pair(
    doc: Document, cert_path: Path, key_path: Path, cert: FileBlob, key: FileBlob, now: datetime, found: FileSet
) -> None:
    # Both files are checked before giving up, so a user sees both problems at once.
    chain = private = None
    try:
        chain = x509.load_pem_x509_certificates(cert.data)
    except ValueError:
        found.diagnostics.append(doc.diagnostic(cert_path, f"{cert.path} holds no PEM certificate"))
    try:
        private = serialization.load_pem_private_key(key.data, password=None)
    except TypeError:
        found.diagnostics.append(doc.diagnostic(key_path, f"{key.path} is encrypted; give an unencrypted key"))
    except (ValueError, UnicodeError):
        found.diagnostics.append(doc.diagnostic(key_path, f"{key.path} holds no PEM private key"))
    if chain is None or private is None:
        return
    leaf = chain[0]
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if leaf.public_key().public_bytes(*spki) != private.public_key().public_bytes(*spki):
        found.diagnostics.append(doc.diagnostic(key_path, f"{key.path} is not the key of certificate {cert.path}"))
        return
    not_after = leaf.not_valid_after_utc
    if not_after <= now:
        found.diagnostics.append(doc.diagnostic(cert_path, f"certificate {cert.path} expired on {not_after:%Y-%m-%d %H:%M} UTC"))
        return
    if not_after - now < EXPIRY_WARNING:
        found.diagnostics.append(
            doc.diagnostic(cert_path, f"certificate {cert.path} expires on {not_after:%Y-%m-%d %H:%M} UTC", severity=WARNING)
        )
    found.certs[cert.sha256] = CertInfo(_subject(leaf), _names(leaf), not_after.astimezone(UTC).isoformat())


def _subject(cert: x509.Certificate) -> str:
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return f"CN={cns[0].value}" if cns else cert.subject.rfc4514_string()


def _names(cert: x509.Certificate) -> tuple[str, ...]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return ()
    names = [n.lower() for n in san.get_values_for_type(x509.DNSName)]
    names += [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
    return tuple(sorted(set(names)))


def utcnow() -> datetime:
    return datetime.now(UTC)
