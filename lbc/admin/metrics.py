"""GET /metrics: Prometheus text, read from shared memory at scrape time
(summed over the running workers' regions), never by asking a worker.

Counters of a worker that restarted start again from zero, so a summed
series can go down once; Prometheus' rate() treats that as a counter reset.
Backends removed from the live table leave the output.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from lbc import shm
from lbc.state import StateDir, listener_key, slot_key
from lbc.supervise import Node
from lbc.watch import FAILED

if TYPE_CHECKING:
    from lbc.admin.app import Api

CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")
HEALTH = {0: "unknown", 1: "healthy", 2: "unhealthy"}


class NodeCollector(Collector):
    def __init__(self, state: StateDir) -> None:
        self.state = state

    def collect(self) -> Iterator[Metric]:
        node = Node(self.state)
        version, table = self.state.current_table()
        workers = [p for p in node.workers() if p.state == "RUNNING"] if node.running() else []
        b = ["pool", "backend"]
        requests = CounterMetricFamily("lbc_backend_requests", "Requests (and L4 connections) sent to a backend.", labels=b)
        responses = CounterMetricFamily("lbc_backend_responses", "Backend responses by status class.",
                                        labels=[*b, "code_class"])
        failures = CounterMetricFamily("lbc_backend_failures", "Failed attempts: connect errors, timeouts, 5xx.", labels=b)
        retries = CounterMetricFamily("lbc_backend_retries", "Requests retried on another backend after failing on this one.",
                                      labels=b)
        ejections = CounterMetricFamily("lbc_backend_ejections", "Passive-health ejections.", labels=b)
        bytes_in = CounterMetricFamily("lbc_backend_received_bytes", "Bytes from clients to a backend.", labels=b)
        bytes_out = CounterMetricFamily("lbc_backend_sent_bytes", "Bytes from a backend to clients.", labels=b)
        active = GaugeMetricFamily("lbc_backend_active_connections", "Requests or connections in flight.", labels=b)
        latency = HistogramMetricFamily("lbc_backend_response_seconds", "Time from sending a request to the response head.",
                                        labels=b)
        health = GaugeMetricFamily("lbc_backend_health", "1 for the backend's current health state.", labels=[*b, "state"])
        check_failures = CounterMetricFamily("lbc_health_check_failures", "Failed health probes.", labels=b)
        reloads = CounterMetricFamily("lbc_reloads", "Tables loaded by workers, by result.", labels=["result"])
        rejected = CounterMetricFamily("lbc_requests_rejected", "Client requests refused as malformed or over limits.")
        store = CounterMetricFamily("lbc_sticky_store_errors", "Sticky store (Redis) calls that failed or timed out.")
        served = InfoMetricFamily("lbc_worker_table", "The table version each worker serves.", labels=["worker"])
        answered = CounterMetricFamily("lbc_listener_responses", "Responses sent to clients by HTTP listeners, by "
                                       "status class (lbc's own errors and redirects included).",
                                       labels=["listener", "code_class"])
        sent = CounterMetricFamily("lbc_listener_sent_bytes", "Bytes of responses sent by HTTP listeners.",
                                   labels=["listener"])
        request_time = HistogramMetricFamily("lbc_listener_request_seconds",
                                             "Time from a request head to the end of its response.", labels=["listener"])
        if table is not None and workers and node.shm_file.exists():
            memory = shm.Shm(node.shm_file)
            try:
                slots = self.state.slots()
                ids = [p.slot for p in workers]
                ok = failed = bad = store_errors = 0
                for p in workers:
                    info = memory.read_worker(p.slot)
                    ok, failed = ok + info.reloads_ok, failed + info.reloads_failed
                    bad, store_errors = bad + info.rejected, store_errors + info.store_errors
                    served.add_metric([str(p.slot)], {"version": info.version})
                reloads.add_metric(["ok"], ok)
                reloads.add_metric(["failed"], failed)
                rejected.add_metric([], bad)
                store.add_metric([], store_errors)
                for x in table.listeners:
                    slot = slots.get(listener_key(x.name))
                    if slot is None or x.protocol not in ("http", "https"):
                        continue
                    c = memory.backend_totals(slot, ids)
                    for name, n in zip(CLASSES, c.by_class, strict=True):
                        answered.add_metric([x.name, name], n)
                    sent.add_metric([x.name], c.bytes_out)
                    request_time.add_metric([x.name], _buckets(c), c.latency_sum_s)
                for pool in table.pools:
                    for backend in pool.backends:
                        slot = slots[slot_key(pool.name, backend)]
                        c = memory.backend_totals(slot, ids)
                        labels = [pool.name, backend.id]
                        requests.add_metric(labels, c.requests)
                        for name, n in zip(CLASSES, c.by_class, strict=True):
                            responses.add_metric([*labels, name], n)
                        failures.add_metric(labels, c.failures)
                        retries.add_metric(labels, c.retries)
                        ejections.add_metric(labels, c.ejections)
                        bytes_in.add_metric(labels, c.bytes_in)
                        bytes_out.add_metric(labels, c.bytes_out)
                        active.add_metric(labels, c.active)
                        latency.add_metric(labels, _buckets(c), c.latency_sum_s)
                        if pool.health_check is not None:
                            h = memory.read_health(slot)
                            for code, name in HEALTH.items():
                                health.add_metric([*labels, name], 1.0 if h.state == code else 0.0)
                            check_failures.add_metric(labels, h.failed_total)
            finally:
                memory.close()
        yield from (answered, sent, request_time, requests, responses, failures, retries, ejections, bytes_in, bytes_out,
                    active, latency, health, check_failures, reloads, rejected, store, served)
        watch = self.state.watch_status()
        if watch is not None:
            yield GaugeMetricFamily("lbc_config_valid", "0 while the watched file's intent is not live (invalid, held, "
                                    "failed or missing).", value=0.0 if watch.get("state") in FAILED else 1.0)
            yield CounterMetricFamily("lbc_config_reload_failures", "Watched-file changes that were not applied.",
                                      value=watch.get("failures", 0))
        yield GaugeMetricFamily("lbc_up", "1 when a table is live and workers run.",
                                value=1.0 if version and workers else 0.0)


def _buckets(c: shm.BackendCounters) -> list[tuple[str, int]]:
    cumulative, out = 0, []
    for bound, n in zip((*map(str, shm.LATENCY_BOUNDS), "+Inf"), c.buckets, strict=True):
        cumulative += n
        out.append((bound, cumulative))
    return out


def metrics_endpoint(api: Api) -> Callable[[Request], Awaitable[Response]]:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(NodeCollector(api.state))

    async def endpoint(request: Request) -> Response:
        await api.checked(request)
        return Response(await run_in_threadpool(generate_latest, registry), media_type=CONTENT_TYPE_LATEST)

    return endpoint
