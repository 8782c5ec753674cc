"""Session persistence, the pure parts: signed stickiness cookies, and the
Cookie header surgery around them.

A cookie value names the backend and when the cookie expires, and is signed:

    <backend id, base64url> "." <expiry, unix seconds, hex> "." <HMAC-SHA256, base64url, 16 bytes>

The MAC covers the pool's name too, so a cookie minted for one pool is
foreign to another. Tampered, malformed, expired and foreign cookies all
count as absent (the request is balanced as if it had none and gets a new
cookie). Secrets rotate: the first one signs, every one verifies.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac

MAC_BYTES = 16


def _b64(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def _unb64(text: bytes) -> bytes:
    return base64.urlsafe_b64decode(text + b"=" * (-len(text) % 4))


class CookieSigner:
    def __init__(self, secrets: list[bytes], pool: str) -> None:
        if not secrets or not all(secrets):
            raise ValueError("a cookie signer needs at least one non-empty secret")
        self.secrets = secrets
        self.pool = pool.encode()

    def _mac(self, secret: bytes, backend: bytes, expires: bytes) -> bytes:
        return hmac.new(secret, self.pool + b"\0" + backend + b"\0" + expires, hashlib.sha256).digest()[:MAC_BYTES]

    def sign(self, backend_id: str, expires: int) -> bytes:
        backend = backend_id.encode()
        exp = b"%x" % expires
        return _b64(backend) + b"." + exp + b"." + _b64(self._mac(self.secrets[0], backend, exp))

    def verify(self, value: bytes, now: float) -> str | None:
        """The backend id a valid, unexpired cookie names; else None."""
        parts = value.split(b".")
        if len(parts) != 3 or len(value) > 512:
            return None
        try:
            backend = _unb64(parts[0])
            mac = _unb64(parts[2])
            expires = int(parts[1], 16)
        except (binascii.Error, ValueError):
            return None
        if expires < now or len(mac) != MAC_BYTES:
            return None
        if not any(hmac.compare_digest(mac, self._mac(s, backend, parts[1])) for s in self.secrets):
            return None
        try:
            return backend.decode()
        except UnicodeDecodeError:
            return None


def cookie_values(header: bytes, name: bytes) -> list[bytes]:
    """Every value of cookie `name` in a Cookie header (clients may send one
    twice, with different paths)."""
    out = []
    for part in header.split(b";"):
        k, sep, v = part.strip().partition(b"=")
        if sep and k == name:
            out.append(v.strip(b'"'))
    return out


def without_cookie(header: bytes, name: bytes) -> bytes:
    """The Cookie header value minus cookie `name` (the backend never sees
    the load balancer's cookie); b"" when nothing is left."""
    kept = [p.strip() for p in header.split(b";") if p.strip() and p.strip().partition(b"=")[0] != name]
    return b"; ".join(kept)


def set_cookie(name: str, value: bytes, max_age_s: int, secure: bool) -> bytes:
    """The Set-Cookie header line for a stickiness cookie."""
    line = b"Set-Cookie: " + name.encode() + b"=" + value + b"; Max-Age=%d; Path=/; HttpOnly; SameSite=Lax" % max_age_s
    return line + (b"; Secure" if secure else b"") + b"\r\n"
