"""schemathesis against the admin API of a running node: examples generated
from schemas/admin-api.yaml (valid and invalid) must never get a server
error nor a response the spec does not allow. About ten examples per
operation here, derandomized so `make test` is repeatable; every accepted
mutation compiles and swaps a table, so longer random runs belong to a
manual `schemathesis run schemas/admin-api.yaml --url http://127.0.0.1:9900`."""

from __future__ import annotations

import http.client

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import positive_data_acceptance
from support.node import LbcNode, wait_until

from lbc.admin.app import spec_path

pytestmark = pytest.mark.timeout(600)
schema = schemathesis.openapi.from_path(spec_path())
IP = "127.250.7.1"  # this module's own loopback address (the `ip` fixture is per test)


@pytest.fixture(scope="module")
def base_url(tmp_path_factory):
    from support.node import Origin

    origin = Origin("a", http=[f"{IP}:9101", f"{IP}:9102"])
    node = LbcNode(tmp_path_factory.mktemp("fuzz"))
    try:
        node.up(f"""version: 1
global: {{workers: 1, drain_timeout: 1s, admin: {{bind: "{IP}:9900"}}}}
listeners:
  - {{name: web, bind: "{IP}:8080", routes: [{{match: {{path_prefix: /b}}, pool: b}}, {{pool: web}}]}}
pools:
  - name: web
    dynamic_backends: true
    backends: [{{id: a, address: {IP}, port: 9101}}]
  - name: b
    backends: [{{id: b1, address: {IP}, port: 9102}}]
""")

        def ready() -> bool:
            try:
                c = http.client.HTTPConnection(IP, 9900, timeout=2)
                c.request("GET", "/healthz")
                return c.getresponse().status == 200
            except OSError:
                return False

        assert wait_until(ready, 10)
        yield f"http://{IP}:9900"
    finally:
        node.cleanup()
        origin.stop()


@schema.parametrize()
@settings(max_examples=10, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_the_admin_api_keeps_its_contract(case, base_url):
    # Every check but "a schema-valid request is accepted": the API refuses some with 400 by meaning (an
    # unknown pool, an address that is not one), which its spec says but a schema cannot.
    case.call_and_validate(base_url=base_url, excluded_checks=[positive_data_acceptance])
