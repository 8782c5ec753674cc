"""The ClientHello parser (workers/proxy/clienthello.py), without sockets:
real ClientHellos from Python's ssl, the same re-cut into many records, and
hand-made broken ones (tests/support/hellos.py)."""

from __future__ import annotations

import random
import ssl

import pytest
from lbc_workers.proxy.clienthello import MAX_CLIENT_HELLO, ClientHello, Malformed, NeedMore, parse
from support import hellos

PADDING = 21  # the padding extension type


def assert_every_prefix_needs_more(data: bytes) -> None:
    """`data` is exactly a ClientHello's records: every proper prefix needs
    more, and never asks for bytes past the end."""
    for i in range(len(data)):
        result = parse(data[:i])
        assert isinstance(result, NeedMore) and i < result.at_least <= len(data), (i, result)


def malformed(data: bytes) -> str:
    result = parse(data)
    assert isinstance(result, Malformed), result
    return result.reason


# -- real ClientHellos -------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "expected"), [
    ("a.example.test", b"a.example.test"),
    ("x.b.example.test", b"x.b.example.test"),
    ("A.Example.TEST", b"a.example.test"),
    ("a.example.test.", b"a.example.test"),
    ("127.0.0.1", None),  # Python sends no SNI for an address
    ("::1", None),
    (None, None),
])
def test_real_client_hellos(name, expected):
    for version in (None, ssl.TLSVersion.TLSv1_2):
        data = hellos.capture(name, max_version=version)
        assert parse(data) == ClientHello(expected)


def test_every_proper_prefix_of_a_real_hello_needs_more():
    for name in ("a.example.test", None):
        assert_every_prefix_needs_more(hellos.capture(name))


@pytest.mark.parametrize("sizes", [[1], [2], [3], [7], [100], [1, 2, 3, 5, 8, 13, 200], [4000]])
def test_a_hello_split_over_several_records(sizes):
    data = hellos.records(hellos.capture("b.example.test")[5:], sizes)
    assert parse(data) == ClientHello(b"b.example.test")
    assert_every_prefix_needs_more(data)


def test_a_caller_that_waits_for_at_least_parses_a_few_times_per_hello():
    """A client sending 1-byte records, a byte at a time: parsing on every
    byte would walk every record so far each time (seconds of CPU for 16 KiB)."""
    base = len(hellos.build(extensions=[(PADDING, b"")]).data)
    data = hellos.records(hellos.build(extensions=[(PADDING, bytes(2730 - base))]).data[5:], [1])
    assert MAX_CLIENT_HELLO - 200 < len(data) <= MAX_CLIENT_HELLO
    parses, wanted = 0, 1
    for i in range(1, len(data) + 1):
        if i < wanted:
            continue
        parses += 1
        result = parse(data[:i])
        if not isinstance(result, NeedMore):
            break
        wanted = result.at_least
    assert result == ClientHello(b"a.example.test") and i == len(data)
    assert parses < 100, parses


def test_bytes_after_the_hello_are_not_looked_at():
    data = hellos.capture("a.example.test")
    for after in (b"\x14\x03\x03\x00\x01\x01", b"\x17\x03\x03\x40\x00" + bytes(100), b"GET / HTTP/1.1\r\n"):
        assert parse(data + after) == ClientHello(b"a.example.test")


def test_random_damage_never_raises():
    """Whatever a client sends, the answer is one of the three results."""
    rng = random.Random(7)
    good = hellos.capture("a.example.test")
    for _ in range(3000):
        data = bytearray(good)
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        data = bytes(data[: rng.randint(0, len(data))])
        assert isinstance(parse(data), NeedMore | ClientHello | Malformed)


# -- the record layer ----------------------------------------------------------------------------


@pytest.mark.parametrize("first", [b"G", b"\x00", b"\x80", b"\x17", b"\x15", b"\x14", b"\xff"])
def test_a_non_tls_first_byte_is_refused_at_once(first):
    assert "not TLS" in malformed(first)


