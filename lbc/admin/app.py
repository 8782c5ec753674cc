"""The admin API as a Starlette app. The contract is schemas/admin-api.yaml
(OpenAPI 3.1): every request is checked against it (openapi-core) before a
handler runs, and the tests check every response against it.

Glue only: handlers parse, call lbc.service / lbc.mutate, and shape JSON.
Every change goes through service.change (lock, edit the live table, install,
signal the workers, wait for their acks), a pushed table (PUT /table, from
`lbc apply --node`) through service.install_pushed, in a worker thread, since
they block.

Errors are JSON `{"error": ..., "detail": ...}`: 400 for a request the spec
or the change refuses, 401 without the token where one is needed, 404, 409,
413 for bodies over 64 KiB (32 MiB for a table), 503 when the change could
not be delivered to the workers (the previous table is live again). Nothing else reaches a
client: an unexpected exception is logged and answered 500 without details.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from importlib.resources import files
from pathlib import Path
from typing import Any

from openapi_core import OpenAPI
from openapi_core.contrib.starlette.requests import StarletteOpenAPIRequest
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from lbc import mutate, nodecheck, service
from lbc import table as tablemod
from lbc.errors import LbcError, Rejected, StalePlan, UnknownVersion
from lbc.service import ApplyFailed
from lbc.state import StateDir, now_iso

log = logging.getLogger("lbc.admin")
MAX_BODY = 64 * 1024
MAX_TABLE_BODY = 32 * 1024 * 1024  # PUT /table: a whole table
LOCK_TIMEOUT_S = 30.0


class ApiError(Exception):
    def __init__(self, status: int, error: str, detail: Any = None) -> None:
        super().__init__(error)
        self.status, self.error, self.detail = status, error, detail


def error_response(status: int, error: str, detail: Any = None) -> JSONResponse:
    body: dict[str, Any] = {"error": error}
    if detail is not None:
        body["detail"] = detail
    return JSONResponse(body, status_code=status)


def spec_path() -> Path:
    """schemas/admin-api.yaml, shipped in the package as lbc.schemas."""
    return Path(str(files("lbc.schemas").joinpath("admin-api.yaml")))


class Api:
    def __init__(self, state: StateDir, token: bytes | None, host: str = "127.0.0.1") -> None:
        self.state = state
        self.token = token
        # Without a token, the Host a request names must be this API's own (DNS rebinding).
        self.hosts = frozenset({host.lower(), "localhost", "127.0.0.1", "::1"})
        self.openapi = OpenAPI.from_file_path(str(spec_path()))

    # -- request gates ------------------------------------------------------------------

    async def checked(self, request: Request, limit: int = MAX_BODY) -> tuple[Any, dict[str, Any]]:
        """(body, path parameters) of a request the spec accepts."""
        if self.token is not None and request.url.path != "/healthz":
            given = request.headers.get("authorization", "")
            scheme, _, value = given.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), self.token):
                raise ApiError(401, "a bearer token is required (Authorization: Bearer <token>)")
        elif self.token is None and request.url.path != "/healthz":
            host = request.headers.get("host", "")
            name = host[1:].partition("]")[0] if host.startswith("[") else host.rpartition(":")[0] or host
            if name.lower() not in self.hosts:
                raise ApiError(400, f"Host {host!r} is not this admin API's address")
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            raise ApiError(413, f"request bodies are limited to {limit} bytes")
        received = bytearray()
        async for chunk in request.stream():
            received += chunk
            if len(received) > limit:
                raise ApiError(413, f"request bodies are limited to {limit} bytes")
        body = bytes(received)
        try:
            body.decode("utf-8")  # JSON is UTF-8; openapi-core's own errors choke on other bytes
        except UnicodeDecodeError as e:
            raise ApiError(400, "the request does not match the API", [f"the body is not UTF-8: {e}"]) from None
        result = self.openapi.unmarshal_request(StarletteOpenAPIRequest(request, body))
        if result.errors:
            raise ApiError(400, "the request does not match the API", [_reason(e) for e in result.errors])
        return result.body, dict(result.parameters.path or {})

    async def change(self, edit: Callable[[tablemod.RoutingTable], tablemod.RoutingTable], command: str) -> None:
        ha = self.live()[1].settings.ha
        if ha is not None and not ha.store:
            # The change would reach this node only: the nodes would serve
            # different tables behind one virtual IP.
            raise ApiError(409, f"this node is one of {len(ha.nodes)} (global.ha) without a shared store: a change "
                           "made here would not reach the others; set global.ha.store, or change the file and "
                           "apply it to every node (lbc apply FILE --all-nodes)")
        try:
            await run_in_threadpool(service.change, self.state, edit, command=command, argv=command,
                                    lock_timeout=LOCK_TIMEOUT_S, origin="api")
        except ApplyFailed as e:
            raise ApiError(503, "the workers did not take the change; the previous table is live again", str(e)) from None

    async def install(self, fn: Callable[..., service.ApplyResult], body: dict[str, Any], *args: Any,
                      **kwargs: Any) -> Response:
        """Run an install (a push, a rollback) and answer with its outcome."""
        try:
            result = await run_in_threadpool(fn, self.state, *args, lock_timeout=body.get("lock_timeout", LOCK_TIMEOUT_S),
                                             ack_timeout=body.get("wait_timeout", 10.0), **kwargs)
        except StalePlan as e:
            raise ApiError(409, str(e)) from None
        except UnknownVersion as e:
            raise ApiError(404, str(e)) from None
        except ApplyFailed as e:
            raise ApiError(503, "the workers did not take the table; the previous table is live again", str(e)) from None
        plan, delivery = result.plan, result.delivery
        return JSONResponse({"installed": result.installed, "version": plan.version, "base_version": plan.base_version,
                             "summary": plan.summary(), "workers": len(delivery.acks) if delivery else 0,
                             "shared": result.shared, "store": result.store})

    # -- handlers ------------------------------------------------------------------

    async def list_backends(self, request: Request) -> Response:
        await self.checked(request)
        _, table = self.live()
        statuses = {b.id: b for b in (await run_in_threadpool(service.status, self.state, process_figures=False)).backends}
        out = []
        for pool in table.pools:
            for b in pool.backends:
                st = statuses.get(b.id)
                out.append({"backend_id": b.id, "pool": pool.name, "address": b.address, "port": b.port,
                            "weight": b.weight, "enabled": b.enabled, "origin": b.origin, "created_at": b.created_at,
                            "status": _status(st.health if st else "-"),
                            "active_connections": st.active if st else 0,
                            "total_requests": st.requests if st else 0})
        return JSONResponse({"backends": out})

    async def add_backend(self, request: Request) -> Response:
        body, _ = await self.checked(request)
        made: dict[str, Any] = {}

        def edit(table: tablemod.RoutingTable) -> tablemod.RoutingTable:
            new, pool, backend = mutate.add_backend(
                table, address=body["address"], port=body["port"], weight=body.get("weight", 1),
                health_check_path=body.get("health_check_path"), pool=body.get("pool"),
                now=now_iso())
            made.update(pool=pool, backend=backend)
            return new

        await self.change(edit, "api: POST /backends")
        b = made["backend"]
        return JSONResponse({"backend_id": b.id, "pool": made["pool"].name, "address": b.address, "port": b.port,
                             "weight": b.weight, "health_check_path": b.health_check_path, "status": "unknown",
                             "created_at": b.created_at}, status_code=201)

    async def remove_backend(self, request: Request) -> Response:
        _, path = await self.checked(request)
        ident = path["backend_id"]
        _, table = self.live()
        mutate.find_backend(table, ident)  # 404 before taking the lock
        in_flight = 0
        for b in (await run_in_threadpool(service.status, self.state, process_figures=False)).backends:
            if b.id == ident:
                in_flight = b.active
        await self.change(lambda t: mutate.remove_backend(t, ident)[0], f"api: DELETE /backends/{ident}")
        return JSONResponse({"backend_id": ident, "status": "draining", "drained_connections": in_flight})

    async def backend_health(self, request: Request) -> Response:
        _, path = await self.checked(request)
        ident = path["backend_id"]
        _, table = self.live()
        mutate.find_backend(table, ident)
        st = next((b for b in (await run_in_threadpool(service.status, self.state, process_figures=False)).backends
                   if b.id == ident), None)
        if st is None:
            raise ApiError(404, f"no backend {ident!r}")
        return JSONResponse({
            "backend_id": ident, "status": _status(st.health),
            "last_check": datetime.fromtimestamp(st.last_check, UTC).isoformat() if st.last_check else None,
            "consecutive_successes": st.successes, "consecutive_failures": st.check_failures,
            "active_connections": st.active, "total_requests": st.requests, "total_failures": st.failures,
            "avg_response_ms": st.avg_response_ms, "last_error": st.error})

    async def get_config(self, request: Request) -> Response:
        await self.checked(request)
        version, table = self.live()
        return JSONResponse({
            "version": version,
            "listeners": [{"name": x.name, "protocol": x.protocol, "bind": x.bind} for x in table.listeners],
            "pools": [pool_settings(p) for p in table.pools]})

    async def set_algorithm(self, request: Request) -> Response:
        body, _ = await self.checked(request)
        made: dict[str, Any] = {}

        def edit(table: tablemod.RoutingTable) -> tablemod.RoutingTable:
            new, pool = mutate.set_algorithm(table, algorithm=body["algorithm"],
                                             sticky_sessions=body.get("sticky_sessions", False),
                                             sticky_ttl_seconds=body.get("sticky_ttl_seconds", 3600),
                                             pool=body.get("pool"))
            made["pool"] = pool
            return new

        await self.change(edit, "api: PUT /config/algorithm")
        return JSONResponse(pool_settings(made["pool"]))

    async def get_table(self, request: Request) -> Response:
        await self.checked(request)
        version, table = self.live()
        return JSONResponse({"version": version, "table": tablemod.to_plain(table)})

    async def put_table(self, request: Request) -> Response:
        body, _ = await self.checked(request, limit=MAX_TABLE_BODY)
        return await self.install(service.install_pushed, body, body["table"], body["version"],
                                  files=body.get("files") or {},
                                  expect=body["expect"], source=body.get("source"),
                                  source_sha256=body.get("source_sha256"), argv=body.get("argv") or "api: PUT /table")

    async def rollback_table(self, request: Request) -> Response:
        body, _ = await self.checked(request)
        return await self.install(service.rollback, body, body["version"], expect=body["expect"], origin="push",
                                  argv=body.get("argv") or "api: POST /table/rollback", from_admin=True)

    async def healthz(self, request: Request) -> Response:
        await self.checked(request)
        h = await run_in_threadpool(nodecheck.check, self.state)
        return JSONResponse(h.as_json(), status_code=200 if h.ok else 503)

    def live(self) -> tuple[str, tablemod.RoutingTable]:
        version, table = self.state.current_table()
        if table is None:
            raise ApiError(503, "no table is installed")
        return version, table


def by_method(**handlers: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
    async def dispatch(request: Request) -> Response:
        return await handlers[request.method](request)
    return dispatch


def pool_settings(p: tablemod.Pool) -> dict[str, Any]:
    return {"pool": p.name, "algorithm": p.algorithm, "hash_key": p.hash_key,
            "sticky": {"mode": p.sticky.mode, "ttl_seconds": p.sticky.ttl_ms // 1000} if p.sticky else None,
            "backends": len(p.backends), "dynamic_backends": p.dynamic_backends, "set_by_api": list(p.set_by_api)}


def _status(health: str) -> str:
    return "unchecked" if health == "-" else health


def _text(e: BaseException) -> str:
    try:
        return str(e)
    except ValueError:  # a library error that cannot describe itself
        return type(e).__name__


def _reason(e: Exception) -> str:
    causes = [_text(e)]
    cause = e.__cause__
    while cause is not None:
        causes.append(_text(cause))
        inner = getattr(cause, "schema_errors", None)
        if inner:
            causes += [getattr(x, "message", str(x)) for x in inner]
        cause = cause.__cause__
    return "; ".join(dict.fromkeys(c for c in causes if c))


def make_app(state: StateDir, token: bytes | None, host: str = "127.0.0.1") -> Starlette:
    api = Api(state, token, host)

    def handle(fn: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            try:
                return await fn(request)
            except ApiError as e:
                return error_response(e.status, e.error, e.detail)
            except Rejected as e:
                return error_response(e.status, str(e))
            except LbcError as e:  # the lock, the state directory: the node cannot change now
                return error_response(503, str(e))
            except Exception:  # noqa: BLE001 - the edge: log it whole, tell the client nothing internal
                log.exception("%s %s failed", request.method, request.url.path)
                return error_response(500, "internal error; see the admin log")
        return endpoint

    from lbc.admin.metrics import metrics_endpoint

    routes = [
        # one Route per path, so a 405 lists every method of the path in Allow
        Route("/backends", handle(by_method(GET=api.list_backends, POST=api.add_backend)), methods=["GET", "POST"]),
        Route("/backends/{backend_id}", handle(api.remove_backend), methods=["DELETE"]),
        Route("/backends/{backend_id}/health", handle(api.backend_health), methods=["GET"]),
        Route("/config", handle(api.get_config), methods=["GET"]),
        Route("/config/algorithm", handle(api.set_algorithm), methods=["PUT"]),
        Route("/table", handle(by_method(GET=api.get_table, PUT=api.put_table)), methods=["GET", "PUT"]),
        Route("/table/rollback", handle(api.rollback_table), methods=["POST"]),
        Route("/healthz", handle(api.healthz), methods=["GET"]),
        Route("/metrics", handle(metrics_endpoint(api)), methods=["GET"]),
    ]

    async def not_found(request: Request, exc: Exception) -> Response:
        status = getattr(exc, "status_code", 404)
        response = error_response(status, "no such endpoint" if status == 404 else "method not allowed")
        response.headers.update(getattr(exc, "headers", None) or {})  # 405 lists the methods in Allow (RFC 9110)
        return response

    return Starlette(routes=routes, exception_handlers={404: not_found, 405: not_found})
