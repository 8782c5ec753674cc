"""Configuration validation, golden style.

Each tests/cases/config/NAME.yaml has NAME.out beside it: exactly the
diagnostics `lbc.config.load` reports for it, one per line, with the config
shown by its bare file name and referenced files (certificates, keys) by their
path relative to the case's directory; `valid` when there are none.

    LBC_UPDATE_GOLDEN=1 python -m pytest tests/test_config_cases.py

rewrites the .out files instead of comparing (review the diff before
committing it). Inputs that cannot be committed as plain case files (bad
bytes, huge or generated files, TLS material that expires) are built here.
"""

from __future__ import annotations

import dataclasses
import os
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from conftest import CASES, EXAMPLE

import lbc.config
from lbc.config import loader
from lbc.config.diagnostics import Diagnostic
from lbc.errors import ConfigInvalid

CONFIG_CASES = CASES / "config"
UPDATE = os.environ.get("LBC_UPDATE_GOLDEN") == "1"


def diagnostics(path: Path, *, now: datetime | None = None) -> tuple[Diagnostic, ...]:
    try:
        return lbc.config.load(path, now=now).warnings
    except ConfigInvalid as e:
        return e.diagnostics


def render(path: Path, *, now: datetime | None = None) -> str:
    found = diagnostics(path, now=now)
    if not found:
        return "valid\n"
    here = f"{path.parent.resolve()}{os.sep}"
    return "".join(str(dataclasses.replace(d, file=path.name)).replace(here, "") + "\n" for d in found)


def only_error(path: Path) -> Diagnostic:
    """The single error loading `path` must give, with the file name made bare."""
    with pytest.raises(ConfigInvalid) as e:
        lbc.config.load(path)
    found = e.value.diagnostics
    assert len(found) == 1, "\n".join(map(str, found))
    assert found[0].severity == "error"
    return dataclasses.replace(found[0], file=Path(found[0].file).name)


# -- the golden cases ---------------------------------------------------------

CASE_FILES = sorted(CONFIG_CASES.glob("*.yaml"))


@pytest.mark.parametrize("case", CASE_FILES, ids=[p.stem for p in CASE_FILES])
def test_case(case: Path) -> None:
    golden = case.with_suffix(".out")
    got = render(case)
    if UPDATE:
        if not golden.exists() or golden.read_text(encoding="utf-8") != got:
            golden.write_text(got, encoding="utf-8")
        return
    assert golden.exists(), f"{golden.name} is missing: run with LBC_UPDATE_GOLDEN=1 and review it"
    assert got == golden.read_text(encoding="utf-8")


def test_every_golden_file_has_its_case() -> None:
    assert len(CASE_FILES) >= 40
    orphans = [p.name for p in CONFIG_CASES.glob("*.out") if not p.with_suffix(".yaml").exists()]
    assert not orphans


def test_example_case_is_the_bundled_example() -> None:
    assert (CONFIG_CASES / "example.yaml").read_text() == EXAMPLE.read_text()


# -- all errors at once ------------------------------------------------------

ALGORITHM_ERROR = (
    "must be one of: round_robin, weighted_round_robin, least_connections, weighted_least_connections, "
    "ip_hash, consistent_hash, random, power_of_two (got 'round_robbin'); did you mean 'round_robin'?"
)
DUPLICATE_ID_ERROR = "duplicate backend id 'app-1' (also pools[0].backends[0]); ids are unique across the file"


