"""Session persistence, the pure parts: signed stickiness cookies, the
Cookie header surgery around them, and the affinity of a pool (which backend
a request's cookie or key names). The Redis store is an adapter beside this
(workers/proxy/store.py); the proxy modules call both.

Rules, per pool `sticky` mode:
- cookie: a request whose cookie verifies and names a backend that takes
  traffic (enabled, healthy, not ejected, under its connection limit) goes
  there; any other is balanced by the pool's algorithm and answered with a
  new cookie. The cookie is removed from the request before the backend
  sees it. A valid cookie is not re-sent: it expires `ttl` after it was set.
- source_ip, header: the key (the client address, or the header's value;
  a request without the header is balanced as usual) goes to the owner on a
  weighted hash ring of the backends that take traffic (lbc.hashing.ring):
  every worker and node agrees, and removing a backend moves only its keys.
  With a store the first mapping is remembered for `ttl` (refreshed on use)
  and wins while its backend takes traffic, so it survives changes to the
  backend set too.

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
from collections.abc import Sequence
from typing import Protocol

from lbc import hashing
from lbc import table as tablemod

MAC_BYTES = 16
VERIFIED_CACHE = 65536  # cookie values remembered as verified, per pool and worker


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


def strip_cookie(head: bytes, name: bytes) -> bytes:
    """A request head without cookie `name` in its Cookie lines (a line
    left empty goes)."""
    if name + b"=" not in head:
        return head
    low = head.lower()
    out = []
    pos = 0
    i = low.find(b"\r\ncookie:")
    while i >= 0:
        end = head.find(b"\r\n", i + 2)
        kept = without_cookie(head[i + 9 : end], name)
        out.append(head[pos:i])
        if kept:
            out.append(b"\r\nCookie: " + kept)
        pos = end
        i = low.find(b"\r\ncookie:", end)
    out.append(head[pos:])
    return b"".join(out)


class Member(Protocol):
    id: str
    weight: int
    active: int
    limit: int


class Affinity:
    """One pool's stickiness, rebuilt with the table (the ring only when the
    backends that take traffic change)."""

    __slots__ = ("pool", "mode", "cookie", "header", "ttl_s", "store", "signer", "store_prefix",
                 "_for", "_shape", "_by_id", "_ring", "_owners", "_verified")

    def __init__(self, pool: str, spec: tablemod.Sticky, secrets: Sequence[bytes]) -> None:
        self.pool = pool
        self.mode = spec.mode
        self.cookie = spec.cookie_name.encode() if spec.cookie_name else None
        self.header = spec.header.encode() if spec.header else None
        self.ttl_s = max(1, spec.ttl_ms // 1000)
        self.store = spec.store if spec.store != "none" else None
        self.signer = CookieSigner(list(secrets), pool) if self.cookie else None
        self.store_prefix = b"lbc:sticky:" + pool.encode() + b":"
        self._for: Sequence[Member] | None = None
        self._shape: tuple = ()
        self._by_id: dict[str, Member] = {}
        self._ring: tuple[int, ...] = ()
        self._owners: tuple[int, ...] = ()
        # Cookie values already verified -> (backend id, expiry): a client sends the same value on
        # every request, and the MAC is most of the cost. Dropped whole when full; rebuilt with the
        # table (so with the secrets).
        self._verified: dict[bytes, tuple[str, int]] = {}

    def _index(self, members: Sequence[Member]) -> None:
        if members is not self._for:
            self._for = members
            self._by_id = {m.id: m for m in members}
            shape = tuple((m.id, m.weight) for m in members)
            if self.cookie is None and shape != self._shape:  # health refreshes rebuild the tuple, not the set
                self._ring, self._owners = hashing.ring([m.id for m in members], [m.weight for m in members])
            self._shape = shape

    def member(self, members: Sequence[Member], backend_id: str) -> Member | None:
        """The member with this id, if it takes traffic."""
        self._index(members)
        return self._by_id.get(backend_id)

    def usable(self, members: Sequence[Member], backend_id: str) -> Member | None:
        """The member with this id if it takes traffic and has room."""
        m = self.member(members, backend_id)
        if m is None or (m.limit and m.active >= m.limit):
            return None
        return m

    # -- cookie mode -----------------------------------------------------------

    def from_cookie(self, cookie_header: bytes | None, members: Sequence[Member], now: float) -> Member | None:
        """The backend a valid cookie names, if it takes traffic (the first
        such of several cookies of this name)."""
        if not cookie_header:
            return None
        for value in cookie_values(cookie_header, self.cookie):
            known = self._verified.get(value)
            if known is not None and known[1] >= now:
                backend_id = known[0]
            else:
                backend_id = self.signer.verify(value, now)
                if backend_id is None:
                    continue
                if len(self._verified) >= VERIFIED_CACHE:
                    self._verified.clear()
                self._verified[value] = (backend_id, int(value.split(b".")[1], 16))
            backend = self.usable(members, backend_id)
            if backend is not None:
                return backend
        return None

    def set_cookie(self, backend_id: str, now: float, secure: bool) -> bytes:
        value = self.signer.sign(backend_id, int(now) + self.ttl_s)
        return set_cookie(self.cookie.decode(), value, self.ttl_s, secure)

    # -- key modes -------------------------------------------------------------

    def hashed(self, members: Sequence[Member], key: bytes) -> Member | None:
        """The ring's owner of `key` among `members`, walking on past full ones."""
        self._index(members)
        owners = self._owners
        if not owners:
            return None
        n = len(owners)
        i = hashing.ring_start(self._ring, key)
        for step in range(n):
            m = members[owners[(i + step) % n]]
            if not m.limit or m.active < m.limit:
                return m
        return None

    def store_key(self, key: bytes) -> bytes:
        return self.store_prefix + key
