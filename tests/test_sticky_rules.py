"""Stickiness, the pure parts: cookie signing, rotation and every way a
cookie is not valid; Cookie header surgery; the affinity hash ring."""

from __future__ import annotations

import pytest
from lbc_workers.sticky import Affinity, CookieSigner, cookie_values, set_cookie, strip_cookie, without_cookie

from lbc.table import Sticky


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


def test_strip_cookie_removes_only_the_stickiness_cookie_from_every_cookie_line():
    head = (b"GET / HTTP/1.1\r\nHost: a\r\nCookie: a=1; SERVERID=x.y.z; b=2\r\nX: 1\r\n"
            b"cookie: SERVERID=q\r\nCookie: SERVERIDX=keep\r\n\r\n")
    assert strip_cookie(head, b"SERVERID") == (b"GET / HTTP/1.1\r\nHost: a\r\nCookie: a=1; b=2\r\nX: 1\r\n"
                                               b"Cookie: SERVERIDX=keep\r\n\r\n")
    assert strip_cookie(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", b"SERVERID") == b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"


class M:
    def __init__(self, ident: str, weight: int = 1, limit: int = 0) -> None:
        self.id, self.weight, self.limit, self.active = ident, weight, limit, 0


def _owners(affinity: Affinity, members, keys):
    return {k: affinity.hashed(members, k).id for k in keys}


KEYS = [b"10.0.%d.%d" % (i // 256, i % 256) for i in range(4000)]


def test_the_ring_moves_only_the_keys_of_a_removed_backend_and_only_keys_to_an_added_one():
    spec = Sticky("source_ip", None, None, 3_600_000, None, "none")
    members = tuple(M(f"b{i}") for i in range(10))
    before = _owners(Affinity("web", spec, []), members, KEYS)
    shares = {m.id: sum(1 for v in before.values() if v == m.id) / len(KEYS) for m in members}
    assert all(0.05 < s < 0.15 for s in shares.values()), shares  # about 1/10 each
    removed = _owners(Affinity("web", spec, []), members[:3] + members[4:], KEYS)
    assert all(removed[k] == v for k, v in before.items() if v != "b3")
    added = _owners(Affinity("web", spec, []), members + (M("b10"),), KEYS)
    assert all(added[k] in (v, "b10") for k, v in before.items())
    # the same answer whatever the members' order, in any process (no per-process hash)
    assert _owners(Affinity("web", spec, []), members[::-1], KEYS) == before


def test_the_ring_honours_weights_and_walks_past_full_backends():
    spec = Sticky("header", None, "x-user", 60_000, None, "none")
    members = (M("a", 3), M("b", 1))
    owners = _owners(Affinity("web", spec, []), members, KEYS)
    share = sum(1 for v in owners.values() if v == "a") / len(KEYS)
    assert 0.65 < share < 0.85, share
    members[0].limit, members[0].active = 1, 1  # a is full: its keys go on to b
    assert set(_owners(Affinity("web", spec, []), members, KEYS[:50]).values()) == {"b"}


def test_a_valid_cookie_for_a_backend_out_of_the_members_counts_as_absent():
    spec = Sticky("cookie", "SERVERID", None, 3_600_000, None, "none")
    affinity = Affinity("web", spec, [b"k"])
    line = affinity.set_cookie("b2", now=1_000, secure=True)
    assert line.startswith(b"Set-Cookie: SERVERID=") and line.endswith(
        b"; Max-Age=3600; Path=/; HttpOnly; SameSite=Lax; Secure\r\n")
    value = line.split(b"=", 1)[1].split(b";")[0]
    members = (M("b1"), M("b2"))
    assert affinity.from_cookie(b"x=1; SERVERID=" + value, members, now=1_001).id == "b2"
    assert affinity.from_cookie(b"SERVERID=" + value, members[:1], now=1_001) is None  # unhealthy or removed
    assert affinity.from_cookie(b"SERVERID=" + value, members, now=4_601) is None  # expired
    assert Affinity("api", spec, [b"k"]).from_cookie(b"SERVERID=" + value, members, now=1_001) is None  # foreign
    # several cookies of the name (several Cookie lines, joined): the first that verifies and takes traffic
    stale = affinity.set_cookie("gone", now=1_000, secure=False).split(b"=", 1)[1].split(b";")[0]
    assert affinity.from_cookie(b"SERVERID=junk; SERVERID=" + stale + b"; SERVERID=" + value, members, 1_001).id == "b2"