def test_all_errors_are_reported_together_sorted_by_line(write) -> None:
    path = write("many.yaml", """\
version: 1
listeners:
  - name: web
    bind: 127.0.0.1:8080
    routes:
      - pool: nowhere
  - name: web
    bind: 127.0.0.1:8081
    protocl: http
    routes:
      - pool: app
pools:
  - name: app
    algorithm: round_robbin
    health_check: {interval: 2s, timeout: 2s}
    backends:
      - {id: app-1, address: 127.0.0.1, port: 99999}
      - {id: app-1, address: 127.0.0.1, port: 9102}
""")
    with pytest.raises(ConfigInvalid) as e:
        lbc.config.load(path)
    got = [(d.line, d.path, d.message) for d in e.value.diagnostics]
    assert got == [
        (6, "$.listeners[0].routes[0].pool", "no pool named 'nowhere' (pools: app)"),  # semantic
        (7, "$.listeners[1].name", "duplicate listener name 'web' (also listeners[0])"),  # semantic
        (9, "$.listeners[1].protocl", "unknown key 'protocl'; did you mean 'protocol'?"),  # schema
        (14, "$.pools[0].algorithm", ALGORITHM_ERROR),  # schema
        (15, "$.pools[0].health_check.timeout", "must be below interval (2s)"),  # semantic
        (17, "$.pools[0].backends[0].port", "must be at most 65535 (got 99999)"),  # schema
        (18, "$.pools[0].backends[1].id", DUPLICATE_ID_ERROR),  # semantic
    ]
    assert [d.severity for d in e.value.diagnostics] == ["error"] * 7
    assert str(e.value).count("\n") == 6  # one line each


# -- inputs that cannot be committed as case files ---------------------------


def test_non_utf8_bytes_are_located_at_the_bad_byte(write) -> None:
    # The column counts characters, as YAML's own positions do: é is one.
    path = write("latin1.yaml", "version: 1\nlisteners:\n  - name: café".encode() + b"\xff\n")
    assert str(only_error(path)) == "latin1.yaml:3:15: $: file is not valid UTF-8 (byte 0xff)"


def test_non_utf8_after_a_byte_order_mark(write) -> None:
    path = write("bom.yaml", b"\xef\xbb\xbfversion: \xe9\n")
    assert str(only_error(path)) == "bom.yaml:1:10: $: file is not valid UTF-8 (byte 0xe9)"


@pytest.mark.parametrize("text", ["", "\n\n", "# only\n# comments\n", "---\n", "--- # nothing\n...\n", "\ufeff# bom\n"])
def test_empty_and_comment_only_files(write, text: str) -> None:
    path = write("empty.yaml", text)
    assert str(only_error(path)) == "empty.yaml:1:1: $: file is empty: expected a mapping with version, listeners and pools"


def test_file_over_10_mib(write) -> None:
    path = write("big.yaml", b"")
    with open(path, "r+b") as f:
        f.truncate(loader.MAX_FILE_BYTES + 1)  # sparse: the size alone refuses it
    assert str(only_error(path)) == "big.yaml:1:1: $: file is 10485761 bytes; the limit is 10485760 (10 MiB)"


def test_file_of_exactly_10_mib_is_read(write) -> None:
    path = write("big.yaml", b"#" * loader.MAX_FILE_BYTES)
    assert "file is empty" in only_error(path).message


@pytest.mark.parametrize(
    "opener, col",
    [("[", 3 + 64), ("{a: ", 3 + 63 * 4 + 1), ("-", None)],
    ids=["flow-list", "flow-map", "block-list"],
)
def test_deep_nesting_is_one_located_error(write, opener: str, col: int | None) -> None:
    if opener == "-":  # block style grows with the square of the depth: 200 levels will do
        text = "".join("  " * i + "-\n" for i in range(200))
    else:
        text = "a: " + opener * 100_000 + "\n"
    path = write("deep.yaml", text)
    start = time.perf_counter()
    d = only_error(path)
    assert time.perf_counter() - start < 5
    assert d.message == f"nesting deeper than {loader.MAX_DEPTH} levels"
    if col is not None:
        assert (d.line, d.col) == (1, col)
    else:
        assert (d.line, d.col) == (loader.MAX_DEPTH + 1, 2 * loader.MAX_DEPTH + 1)
    assert "\n" not in str(d)


def test_anchor_is_refused_where_it_is_written(write) -> None:
    path = write("anchor.yaml", "version: 1\ndefaults: &d {port: 80}\nlisteners: []\n")
    assert str(only_error(path)) == "anchor.yaml:2:11: $.defaults: anchors (&d) are not supported: write the value out"


def test_alias_is_refused_where_it_is_written(write) -> None:
    path = write("alias.yaml", "version: 1\nlisteners:\n  - name: a\n  - *d\n")
    assert str(only_error(path)) == "alias.yaml:4:5: $.listeners[1]: aliases (*d) are not supported: write the value out"


