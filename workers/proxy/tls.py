"""TLS contexts for https listeners (termination) and for pools that speak
TLS to their backends (re-encryption).

Termination. Each https socket gets one *entry* context when it opens: it
carries what OpenSSL takes from the context a connection starts with (the
protocol floor, the options, the session cache and ticket keys) and a
server-name callback. The callback picks the certificate from the live Router
at handshake time: the context of the certificate whose SAN names match the
SNI name (exact, or `*.suffix` for one more label), else the first
certificate, or a refused handshake with `strict_sni`. OpenSSL takes the rest
from the context switched to (the TLS 1.2 ciphers, ALPN, client certificate
verification), so each certificate context carries the listener's policy too. So a renewed certificate is used by the next handshake after a
reload while the socket, and the session cache with it, stays: sessions
resume across reloads. A change of the policy itself (floor, ciphers, client
CA) opens a new socket beside the old one (see worker.py).

Certificate contexts are cached by the digests of their files and the
policy: unchanged certificates keep their context across reloads.

Defaults are Mozilla's "intermediate": TLS 1.2 and 1.3, AEAD ciphers only
with ECDHE, no compression, no client-initiated renegotiation, ALPN
http/1.1. Python cannot set the key exchange groups of a context (only one
curve), so the workers run with an OpenSSL configuration limiting them to
X25519, P-256 and P-384 (OPENSSL_CONF, written by `lbc up`; see
lbc/supervise.py); `ciphers` governs TLS 1.2 only.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from pathlib import Path

from lbc.table import ListenerTLS, UpstreamTLS

_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}
_cert_contexts: dict[tuple, ssl.SSLContext] = {}  # (cert, key digests, *policy) -> context


def _base(ctx: ssl.SSLContext, min_version: str, ciphers: str) -> None:
    ctx.minimum_version = _VERSIONS[min_version]
    ctx.set_ciphers(ciphers)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    ctx.set_alpn_protocols(["http/1.1"])


def policy(tls: ListenerTLS) -> tuple:
    """What an entry context is made of: a change needs a new socket."""
    return (tls.min_version, tls.ciphers, tls.client_ca_sha256, tls.client_verify)


def certificate_context(cert_sha: str, key_sha: str, secrets: Path, tls: ListenerTLS) -> ssl.SSLContext:
    """The context of one certificate, with the listener's policy: OpenSSL
    picks the TLS 1.2 cipher and the ALPN protocol with the context the
    server-name callback switched to, and verifies client certificates (mTLS)
    against its store, not the entry one's."""
    key = (cert_sha, key_sha, *policy(tls))
    ctx = _cert_contexts.get(key)
    if ctx is None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        _base(ctx, tls.min_version, tls.ciphers)
        ctx.load_cert_chain(secrets / cert_sha, secrets / key_sha)
        _verify_clients(ctx, tls, secrets)
        _cert_contexts[key] = ctx
    return ctx


def _verify_clients(ctx: ssl.SSLContext, tls: ListenerTLS, secrets: Path) -> None:
    if tls.client_ca_sha256:
        ctx.load_verify_locations(cafile=str(secrets / tls.client_ca_sha256))
        ctx.verify_mode = ssl.CERT_REQUIRED if tls.client_verify == "required" else ssl.CERT_OPTIONAL


class CertificateChooser:
    """SNI name -> certificate context for one listener (pure lookup)."""

    def __init__(self, tls: ListenerTLS, secrets: Path) -> None:
        self.strict = tls.strict_sni
        self.exact: dict[str, ssl.SSLContext] = {}
        self.wildcards: dict[str, ssl.SSLContext] = {}  # ".example.com" -> context
        self.default = None
        for cert in tls.certificates:
            ctx = certificate_context(cert.cert_sha256, cert.key_sha256, secrets, tls)
            if self.default is None:
                self.default = ctx
            for name in cert.names:
                if name.startswith("*."):
                    self.wildcards.setdefault(name[1:], ctx)
                else:
                    self.exact.setdefault(name, ctx)

    def choose(self, server_name: str | None) -> ssl.SSLContext | None:
        """The context for a client's SNI name; None: refuse (strict_sni)."""
        if server_name:
            name = server_name.lower().rstrip(".")
            ctx = self.exact.get(name)
            if ctx is not None:
                return ctx
            dot = name.find(".")
            if dot > 0:
                ctx = self.wildcards.get(name[dot:])  # a wildcard covers exactly one label
                if ctx is not None:
                    return ctx
        return None if self.strict else self.default


def entry_context(tls: ListenerTLS, secrets: Path, chooser: Callable[[], CertificateChooser | None]) -> ssl.SSLContext:
    """The context an https socket is created with; `chooser` returns the
    live listener's CertificateChooser (None if the listener is gone)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _base(ctx, tls.min_version, tls.ciphers)
    _verify_clients(ctx, tls, secrets)
    first = tls.certificates[0]
    ctx.load_cert_chain(secrets / first.cert_sha256, secrets / first.key_sha256)  # replaced per handshake

    def on_server_name(sslobj: ssl.SSLObject, server_name: str | None, _ctx: ssl.SSLContext) -> int | None:
        live = chooser()
        chosen = live.choose(server_name) if live is not None else None
        if chosen is None:
            return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
        sslobj.context = chosen
        return None

    ctx.sni_callback = on_server_name
    return ctx


def subject_of(peercert: dict | None) -> str:
    """A verified client certificate's subject, RFC 4514 order (most
    specific first): CN=alice,O=Example."""
    if not peercert:
        return ""
    parts = [f"{k}={v}" for rdn in peercert.get("subject", ()) for k, v in rdn]
    short = {"commonName": "CN", "organizationName": "O", "organizationalUnitName": "OU", "countryName": "C",
             "localityName": "L", "stateOrProvinceName": "ST", "emailAddress": "emailAddress"}
    parts = [f"{short.get(p.split('=', 1)[0], p.split('=', 1)[0])}={p.split('=', 1)[1]}" for p in parts]
    return ",".join(reversed(parts))


_client_contexts: dict[tuple, ssl.SSLContext] = {}


def client_context(tls: UpstreamTLS, secrets: Path) -> ssl.SSLContext:
    """For connections to a pool's backends over TLS; verification on unless
    the pool says `verify: false`."""
    key = (tls.verify, tls.ca_sha256)
    ctx = _client_contexts.get(key)
    if ctx is None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if tls.verify:
            if tls.ca_sha256:
                ctx.load_verify_locations(cafile=str(secrets / tls.ca_sha256))
            else:
                ctx.load_default_certs()
        else:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        ctx.set_alpn_protocols(["http/1.1"])
        _client_contexts[key] = ctx
    return ctx
