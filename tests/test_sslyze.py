"""An https listener of a real node, scanned by sslyze and checked against
Mozilla's "intermediate" configuration with sslyze's own checker (what
`python -m sslyze --mozilla_config=intermediate` runs): TLS versions, cipher
suites (1.2 and 1.3), key exchange groups, certificate type, curve,
signature and lifespan, and the vulnerability checks (compression,
renegotiation, fallback SCSV, extended master secret, Heartbleed, ROBOT, CCS
injection).

The certificate is trustme's (ECDSA P-256), issued for 90 days: trustme's
default validity (2000 to 3000) would fail Mozilla's lifespan limit (398
days), which says nothing about lbc. Its CA is given to sslyze as a custom
trust store. Every check must pass except certificate path validation, and
that only for the reason trustme's certificates give (see below).
"""

from __future__ import annotations

import datetime

import pytest
import trustme

sslyze = pytest.importorskip("sslyze", reason="sslyze is not installed (it needs nassl wheels for this platform)")
from sslyze.mozilla_tls_profile.tls_config_checker import (  # noqa: E402
    SCAN_COMMANDS_NEEDED_BY_MOZILLA_CHECKER,
    MozillaTlsConfiguration,
    ServerNotCompliantWithTlsConfiguration,
    TlsConfigurationEnum,
    check_server_against_tls_configuration,
)

pytestmark = [pytest.mark.timeout(300),
              # from a certificate in sslyze's bundled public trust stores
              pytest.mark.filterwarnings("ignore:Parsed a serial number which wasn't positive")]

NAME = "www.example.test"


@pytest.mark.row("16")
def test_https_listener_is_mozilla_intermediate_compliant(node, origins, ip, tmp_path, figure):
    ca = trustme.CA()
    ca.cert_pem.write_to_path(tmp_path / "ca.pem")
    now = datetime.datetime.now(datetime.UTC).replace(tzinfo=None)
    cert = ca.issue_cert(NAME, not_before=now - datetime.timedelta(days=1), not_after=now + datetime.timedelta(days=89))
    cert.private_key_pem.write_to_path(tmp_path / "www.key")
    with open(tmp_path / "www.pem", "wb") as f:
        for pem in cert.cert_chain_pems:
            f.write(pem.bytes())
    origins("b1", http=[f"{ip}:9101"])
    node.up(f"version: 1\nglobal: {{workers: 1}}\nlisteners:\n  - name: web\n    bind: \"{ip}:8443\"\n"
            f"    protocol: https\n    tls:\n      certificates:\n"
            f"        - {{cert: {tmp_path / 'www.pem'}, key: {tmp_path / 'www.key'}}}\n"
            f"    routes: [{{pool: web}}]\npools:\n  - name: web\n    backends: [{{id: b1, address: {ip}, port: 9101}}]\n")

    request = sslyze.ServerScanRequest(
        server_location=sslyze.ServerNetworkLocation(hostname=NAME, port=8443, ip_address=ip),
        network_configuration=sslyze.ServerNetworkConfiguration(tls_server_name_indication=NAME,
                                                                 network_timeout=10),
        scan_commands=set(SCAN_COMMANDS_NEEDED_BY_MOZILLA_CHECKER),
        scan_commands_extra_arguments=sslyze.ScanCommandsExtraArguments(
            certificate_info=sslyze.CertificateInfoExtraArgument(custom_ca_file=tmp_path / "ca.pem")),
    )
    scanner = sslyze.Scanner(per_server_concurrent_connections_limit=5)
    scanner.queue_scans([request])
    (result,) = list(scanner.get_results())
    assert result.scan_status == sslyze.ServerScanStatusEnum.COMPLETED, result.connectivity_error_trace
    errors = {cmd.value: getattr(result.scan_result, cmd.value).error_trace
              for cmd in SCAN_COMMANDS_NEEDED_BY_MOZILLA_CHECKER
              if getattr(result.scan_result, cmd.value).status != sslyze.ScanCommandAttemptStatusEnum.COMPLETED}
    assert not errors, errors

    mozilla = MozillaTlsConfiguration.get(TlsConfigurationEnum.MOZILLA_INTERMEDIATE)
    try:
        check_server_against_tls_configuration(result, mozilla)
        issues: dict[str, str] = {}
    except ServerNotCompliantWithTlsConfiguration as e:
        issues = e.issues
    # The one finding expected is about trustme's certificates, not lbc:
    # trustme marks subjectAltName critical while giving the leaf a subject,
    # which sslyze's verifier (cryptography's, strict RFC 5280) refuses, with
    # the test CA (a custom store) as with the public stores, where the CA is
    # unknown anyway.
    assert set(issues) <= {"certificate_path_validation"}, issues
    deployment = result.scan_result.certificate_info.result.certificate_deployments[0]
    (custom,) = [r for r in deployment.path_validation_results if r.trust_store.name == "Supplied CA file"]
    assert custom.was_validation_successful or "subjectAltName MUST NOT be critical" in custom.validation_error, \
        custom.validation_error
    assert ("certificate_path_validation" in issues) == (not custom.was_validation_successful)

    # What the scan saw, beyond the checker's verdict: Mozilla's versions and groups.
    scan = result.scan_result
    versions = {name for name, field in (("1.0", scan.tls_1_0_cipher_suites), ("1.1", scan.tls_1_1_cipher_suites),
                                         ("1.2", scan.tls_1_2_cipher_suites), ("1.3", scan.tls_1_3_cipher_suites))
                if field.result.is_tls_version_supported}
    assert versions == {"1.2", "1.3"}
    assert not scan.ssl_2_0_cipher_suites.result.is_tls_version_supported
    assert not scan.ssl_3_0_cipher_suites.result.is_tls_version_supported
    groups = {c.name for c in scan.elliptic_curves.result.supported_curves or ()}
    assert groups == {"X25519", "secp256r1", "secp384r1"}, groups
    tls12 = {c.cipher_suite.name for c in scan.tls_1_2_cipher_suites.result.accepted_cipher_suites}
    figure(f"Mozilla intermediate findings: {sorted(issues) or 'none'} (trustme's certificate); TLS "
           f"{', '.join(sorted(versions))}; groups {', '.join(sorted(groups))}; {len(tls12)} TLS 1.2 suites, all ECDHE+AEAD")
    assert tls12 and all("_ECDHE_ECDSA_" in c and ("GCM" in c or "CHACHA20" in c) for c in tls12), tls12
    assert scan.tls_fallback_scsv.result.supports_fallback_scsv
    assert scan.session_renegotiation.result.supports_secure_renegotiation
    assert not scan.session_renegotiation.result.is_vulnerable_to_client_renegotiation_dos