def test_alias_bomb_is_refused_quickly(write) -> None:
    lines = ["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 30)]
    path = write("lol.yaml", "\n".join(lines) + "\n")
    start = time.perf_counter()
    d = only_error(path)
    assert time.perf_counter() - start < 1
    assert str(d) == "lol.yaml:1:5: $.a0: anchors (&a0) are not supported: write the value out"


def test_directory(tmp_path: Path) -> None:
    (tmp_path / "conf.yaml").mkdir()
    assert str(only_error(tmp_path / "conf.yaml")) == "conf.yaml:1:1: $: is a directory, not a configuration file"


def test_missing_path(tmp_path: Path) -> None:
    assert str(only_error(tmp_path / "nope.yaml")) == "nope.yaml:1:1: $: no such file"


def test_duplicate_keys_name_both_places(write) -> None:
    path = write("dup.yaml", "version: 1\npools: []\nlisteners: []\nversion: 1\n")
    d = only_error(path)
    assert str(d) == "dup.yaml:4:1: $.version: duplicate key 'version' (first written at line 1)"


def test_nested_duplicate_key_with_a_bad_value_keeps_a_readable_path(write) -> None:
    path = write("dup.yaml", "version: 1\nglobal:\n  workers: 2\n  workers: .inf\n")
    with pytest.raises(ConfigInvalid) as e:
        lbc.config.load(path)
    assert [str(dataclasses.replace(d, file="dup.yaml")) for d in e.value.diagnostics] == [
        "dup.yaml:4:3: $.global.workers: duplicate key 'workers' (first written at line 3)",
        "dup.yaml:4:12: $.global.workers: .inf is not a finite number",
    ]


@pytest.mark.parametrize(
    "text, line",
    [("version: 1\n---\nversion: 1\n", 2), ("---\nversion: 1\n...\n---\nversion: 1\n", 4), ("version: 1\n---\n", 2)],
)
def test_multiple_documents(write, text: str, line: int) -> None:
    path = write("multi.yaml", text)
    assert str(only_error(path)) == f"multi.yaml:{line}:1: $: only one YAML document per file is allowed"


@pytest.mark.parametrize(
    "text, expected",
    [
        ("version: 1\nlisteners:\n  - name: a\x07\n", "ctl.yaml:3:12: $: unacceptable character in YAML: control characters are not allowed"),
        ("version: !!int 1\n", "ctl.yaml:1:10: $.version: YAML tag tag:yaml.org,2002:int is not supported"),
        ("version: 1\n? [a, b]\n: c\n", "ctl.yaml:2:3: $: mapping keys must be plain strings"),
        ("version: .nan\n", "ctl.yaml:1:10: $.version: .nan is not a finite number"),
    ],
    ids=["control-char", "tag", "complex-key", "nan"],
)
def test_other_unreadable_yaml(write, text: str, expected: str) -> None:
    assert str(only_error(write("ctl.yaml", text))) == expected


def test_keys_and_values_with_line_breaks_stay_on_one_line(write) -> None:
    path = write("nl.yaml", 'version: 1\n"a\\nb": 1\nlisteners: [{name: "x\\ny", bind: "127.0.0.1:1", protocol: tcp, pool: p}]\npools: [{name: p, backends: [{id: b, address: "h\\nx", port: 1}]}]\n')
    found = diagnostics(path)
    assert len(found) == 3
    for d in found:
        assert "\n" not in str(d)
    assert "$['a\\nb']: unknown key 'a\\nb'" in str(found[0])


# -- TLS: certificates are made at test time, so they never expire in the repo --

NOW = datetime(2030, 6, 1, tzinfo=UTC)

HTTPS = """\
version: 1
listeners:
  - name: web
    bind: 127.0.0.1:8443
    protocol: https
    tls:
      certificates:
        - cert: {cert}
          key: {key}
    routes:
      - pool: web
pools:
  - name: web
    backends:
      - {{id: web-1, address: 127.0.0.1, port: 9101}}
"""
CERT_AT, KEY_AT = "8:17", "9:16"  # where the values of cert: and key: are written


@pytest.fixture(scope="module")
def tls_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tls/*.pem and *.key, dated around NOW (the tests load with now=NOW)."""
    import trustme
    from cryptography.hazmat.primitives import serialization

    d = tmp_path_factory.mktemp("config-tls")
    tls = d / "tls"
    tls.mkdir()
    ca = trustme.CA()
    dated = {
        "good": (NOW - timedelta(days=100), NOW + timedelta(days=265)),
        "other": (NOW - timedelta(days=100), NOW + timedelta(days=265)),
        "expired": (datetime(2029, 1, 1, tzinfo=UTC), datetime(2030, 3, 1, tzinfo=UTC)),
        "soon": (NOW - timedelta(days=80), NOW + timedelta(days=10, hours=12)),
    }
    for name, (not_before, not_after) in dated.items():
        cert = ca.issue_cert(f"{name}.example.test", not_before=not_before, not_after=not_after)
        cert.cert_chain_pems[0].write_to_path(tls / f"{name}.pem")
        cert.private_key_pem.write_to_path(tls / f"{name}.key")
    key = serialization.load_pem_private_key((tls / "good.key").read_bytes(), password=None)
    (tls / "encrypted.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    (tls / "notes.txt").write_text("not a certificate\n")
    return d


TLS_CASES = {
    "valid": ("tls/good.pem", "tls/good.key", "valid"),
    "missing-cert": ("tls/nope.pem", "tls/good.key", f"{CERT_AT}: $.listeners[0].tls.certificates[0].cert: file not found: tls/nope.pem"),
    "missing-key": ("tls/good.pem", "tls/nope.key", f"{KEY_AT}: $.listeners[0].tls.certificates[0].key: file not found: tls/nope.key"),
    "key-not-matching": (
        "tls/good.pem",
        "tls/other.key",
        f"{KEY_AT}: $.listeners[0].tls.certificates[0].key: tls/other.key is not the key of certificate tls/good.pem",
    ),
    "expired": (
        "tls/expired.pem",
        "tls/expired.key",
        f"{CERT_AT}: $.listeners[0].tls.certificates[0].cert: certificate tls/expired.pem expired on 2030-03-01 00:00 UTC",
    ),
    "expires-soon": (
        "tls/soon.pem",
        "tls/soon.key",
        f"{CERT_AT}: $.listeners[0].tls.certificates[0].cert: warning: certificate tls/soon.pem expires on 2030-06-11 12:00 UTC",
    ),
    "encrypted-key": (
        "tls/good.pem",
        "tls/encrypted.key",
        f"{KEY_AT}: $.listeners[0].tls.certificates[0].key: tls/encrypted.key is encrypted; give an unencrypted key",
    ),
    "cert-not-pem": ("tls/notes.txt", "tls/good.key", f"{CERT_AT}: $.listeners[0].tls.certificates[0].cert: tls/notes.txt holds no PEM certificate"),
    "key-not-pem": ("tls/good.pem", "tls/notes.txt", f"{KEY_AT}: $.listeners[0].tls.certificates[0].key: tls/notes.txt holds no PEM private key"),
    "both-not-pem": (
        "tls/good.key",
        "tls/good.pem",
        f"{CERT_AT}: $.listeners[0].tls.certificates[0].cert: tls/good.key holds no PEM certificate\n"
        f"https.yaml:{KEY_AT}: $.listeners[0].tls.certificates[0].key: tls/good.pem holds no PEM private key",
    ),
    "cert-is-directory": ("tls", "tls/good.key", f"{CERT_AT}: $.listeners[0].tls.certificates[0].cert: is a directory: tls"),
}


@pytest.mark.parametrize("name", list(TLS_CASES))
def test_tls_files(tls_dir: Path, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    cert, key, expected = TLS_CASES[name]
    path = tls_dir / "https.yaml"
    path.write_text(HTTPS.format(cert=cert, key=key))
    # Paths are relative to the config file, not to the working directory.
    monkeypatch.chdir(tls_dir / "tls")
    want = expected if expected == "valid" else f"https.yaml:{expected}"
    assert render(path, now=NOW) == want + "\n"


def test_tls_expiring_soon_is_still_valid(tls_dir: Path) -> None:
    path = tls_dir / "soon.yaml"
    path.write_text(HTTPS.format(cert="tls/soon.pem", key="tls/soon.key"))
    config = lbc.config.load(path, now=NOW)
    assert [d.severity for d in config.warnings] == ["warning"]
    assert len(config.certs) == 1
