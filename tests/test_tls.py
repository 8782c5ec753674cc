"""TLS termination through a real node, with certificates made by trustme
(valid about 90 days) and real clients: Python's ssl, and openssl s_client."""

from __future__ import annotations

import http.client
import json
import shutil
import socket
import ssl
import subprocess
import threading
import time

import pytest
import trustme

pytestmark = [pytest.mark.timeout(180), pytest.mark.filterwarnings("ignore:ssl.TLSVersion:DeprecationWarning")]


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    ca.cert_pem.write_to_path(d / "ca.pem")
    out = {"dir": d, "ca": ca}
    for name, hosts in (("www", ["www.example.test"]), ("api", ["api.example.test", "*.apps.example.test"]),
                        ("www2", ["www.example.test"])):
        cert = ca.issue_cert(*hosts)
        cert.private_key_pem.write_to_path(d / f"{name}.key")
        with open(d / f"{name}.pem", "wb") as f:
            for pem in cert.cert_chain_pems:
                f.write(pem.bytes())
    client = ca.issue_cert("client@example.test", common_name="alice")
    client.private_key_and_cert_chain_pem.write_to_path(d / "client.pem")
    other_ca = trustme.CA()
    stranger = other_ca.issue_cert("mallory@example.test", common_name="mallory")
    stranger.private_key_and_cert_chain_pem.write_to_path(d / "stranger.pem")
    return out


def https_config(ip: str, d, *, certs=("www", "api"), extra_tls: str = "", extra: str = "") -> str:
    pairs = "".join(f"        - {{cert: {d / c}.pem, key: {d / c}.key}}\n" for c in certs)
    return (f"version: 1\nglobal: {{workers: 1}}\nlisteners:\n  - name: web\n    bind: \"{ip}:8443\"\n"
            f"    protocol: https\n    tls:\n      certificates:\n{pairs}{extra_tls}    routes: [{{pool: web}}]\n"
            f"{extra}pools:\n  - name: web\n    backends: [{{id: b1, address: {ip}, port: 9101}}]\n")


def client_context(pki, **kw) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki["dir"] / "ca.pem"))
    for k, v in kw.items():
        setattr(ctx, k, v)
    return ctx


def handshake(ip: str, ctx: ssl.SSLContext, name: str | None) -> ssl.SSLSocket:
    raw = socket.create_connection((ip, 8443), timeout=5)
    return ctx.wrap_socket(raw, server_hostname=name)


def get_over_tls(ip: str, ctx: ssl.SSLContext, name: str, path: str = "/echo",
                 headers: dict | None = None) -> tuple[int, dict, bytes]:
    """One request over a TLS connection to `ip` with SNI `name`."""
    sock = handshake(ip, ctx, name)
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {name}\r\n{extra}Connection: close\r\n\r\n".encode())
    response = http.client.HTTPResponse(sock)
    response.begin()
    body = response.read()
    sock.close()
    return response.status, {k.lower(): v for k, v in response.getheaders()}, body


def test_sni_picks_the_certificate_and_l7_works_over_https(node, origins, ip, pki):
    origins("b1", http=[f"{ip}:9101"])
    node.up(https_config(ip, pki["dir"], extra_tls="      hsts: {max_age: 1d, include_subdomains: true}\n"))
    ctx = client_context(pki)
    for name, expected in (("www.example.test", "www.example.test"), ("api.example.test", "api.example.test"),
                           ("x.apps.example.test", "api.example.test")):
        sock = handshake(ip, ctx, name)  # verifies the chain and the name
        sans = [v for k, v in sock.getpeercert()["subjectAltName"]]
        assert expected in sans and sock.version() in ("TLSv1.2", "TLSv1.3")
        assert sock.selected_alpn_protocol() in (None, "http/1.1")
        sock.close()
    status, headers, body = get_over_tls(ip, ctx, "www.example.test")
    assert status == 200 and headers["strict-transport-security"] == "max-age=86400; includeSubDomains"
    received = dict((k.lower(), v) for k, v in json.loads(body)["headers"])
    assert received["x-forwarded-proto"] == "https"
    # an unknown name, or none: the first certificate
    loose = client_context(pki, check_hostname=False)
    for name in ("nobody.example.test", None):
        sock = handshake(ip, loose, name)
        assert "www.example.test" in [v for k, v in sock.getpeercert()["subjectAltName"]]
        sock.close()


def test_strict_sni_refuses_unknown_names(node, origins, ip, pki):
    origins("b1", http=[f"{ip}:9101"])
    node.up(https_config(ip, pki["dir"], extra_tls="      strict_sni: true\n"))
    loose = client_context(pki, check_hostname=False)
    for name in ("nobody.example.test", None):
        with pytest.raises(ssl.SSLError):
            handshake(ip, loose, name)
    handshake(ip, client_context(pki), "www.example.test").close()


