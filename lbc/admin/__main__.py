"""python -m lbc.admin --state DIR: the admin API, run by supervisord beside
the workers. It serves the live table's `global.admin` settings as they were
when it started; an apply that changes them restarts it."""

from __future__ import annotations

import argparse
import ctypes
import ipaddress
import logging
import signal
import sys
import threading
import time

import uvicorn

from lbc import service
from lbc.admin.app import make_app
from lbc.hastore import Follower
from lbc.state import StateDir
from lbc.table import RoutingTable

log = logging.getLogger("lbc.admin")
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def token_for(state: StateDir, table: RoutingTable) -> bytes | None:
    """The bearer token requests need: token_file's first line; else, on a
    bind other than loopback, the state directory's own token; else none."""
    admin = table.settings.admin
    if admin.token_sha256:
        lines = (state.secrets / admin.token_sha256).read_bytes().strip().splitlines()
        return lines[0].strip() if lines else None
    return None if is_loopback(admin.host) else state.admin_token()


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lbc.admin")
    parser.add_argument("--state", required=True)
    args = parser.parse_args(argv)
    # Unlike the workers, which keep serving, the admin API goes with a killed
    # supervisord: it would hold its port against the next `lbc up`.
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    state = StateDir(args.state)
    _, table = state.current_table()
    if table is None or table.settings.admin is None:
        log.info("the admin API is off (global.admin.enabled: false, or no table)")
        return 0
    admin = table.settings.admin
    app = make_app(state, token_for(state, table), admin.host)
    log.info("admin API on %s:%d", admin.host, admin.port)
    stop = threading.Event()
    threading.Thread(target=follow_store, args=(state, stop), name="ha-store", daemon=True).start()
    try:
        uvicorn.run(app, host=admin.host, port=admin.port, log_level="warning", access_log=False, lifespan="off",
                    timeout_graceful_shutdown=5, server_header=False)
    except SystemExit as e:  # uvicorn exits when it cannot bind: do not spin
        if e.code:
            time.sleep(2)
        raise
    finally:
        stop.set()
    return 0


def follow_store(state: StateDir, stop: threading.Event) -> None:
    """global.ha.store's follower (lbc.hastore rule 3), for as long as the
    API runs; the live table is read again only when its version changes."""
    seen: list = [None, None]

    def current() -> tuple[str | None, RoutingTable | None]:
        version = state.current_version()
        if version != seen[0]:
            seen[:] = state.current_table()
        return seen[0], seen[1]

    Follower(lambda table: service.store_config(table, state),
             lambda store, version, table: service.write_pending(state, store, version, table),
             lambda store, stored, expect: service.install_stored(state, store, stored, expect, lock_timeout=30),
             ).run(current, stop)


def run(argv: list[str] | None = None) -> int:
    """main(), pausing before any failure exit so supervisord's restarts do not spin."""
    try:
        return main(argv)
    except SystemExit:
        raise
    except Exception:  # noqa: BLE001 - the process edge: log it whole, then exit for supervisord to restart
        log.exception("the admin API failed")
        time.sleep(2)
        return 1


if __name__ == "__main__":
    sys.exit(run())
