"""supervisord as lbc's process manager: render its config, start it, talk to
it over XML-RPC on a unix socket, signal workers, and wait for their acks in
shared memory.

Workers are signalled through supervisord's XML-RPC API (signalProcess),
never by signalling supervisord itself: SIGHUP to supervisord restarts every
program. Each worker is its own supervisord program (worker-0, worker-1, ...)
so a change of `global.workers` adds or removes programs without touching
the others (reloadConfig + addProcessGroup / removeProcessGroup).

Runtime files live in <state>/run/: supervisord.conf, supervisord.pid, its
log and each worker's, worker pid files, and the shared-memory file. The
control socket is <state>/run/sv.sock, or /tmp/lbc-<hash>.sock when that
path would pass the 107-byte limit of unix socket paths.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import http.client
import ipaddress
import os
import resource
import shutil
import socket
import subprocess
import sys
import time
import xmlrpc.client
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

import jinja2
import psutil
from supervisor.xmlrpc import SupervisorTransport

from lbc import keepalived
from lbc import shm as shmmod
from lbc.config.addresses import format_hostport
from lbc.errors import LbcError
from lbc.state import StateDir, replace_file
from lbc.table import RoutingTable, worker_count

WORKER_PREFIX = "worker-"
HEALTH = "health"  # the health checker's program
ADMIN = "admin"  # the admin API's program
KEEPALIVED = "keepalived"  # global.ha's VRRP, when lbc runs it
MAX_SOCKET_PATH = 100


class SupervisorError(LbcError):
    """supervisord cannot be started, reached or told what to do."""


@dataclass(frozen=True, slots=True)
class Process:
    name: str
    state: str  # supervisord's: RUNNING, STARTING, BACKOFF, EXITED, FATAL, ...
    pid: int
    started: float

    @property
    def slot(self) -> int | None:
        return int(self.name[len(WORKER_PREFIX):]) if self.name.startswith(WORKER_PREFIX) else None


@dataclass(frozen=True, slots=True)
class Ack:
    process: str
    pid: int
    ok: bool
    detail: str  # why not, when not ok


def stop_wait_seconds(table: RoutingTable) -> int:
    longest = max([table.settings.drain_timeout_ms] + [p.drain_timeout_ms for p in table.pools])
    return -(-longest // 1000) + 5


class Node:
    """The processes of one state directory."""

    def __init__(self, state: StateDir) -> None:
        self.state = state
        self.run = state.run.resolve()  # supervisord changes directory: every path it sees is absolute
        self.conf = self.run / "supervisord.conf"
        self.pid_file = self.run / "supervisord.pid"
        self.shm_file = self.run / "shm"
        self.watch_target = self.run / "watch.target"  # the file `lbc up --watch` watches
        self.keepalived_conf = self.run / "keepalived.conf"
        self.ha_node_file = self.run / "ha-node"  # `lbc up --ha-node NAME`; else found by address
        sock = self.run / "sv.sock"
        if len(str(sock.resolve())) > MAX_SOCKET_PATH:
            digest = hashlib.sha256(str(state.root.resolve()).encode()).hexdigest()[:16]
            sock = Path(f"/tmp/lbc-{digest}.sock")
        self.socket = sock

    # -- is it running? --------------------------------------------------------

    def supervisord_pid(self) -> int | None:
        try:
            pid = int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None
        try:
            proc = psutil.Process(pid)
            if proc.status() == psutil.STATUS_ZOMBIE:
                return None
            if "supervisor" not in " ".join(proc.cmdline()):
                return None
        except psutil.Error:
            return None
        return pid

    def running(self) -> bool:
        if self.supervisord_pid() is None:
            return False
        try:
            return self._rpc().supervisor.getState()["statename"] == "RUNNING"
        except SupervisorError:
            return False

    def orphans(self) -> list[int]:
        """Worker processes of this state still alive without a supervisord.
        Found by their command lines, not their pid files: a failed `lbc up`
        may have removed those while the workers served on."""
        return self._running_for("lbc_workers.proxy")

    def orphaned_helpers(self) -> list[int]:
        """The health checker, the admin API and keepalived of this state
        still alive without a supervisord. (The admin API asks to go with
        supervisord, PR_SET_PDEATHSIG, but only once started, and then shuts
        down gracefully, holding its port meanwhile; keepalived would keep
        the virtual IPs on its old configuration, and block a new one.)"""
        helpers = self._running_for("lbc_workers.health") + self._running_for("lbc.admin")
        keepalived_pid = _pid_in(self.run / "keepalived.pid")
        with contextlib.suppress(psutil.Error):
            if keepalived_pid and str(self.keepalived_conf) in psutil.Process(keepalived_pid).cmdline():
                helpers.append(keepalived_pid)  # its VRRP child follows it out
        return helpers

    def _running_for(self, module: str) -> list[int]:
        """Processes running `python -m module --state <this state> ...`."""
        root = str(self.state.root.resolve())
        found = []
        for proc in psutil.process_iter(["cmdline"]):
            cmd = proc.info["cmdline"] or []
            with contextlib.suppress(psutil.Error, ValueError):
                if (module in cmd and cmd[cmd.index("--state") + 1] == root
                        and proc.status() != psutil.STATUS_ZOMBIE):
                    found.append(proc.pid)
        return found

    # -- XML-RPC -----------------------------------------------------------------

    def _rpc(self) -> xmlrpc.client.ServerProxy:
        transport = SupervisorTransport(None, None, f"unix://{self.socket}")
        return _TranslatedProxy(xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport))

    def processes(self) -> list[Process]:
        infos = self._rpc().supervisor.getAllProcessInfo()
        return [Process(i["name"], i["statename"], i["pid"], float(i["start"])) for i in infos]

    def workers(self) -> list[Process]:
        return sorted((p for p in self.processes() if p.slot is not None), key=lambda p: p.slot)

    def signal_workers(self, sig: str = "HUP", checker: bool = True) -> None:
        """Signal every worker and (with `checker`) the health checker (both read `current`)."""
        rpc = self._rpc()
        for p in self.processes():
            if (p.slot is not None or (checker and p.name == HEALTH)) and p.state in ("RUNNING", "STARTING"):
                with contextlib.suppress(SupervisorError):  # it may exit meanwhile; the ack wait reports it
                    rpc.supervisor.signalProcess(f"{p.name}:{p.name}", sig)

    # -- starting and stopping -------------------------------------------------

    def render(self, workers: int, stopwaitsecs: int, foreground: bool, watch: str | None = None,
               keepalived: str | None = None) -> str:
        template = jinja2.Environment(autoescape=False, keep_trailing_newline=True).from_string(
            files("lbc.templates").joinpath("supervisord.conf.j2").read_text()
        )
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        minfds = min(65536, hard) if hard != resource.RLIM_INFINITY else 65536
        return template.render(
            run=self.run,
            state=self.state.root.resolve(),
            socket=self.socket,
            python=sys.executable,
            workers=workers,
            stopwaitsecs=stopwaitsecs,
            minfds=minfds,
            foreground=foreground,
            watch=watch,
            keepalived=keepalived,
            keepalived_conf=self.keepalived_conf,
        )

    def write_config(self, table: RoutingTable, foreground: bool) -> None:
        self.run.mkdir(parents=True, exist_ok=True)
        (self.run / "openssl.cnf").write_text(files("lbc.templates").joinpath("openssl.cnf.j2").read_text())
        watch = self.watch_target.read_text().strip() if self.watch_target.exists() else None
        keepalived = self._write_keepalived(table)
        replace_file(self.conf, self.render(worker_count(table), stop_wait_seconds(table), foreground, watch, keepalived).encode())

    def _write_keepalived(self, table: RoutingTable) -> str | None:
        """keepalived.conf for this node when lbc runs keepalived; the
        binary's path, or None."""
        ha = table.settings.ha
        if ha is None or not ha.keepalived:
            return None
        binary = shutil.which("keepalived") or next(
            (p for p in ("/usr/sbin/keepalived", "/sbin/keepalived") if os.access(p, os.X_OK)), None)
        if binary is None:
            raise LbcError("global.ha: keepalived is not installed (Debian's keepalived package); or set "
                           "global.ha.keepalived: false and run it yourself with `lbc export keepalived`")
        name = self.ha_node_file.read_text().strip() if self.ha_node_file.exists() else None
        node = keepalived.this_node(ha, name)
        replace_file(self.keepalived_conf, keepalived.render(ha, node, self.state.root).encode())
        return binary

    def start(self, table: RoutingTable, foreground: bool, watch: Path | None = None,
              ha_node: str | None = None) -> subprocess.Popen | None:
        """Start supervisord (and with it the workers). Daemonized, it forks
        and returns once the control socket answers; in the foreground the
        caller gets the child process to wait on."""
        self.run.mkdir(parents=True, exist_ok=True)
        shmmod.create(self.shm_file)
        for stale in self.run.glob("worker-*.pid"):
            stale.unlink()
        if watch is not None:
            self.watch_target.write_text(f"{watch}\n")
        else:
            self.watch_target.unlink(missing_ok=True)
        if ha_node is not None:
            self.ha_node_file.write_text(f"{ha_node}\n")
        else:
            self.ha_node_file.unlink(missing_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.socket.unlink()
        self.write_config(table, foreground)
        cmd = [sys.executable, "-m", "supervisor.supervisord", "-c", str(self.conf)]
        # Own session: a Ctrl-C at the terminal reaches lbc, which then asks
        # supervisord to drain, instead of hitting every worker at once.
        proc = subprocess.Popen(cmd, start_new_session=True, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if not foreground and proc.poll() not in (None, 0):
                break
            if foreground and proc.poll() is not None:
                break
            if self.socket.exists() and self.running():
                if not foreground:
                    proc.wait(5)
                    if proc.stderr:
                        proc.stderr.close()
                return proc if foreground else None
            time.sleep(0.05)
        err = proc.stderr.read().decode(errors="replace").strip() if proc.stderr and proc.poll() is not None else ""
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        raise SupervisorError(f"supervisord did not start: {err or 'no answer on ' + str(self.socket)}"
                              f" (see {self.run / 'supervisord.log'})")

    def restart_admin(self) -> None:
        """The admin API serves the settings it started with: restart it."""
        rpc = self._rpc()
        with contextlib.suppress(SupervisorError):  # not running (off, or between restarts)
            rpc.supervisor.stopProcess(f"{ADMIN}:{ADMIN}")
        rpc.supervisor.startProcess(f"{ADMIN}:{ADMIN}", False)

    def reconcile(self, table: RoutingTable) -> None:
        """Add or remove programs (workers, keepalived) to match the table,
        leaving the others running; a running keepalived rereads its
        configuration (SIGHUP)."""
        self.write_config(table, foreground=self._foreground())
        rpc = self._rpc()
        added, changed, removed = rpc.supervisor.reloadConfig()[0]
        for name in removed:
            with contextlib.suppress(SupervisorError):
                rpc.supervisor.stopProcessGroup(name)
            rpc.supervisor.removeProcessGroup(name)
        for name in added:
            rpc.supervisor.addProcessGroup(name)
        if KEEPALIVED not in added and table.settings.ha is not None and table.settings.ha.keepalived:
            with contextlib.suppress(SupervisorError):  # not running: it reads the file as it starts
                rpc.supervisor.signalProcess(f"{KEEPALIVED}:{KEEPALIVED}", "HUP")

    def _foreground(self) -> bool:
        try:
            return "nodaemon=true" in self.conf.read_text()
        except OSError:
            return False

    def shutdown(self, timeout: float) -> None:
        """Ask supervisord to stop every worker (they drain) and exit; wait."""
        pid = self.supervisord_pid()
        if pid is None:
            raise SupervisorError(f"lbc is not running for {self.state.root}")
        self._rpc().supervisor.shutdown()
        try:
            psutil.Process(pid).wait(timeout)
        except psutil.TimeoutExpired:
            raise SupervisorError(f"supervisord (pid {pid}) did not stop within {timeout:g}s") from None
        except psutil.NoSuchProcess:
            pass

    # -- acks ----------------------------------------------------------------------------

    def wait_for(self, version: str, timeout: float) -> list[Ack]:
        """Wait until every worker serves `version`, or reports why it cannot,
        or the timeout passes. Returns one Ack per worker program."""
        deadline = time.monotonic() + timeout
        memory = shmmod.Shm(self.shm_file)
        try:
            while True:
                procs = self.workers()
                acks = [self._ack(memory, p, version) for p in procs]
                if all(a is not None for a in acks) or time.monotonic() >= deadline:
                    break
                time.sleep(0.02)
        finally:
            memory.close()
        return [a if a is not None else Ack(p.name, p.pid, False, f"did not report serving {version[:12]} within "
                                                               f"{timeout:g}s ({p.state.lower()})")
                for a, p in zip(acks, procs, strict=True)]

    @staticmethod
    def _ack(memory: shmmod.Shm, p: Process, version: str) -> Ack | None:
        if p.state in ("FATAL", "EXITED", "STOPPED", "UNKNOWN"):
            return Ack(p.name, p.pid, False, f"is {p.state.lower()}")
        info = memory.read_worker(p.slot)
        if p.state == "RUNNING" and info.pid == p.pid:
            if info.version == version:
                return Ack(p.name, p.pid, True, "")
            if info.attempted == version and info.error:
                return Ack(p.name, p.pid, False, info.error)
        return None


class _TranslatedProxy:
    """XML-RPC calls with the library's exceptions turned into SupervisorError."""

    def __init__(self, proxy: xmlrpc.client.ServerProxy, path: str = "") -> None:
        self._proxy = proxy
        self._path = path

    def __getattr__(self, name: str) -> _TranslatedProxy:
        return _TranslatedProxy(self._proxy, f"{self._path}.{name}" if self._path else name)

    def __call__(self, *args):
        method = self._proxy
        for part in self._path.split("."):
            method = getattr(method, part)
        try:
            return method(*args)
        except xmlrpc.client.Fault as e:
            raise SupervisorError(f"supervisord refused {self._path}: {e.faultString}") from None
        except (OSError, http.client.HTTPException, xmlrpc.client.ProtocolError) as e:
            raise SupervisorError(f"cannot reach supervisord: {e}") from None


# -- binds -----------------------------------------------------------------------------------


def probe_binds(table: RoutingTable, skip: set[tuple[str, str, int]] = frozenset()) -> list[str]:
    """Listeners (and the admin API) whose address is taken. Each is bound without SO_REUSEPORT:
    with it, a second bind by the same user would silently succeed and split
    the traffic."""
    problems = []
    binds = [(x.socket_key, f"listener {x.name}") for x in table.listeners]
    if table.settings.admin is not None:
        binds.append((("tcp", table.settings.admin.host, table.settings.admin.port), "the admin API"))
    for key, what in binds:
        transport, host, port = key
        if key in skip:
            continue
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM if transport == "udp" else socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
        except OSError as e:
            reason = "already in use" if e.errno == errno.EADDRINUSE else e.strerror
            owner = _owner(transport, host, port)
            problems.append(f"{what}: {format_hostport(host, port)}/{transport} is {reason}{owner}")
        finally:
            sock.close()
    return problems


def _owner(transport: str, host: str, port: int) -> str:
    kind = "udp" if transport == "udp" else "tcp"
    try:
        for conn in psutil.net_connections(kind=kind):
            if conn.laddr and conn.laddr.port == port and conn.laddr.ip in (host, "0.0.0.0", "::") and conn.pid:
                if kind == "tcp" and conn.status != psutil.CONN_LISTEN:
                    continue
                return f" (by pid {conn.pid}, {psutil.Process(conn.pid).name()})"
    except psutil.Error:
        pass
    return ""


def enable_listener_migration() -> bool:
    """net.ipv4.tcp_migrate_req=1: a closing SO_REUSEPORT listener hands its
    queued connections to the others instead of resetting them."""
    path = Path("/proc/sys/net/ipv4/tcp_migrate_req")
    try:
        if path.read_text().strip() != "1":
            path.write_text("1\n")
        return True
    except OSError:
        return False


def stop_processes(pids: list[int], timeout: float) -> None:
    """SIGTERM (workers drain), wait up to `timeout` seconds for every one
    to exit, then SIGKILL what is left, as supervisord stops a program."""
    procs = []
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            procs.append(psutil.Process(pid))  # signals through it cannot reach a reused pid
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.terminate()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not all(_gone(p) for p in procs):
        time.sleep(0.05)
    for proc in procs:
        if not _gone(proc):
            with contextlib.suppress(psutil.Error):
                proc.kill()


def _gone(proc: psutil.Process) -> bool:
    try:
        return not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE
    except psutil.Error:
        return True


def _pid_in(pid_file: Path) -> int | None:
    try:
        return int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return None


def held_sockets(table: RoutingTable, pids: list[int]) -> set[tuple[str, str, int]]:
    """The table's sockets (listeners' socket_key, and the admin API's) that
    processes `pids` have bound: leftover workers, whose successors join
    them there, and a leftover admin API, stopped before its successor
    starts."""
    held = set()
    if pids:
        with contextlib.suppress(psutil.Error):
            for c in psutil.net_connections(kind="inet"):
                if c.pid not in pids or not c.laddr:
                    continue
                if c.type == socket.SOCK_DGRAM:
                    held.add(("udp", _ip(c.laddr.ip), c.laddr.port))
                elif c.status == psutil.CONN_LISTEN:
                    held.add(("tcp", _ip(c.laddr.ip), c.laddr.port))
    out = set()
    keys = [x.socket_key for x in table.listeners]
    if table.settings.admin is not None:  # as probe_binds names it
        keys.append(("tcp", table.settings.admin.host, table.settings.admin.port))
    for key in keys:
        transport, host, port = key
        if ("udp" if transport == "udp" else "tcp", _ip(host), port) in held:
            out.add(key)
    return out


def _ip(host: str) -> str:
    try:
        return ipaddress.ip_address(host).compressed
    except ValueError:
        return host