def test_old_protocols_and_weak_ciphers_are_refused_to_a_client_that_would_take_them(node, origins, ip, pki):
    origins("b1", http=[f"{ip}:9101"])
    node.up(https_config(ip, pki["dir"]))
    for version in (ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1):
        weak = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        weak.check_hostname, weak.verify_mode = False, ssl.CERT_NONE
        weak.set_ciphers("ALL:@SECLEVEL=0")
        weak.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
        weak.maximum_version = version
        with pytest.raises((ssl.SSLError, ConnectionResetError)):
            handshake(ip, weak, "www.example.test")
    non_aead = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    non_aead.check_hostname, non_aead.verify_mode = False, ssl.CERT_NONE
    non_aead.maximum_version = ssl.TLSVersion.TLSv1_2
    non_aead.set_ciphers("AES128-SHA:AES256-SHA:ECDHE-RSA-AES128-SHA:ECDHE-ECDSA-AES128-SHA:@SECLEVEL=0")
    with pytest.raises(ssl.SSLError):
        handshake(ip, non_aead, "www.example.test")
    # and the offered key exchange groups are Mozilla's: X448 and P-521 are refused
    if shutil.which("openssl"):
        for group, ok in (("X448", False), ("P-521", False), ("X25519", True), ("P-256", True)):
            out = subprocess.run(["openssl", "s_client", "-connect", f"{ip}:8443", "-servername", "www.example.test",
                                  "-groups", group], input="", capture_output=True, text=True, timeout=10).stdout
            assert ("Cipher is (NONE)" not in out) == ok, (group, out[-400:])


def test_redirect_to_https(node, origins, ip, pki):
    origins("b1", http=[f"{ip}:9101"])
    plain = f"  - {{name: plain, bind: \"{ip}:8080\", redirect_to_https: 8443, routes: [{{pool: web}}]}}\n"
    node.up(https_config(ip, pki["dir"]).replace("pools:\n", "").replace(
        "    routes: [{pool: web}]\n", "    routes: [{pool: web}]\n" + plain + "pools:\n", 1))
    conn = http.client.HTTPConnection(ip, 8080, timeout=5)
    conn.request("GET", "/a/b?c=d", headers={"Host": "www.example.test"})
    r = conn.getresponse()
    assert r.status == 301 and r.getheader("Location") == "https://www.example.test:8443/a/b?c=d"
    conn.close()


def test_client_certificates_mtls(node, origins, ip, pki):
    origins("b1", http=[f"{ip}:9101"])
    d = pki["dir"]
    node.up(https_config(ip, d, extra_tls=f"      client_ca: {d / 'ca.pem'}\n"))

    def refused(ctx: ssl.SSLContext) -> bool:
        """With TLS 1.3 the server's verdict on a client certificate comes
        after the client's handshake: a refusal shows as an alert or EOF."""
        try:
            sock = handshake(ip, ctx, "www.example.test")
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            return sock.recv(100) == b""
        except (ssl.SSLError, OSError):
            return True

    assert refused(client_context(pki))  # no client certificate
    stranger = client_context(pki)
    stranger.load_cert_chain(d / "stranger.pem")
    assert refused(stranger)  # one from another CA
    alice = client_context(pki)
    alice.load_cert_chain(d / "client.pem")
    _, _, body = get_over_tls(ip, alice, "www.example.test", headers={"X-Client-Subject": "CN=forged"})
    received = json.loads(body)["headers"]
    subjects = [v for k, v in received if k.lower() == "x-client-subject"]
    assert len(subjects) == 1 and "CN=alice" in subjects[0] and "forged" not in subjects[0]


def test_session_resumption_within_a_worker_and_across_a_reload(node, origins, ip, pki):
    origins("b1", http=[f"{ip}:9101"])
    node.up(https_config(ip, pki["dir"]))
    ctx = client_context(pki)
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2  # a session object is there after the handshake
    first = handshake(ip, ctx, "www.example.test")
    session = first.session
    first.close()
    again = ctx.wrap_socket(socket.create_connection((ip, 8443), timeout=5), server_hostname="www.example.test",
                            session=session)
    assert again.session_reused
    again.close()
    assert node.apply(https_config(ip, pki["dir"], certs=("www", "api"),
                                   extra_tls="      hsts: {max_age: 1h}\n")).returncode == 0
    after = ctx.wrap_socket(socket.create_connection((ip, 8443), timeout=5), server_hostname="www.example.test",
                            session=session)
    assert after.session_reused  # the socket and its session cache survived the reload
    after.close()


def test_certificate_renewal_under_load_fails_nothing(node, origins, ip, pki, tmp_path):
    origins("b1", http=[f"{ip}:9101"])
    d = pki["dir"]
    live_cert, live_key = tmp_path / "live.pem", tmp_path / "live.key"
    shutil.copy(d / "www.pem", live_cert)
    shutil.copy(d / "www.key", live_key)
    config = https_config(ip, d, certs=()).replace(
        "      certificates:\n", f"      certificates:\n        - {{cert: {live_cert}, key: {live_key}}}\n")
    node.up(config)
    serials = set()
    errors: list[str] = []
    stop = threading.Event()

    def clients() -> None:
        ctx = client_context(pki)
        while not stop.is_set():
            try:
                sock = handshake(ip, ctx, "www.example.test")
                serials.add(sock.getpeercert()["serialNumber"])
                sock.sendall(b"GET / HTTP/1.1\r\nHost: www.example.test\r\nConnection: close\r\n\r\n")
                data = b""
                while chunk := sock.recv(4096):
                    data += chunk
                if not data.startswith(b"HTTP/1.1 200"):
                    errors.append(data[:40].decode(errors="replace"))
                sock.close()
            except (OSError, ssl.SSLError) as e:
                errors.append(repr(e))

    threads = [threading.Thread(target=clients) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(1)
    for i in range(4):
        name = "www2" if i % 2 == 0 else "www"
        shutil.copy(d / f"{name}.pem", live_cert)
        shutil.copy(d / f"{name}.key", live_key)
        assert node.apply(config).returncode == 0  # a renewed file is a new table version
        time.sleep(0.7)
    stop.set()
    for t in threads:
        t.join(20)
    assert errors == []
    assert len(serials) == 2  # both certificates were served, in turn