def test_http_text_is_refused():
    assert "not TLS" in malformed(b"GET / HTTP/1.1\r\nHost: a.example.test\r\n\r\n")
    assert "not TLS" in malformed(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")


@pytest.mark.parametrize("version", [b"\x02\x00", b"\x04\x01", b"\x03\x05", b"\x00\x03"])
def test_a_record_version_that_is_not_tls(version):
    assert "version" in malformed(b"\x16" + version)


def test_record_lengths():
    good = hellos.capture("a.example.test")
    assert "record length 0" in malformed(good[:3] + b"\x00\x00")
    assert "record length 16385" in malformed(good[:3] + b"\x40\x01")


def test_another_record_between_two_fragments():
    handshake = hellos.capture("a.example.test")[5:]
    first, rest = hellos.records(handshake[:100], [100]), hellos.records(handshake[100:], [1000])
    for between in (b"\x15\x03\x03\x00\x02\x02\x28", b"\x14\x03\x03\x00\x01\x01", b"\x17\x03\x03\x00\x01\x00"):
        assert "record of type" in malformed(first + between + rest)


def test_a_handshake_message_that_is_not_a_client_hello():
    good = hellos.capture("a.example.test")
    for kind in (0, 2, 11, 20):
        assert "not a ClientHello" in malformed(good[:5] + bytes([kind]) + good[6:])
        assert "not a ClientHello" in malformed(good[:5] + bytes([kind]))  # known from its first byte


# -- the 16 KiB bound ----------------------------------------------------------------------------


def padded(total: int) -> bytes:
    """A one-record hello of exactly `total` bytes, padding extension included."""
    base = len(hellos.build(extensions=[(PADDING, b"")]).data)
    return hellos.build(extensions=[(PADDING, bytes(total - base))]).data


def test_a_hello_that_fills_the_limit_is_read():
    data = padded(MAX_CLIENT_HELLO)
    assert len(data) == MAX_CLIENT_HELLO
    assert parse(data) == ClientHello(b"a.example.test")
    assert all(isinstance(parse(data[:i]), NeedMore) for i in range(0, len(data), 97))


def test_oversized_hellos_are_refused_from_their_lengths():
    data = padded(MAX_CLIENT_HELLO + 1)
    assert "does not fit in 16384" in malformed(data[:5])  # the record length alone says so
    # the handshake length says so, though the first record is small
    split = hellos.records(data[5:], [100])
    assert "of 16380 bytes does not fit" in malformed(split[:9])
    # fits as one record, but not cut into many (each record adds 5 bytes)
    fits = padded(MAX_CLIENT_HELLO - 200)
    assert parse(fits) == ClientHello(b"a.example.test")
    assert "does not fit in 16384" in malformed(hellos.records(fits[5:], [50]))
    # and a client that sends more than the limit without finishing never gets NeedMore
    endless = hellos.records(bytes.fromhex("01004000") + bytes(16380), [16384])
    assert not any(isinstance(parse(endless[:i]), NeedMore) for i in range(MAX_CLIENT_HELLO, len(endless), 7))


def test_need_more_always_holds_less_than_the_limit():
    rng = random.Random(3)
    for _ in range(200):
        sizes = [rng.randint(1, 400) for _ in range(10)]
        data = hellos.records(padded(rng.randint(MAX_CLIENT_HELLO - 2000, MAX_CLIENT_HELLO + 2000))[5:], sizes)
        for i in range(0, len(data) + 1, 61):
            result = parse(data[:i])
            if isinstance(result, NeedMore):
                assert i < result.at_least <= MAX_CLIENT_HELLO


# -- lengths inside the hello --------------------------------------------------------------------


def test_the_built_hello_is_good():
    built = hellos.build(b"a.example.test", extensions=[(10, b"\x00\x02\x00\x1d"), (13, b"\x00\x02\x04\x03")])
    assert parse(built.data) == ClientHello(b"a.example.test")
    assert set(built.lengths) == {"record", "handshake", "session id", "cipher suites", "compression methods",
                                  "extensions", "server_name extension", "server name list", "host name"}


@pytest.mark.parametrize("field", ["session id", "cipher suites", "compression methods", "extensions",
                                   "server_name extension", "server name list", "host name"])
def test_every_inner_length_must_fit_exactly(field):
    built = hellos.build(b"a.example.test", extensions=[(10, b"\x00\x02\x00\x1d")])
    size = built.lengths[field][1]
    for delta in (-1, 1) if size == 1 else (-1, 1, 0x100):
        malformed(built.with_length(field, delta))


def test_outer_lengths():
    built = hellos.build(b"a.example.test")
    assert isinstance(parse(built.with_length("handshake", 1)), NeedMore)  # its last byte may come in another record
    malformed(built.with_length("handshake", -1))  # the extensions run past the message
    malformed(built.with_length("record", -1))  # the next "record" starts with the name's last byte
    # a record longer than the hello: what follows it in the record is not looked at
    assert parse(built.with_length("record", 1)) == ClientHello(b"a.example.test")
    # a byte after the extensions, with both outer lengths counting it
    grown = built.with_length("record", 1)
    grown = grown[:6] + (int.from_bytes(grown[6:9]) + 1).to_bytes(3) + grown[9:] + b"\x00"
    assert "after the extensions" in malformed(grown)


def test_vector_limits():
    assert "session id" in malformed(hellos.build(session_id=bytes(33)).data)
    assert parse(hellos.build(session_id=b"").data) == ClientHello(b"a.example.test")
    assert "cipher suites" in malformed(hellos.build(suites=b"").data)
    assert "cipher suites" in malformed(hellos.build(suites=b"\x13\x01\x13").data)
    assert "compression" in malformed(hellos.build(compression=b"").data)
    assert "client version" in malformed(hellos.build(client_version=b"\x02\x00").data)


# -- the server name ------------------------------------------------------------------------------


def test_no_server_name():
    assert parse(hellos.build(None).data) == ClientHello(None)
    assert parse(hellos.build(None, extensions=[(10, b"\x00\x02\x00\x1d")]).data) == ClientHello(None)
    assert parse(hellos.build(None, with_extensions=False).data) == ClientHello(None)  # TLS 1.2 allows no extensions
    assert parse(hellos.build(None, extensions=[]).data) == ClientHello(None)


def test_empty_server_names():
    assert "empty host name" in malformed(hellos.build(b"").data)
    assert "empty server name list" in malformed(hellos.build(None, extensions=[(0, b"\x00\x00")]).data)
    assert "server name list" in malformed(hellos.build(None, extensions=[(0, b"")]).data)


def test_exactly_one_host_name():
    two = [(0, b"a.example.test"), (0, b"b.example.test")]
    assert "more than one" in malformed(hellos.build(server_names=two).data)
    assert "more than one" in malformed(hellos.build(server_names=[(0, b"a.example.test"), (1, b"x")]).data)
    assert "not a host_name" in malformed(hellos.build(server_names=[(1, b"a.example.test")]).data)


def test_repeated_extensions():
    assert "extension 0 repeated" in malformed(
        hellos.build(b"a.example.test", extensions=[(0, b"\x00\x11\x00\x00\x0eb.example.test")]).data)
    assert "extension 10 repeated" in malformed(
        hellos.build(b"a.example.test", extensions=[(10, b"\x00\x00"), (10, b"\x00\x00")]).data)


@pytest.mark.parametrize("name", [b"127.0.0.1", b"10.1", b"1.2.3.4.5", b"192.0.2.1.", b"::1", b"[::1]",
                                  b"2001:db8::17", b"fe80::1%eth0", b"a.example.0"])
def test_ip_literal_like_names_count_as_none(name):
    assert parse(hellos.build(name).data) == ClientHello(None)


@pytest.mark.parametrize("name", [b"A.Example.TEST", b"a.example.test.", b"a-b_c.example.test", b"x" * 63 + b".test",
                                  b".".join([b"a" * 63] * 3) + b"." + b"b" * 61, b"localhost", b"xn--bcher-kva.example"])
def test_host_names_are_lowered_and_kept(name):
    assert parse(hellos.build(name).data) == ClientHello(name.lower().removesuffix(b"."))


@pytest.mark.parametrize("name", [b"a.exa\x00mple.test", b"a example.test", b"caf\xc3\xa9.test", b"a..b.test",
                                  b".a.test", b"a.test..", b"x" * 64 + b".test", b".".join([b"a" * 63] * 4) + b".bb",
                                  b"a/b.test", b"a:b.test", b"*.example.test", b"."])
def test_names_a_dns_name_cannot_be_are_refused(name):
    assert "DNS name" in malformed(hellos.build(name).data)
