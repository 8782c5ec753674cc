"""Stickiness cookies, pure: signing, rotation, and every way a cookie is
not valid."""

from __future__ import annotations

import pytest
from lbc_workers.sticky import CookieSigner, cookie_values, set_cookie, without_cookie


def test_a_signed_cookie_names_its_backend_until_it_expires():
    s = CookieSigner([b"k1"], "web")
    value = s.sign("web-2", 1_000)
    assert s.verify(value, now=999) == "web-2"
    assert s.verify(value, now=1_001) is None  # expired


@pytest.mark.parametrize("mangle", [
    lambda v: v[:-1] + (b"A" if v[-1:] != b"A" else b"B"),  # MAC
    lambda v: b"d2ViLTE" + v[v.index(b"."):],  # another backend, same MAC
    lambda v: v.replace(b".", b".f", 1),  # later expiry, same MAC
    lambda v: v.split(b".")[0],  # truncated
    lambda v: b"",
    lambda v: b"not.a.cookie!",
    lambda v: v + b".x",
    lambda v: b"%%%." + v,
])
def test_tampered_and_malformed_cookies_count_as_absent(mangle):
    s = CookieSigner([b"k1"], "web")
    assert s.verify(mangle(s.sign("web-2", 10**10)), now=0) is None


def test_foreign_cookies_and_rotation():
    web, api = CookieSigner([b"k1"], "web"), CookieSigner([b"k1"], "api")
    assert api.verify(web.sign("web-2", 10**10), now=0) is None  # another pool's
    rotated = CookieSigner([b"k2", b"k1"], "web")  # k2 signs now; k1 still verifies
    assert rotated.verify(web.sign("web-2", 10**10), now=0) == "web-2"
    assert web.verify(rotated.sign("web-1", 10**10), now=0) is None  # k1 alone does not know k2
    assert rotated.verify(rotated.sign("web-1", 10**10), now=0) == "web-1"
    with pytest.raises(ValueError):
        CookieSigner([], "web")


def test_cookie_header_surgery():
    header = b"session=abc; SERVERID=v1; theme=dark; SERVERID=v2"
    assert cookie_values(header, b"SERVERID") == [b"v1", b"v2"]
    assert without_cookie(header, b"SERVERID") == b"session=abc; theme=dark"
    assert without_cookie(b"SERVERID=v1", b"SERVERID") == b""
    line = set_cookie("SERVERID", b"v", 3600, secure=True)
    assert line == b"Set-Cookie: SERVERID=v; Max-Age=3600; Path=/; HttpOnly; SameSite=Lax; Secure\r\n"
