"""The `lbc` command. Each command parses, calls lbc.service, prints, and
exits with the code the result object gives: 0 success, 1 error, and with
`plan --detailed-exitcode` 2 when there are changes."""

from __future__ import annotations

import contextlib
import json
import shlex
import signal
import sys
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer

from lbc import fleet, service
from lbc import table as tablemod
from lbc.config import load
from lbc.errors import ConfigInvalid, LbcError
from lbc.state import StateDir
from lbc.watch import Watcher, observer

app = typer.Typer(
    name="lbc",
    help="A load balancer driven like a compiler: validate, compile, plan and apply a YAML config.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

StateOption = Annotated[
    Path,
    typer.Option("--state", envvar="LBC_STATE_DIR", help="State directory (tables, history, lock).", show_default=True),
]
LockTimeout = Annotated[
    float, typer.Option("--lock-timeout", help="Seconds to wait for another lbc command holding the state lock.")
]
ConfigFile = Annotated[Path, typer.Argument(help="The YAML config file.", show_default=False)]
DEFAULT_STATE = Path(".lbc")


@contextlib.contextmanager
def _reported() -> Iterator[None]:
    """Turn lbc's errors into a message on stderr and their exit code."""
    try:
        yield
    except ConfigInvalid as e:
        for d in e.diagnostics:
            typer.echo(str(d), err=True)
        errors = sum(d.severity == "error" for d in e.diagnostics)
        typer.echo(f"lbc: {errors} error{'s' if errors != 1 else ''}; nothing was changed", err=True)
        raise typer.Exit(e.exit_code) from None
    except LbcError as e:
        typer.echo(f"lbc: {e}", err=True)
        raise typer.Exit(e.exit_code) from None


def _argv() -> str:
    return "lbc " + shlex.join(sys.argv[1:])


def _warn(warnings: tuple) -> None:
    for w in warnings:
        typer.echo(str(w), err=True)


@app.command()
def validate(files: Annotated[list[Path], typer.Argument(help="Config files to check.")]) -> None:
    """Check config files without touching any state. Exit 0 when all are valid."""
    failed = False
    for path in files:
        try:
            with _reported():
                config = load(path)
                _warn(config.warnings)
                typer.echo(f"{path}: valid")
        except typer.Exit:
            failed = True
    raise typer.Exit(1 if failed else 0)


@app.command("compile")
def compile_(
    file: ConfigFile,
    out: Annotated[Path | None, typer.Option("-o", "--out", help="Write the table here instead of stdout.")] = None,
) -> None:
    """Compile a config into a routing table (canonical JSON; its sha256 is its version)."""
    with _reported():
        compiled = service.compile_file(file)
        _warn(compiled.config.warnings)
        if out is None:
            sys.stdout.buffer.write(compiled.data + b"\n")
        else:
            out.write_bytes(compiled.data)
            typer.echo(f"Wrote table {compiled.version} to {out}", err=True)


NodeOption = Annotated[list[str] | None, typer.Option(
    "--node", help="A node's admin API (host:port, http://host:port, or a global.ha node's name); repeat for each.",
    show_default=False)]
AllNodes = Annotated[bool, typer.Option("--all-nodes", help="Every node of global.ha (their `admin` addresses).")]
TokenFile = Annotated[Path | None, typer.Option(
    "--token-file", envvar="LBC_ADMIN_TOKEN_FILE",
    help="The nodes' bearer token (first line); default: the config's global.admin.token_file.")]


def _fleet(compiled: service.Compiled, nodes: list[str] | None, all_nodes: bool, token_file: Path | None,
           **waits: float) -> tuple[tuple[fleet.Target, ...], Callable[[fleet.Target], fleet.HttpNodeApi]]:
    token = fleet.token(compiled, str(token_file) if token_file else None)
    return fleet.targets(nodes or (), compiled.table, all_nodes), lambda t: fleet.HttpNodeApi(t, token, **waits)


@app.command()
def plan(
    file: ConfigFile,
    state: StateOption = DEFAULT_STATE,
    as_json: Annotated[bool, typer.Option("--json", help="Print the plan as JSON.")] = False,
    detailed_exitcode: Annotated[
        bool, typer.Option("--detailed-exitcode", help="Exit 0 with no changes, 2 with changes, 1 on error.")
    ] = False,
    out: Annotated[Path | None, typer.Option("--out", help="Save the plan for `lbc apply PLAN.json`.")] = None,
    node: NodeOption = None,
    all_nodes: AllNodes = False,
    token_file: TokenFile = None,
) -> None:
    """Show what applying FILE would change in the live table, and its effect
    (with --node: on each node, read through its admin API)."""
    with _reported():
        if node or all_nodes:
            if out is not None:
                raise LbcError("--out saves the plan of one node; leave it out with --node")
            compiled = service.compile_file(file)
            _warn(compiled.config.warnings)
            fleet_plan = fleet.plan(compiled, *_fleet(compiled, node, all_nodes, token_file))
            typer.echo(json.dumps(fleet_plan.to_plain(), indent=2, sort_keys=True) if as_json
                       else fleet_plan.render_text(), nl=as_json)
            raise typer.Exit(fleet_plan.exit_code(detailed_exitcode))
        result, compiled = service.plan_file(file, StateDir(state))
        _warn(compiled.config.warnings)
        if as_json:
            typer.echo(json.dumps(result.to_plain(), indent=2, sort_keys=True))
        else:
            typer.echo(result.render_text(), nl=False)
        if out is not None:
            out.write_bytes(service.save_plan(result, compiled))
            typer.echo(f"Saved the plan to {out}; apply it with: lbc apply {out}", err=True)
    raise typer.Exit(result.exit_code(detailed_exitcode))


NoWait = Annotated[bool, typer.Option("--no-wait", help="Signal the workers but do not wait for them to serve it.")]
WaitTimeout = Annotated[float, typer.Option("--wait-timeout", help="Seconds to wait for every worker to serve it.")]


@app.command()
def apply(
    file: Annotated[Path, typer.Argument(help="A YAML config, or a plan saved with `lbc plan --out`.")],
    state: StateOption = DEFAULT_STATE,
    lock_timeout: LockTimeout = 30.0,
    no_wait: NoWait = False,
    wait_timeout: WaitTimeout = 10.0,
    node: NodeOption = None,
    all_nodes: AllNodes = False,
    token_file: TokenFile = None,
    partial: Annotated[bool, typer.Option(
        "--partial", help="With --node: when a node fails, leave the others on the new table.")] = False,
) -> None:
    """Validate, compile and install FILE as the live table, recording it in
    history; when workers run, swap it in and wait until every worker serves
    it (on failure the previous table is put back). With --node, on every
    node through its admin API: if one fails, the others are put back too."""
    with _reported():
        if node or all_nodes:
            if no_wait or service.read_saved_plan(file) is not None:
                raise LbcError("--node applies a config file, and waits for every node's workers: "
                               "leave out --no-wait and saved plans")
            compiled = service.compile_file(file)
            _warn(compiled.config.warnings)
            targets, api = _fleet(compiled, node, all_nodes, token_file, lock_timeout=lock_timeout,
                                  wait_timeout=wait_timeout)
            outcome = fleet.apply(compiled, targets, api, argv=_argv(), partial=partial)
            typer.echo(outcome.render_text(), nl=False)
            raise typer.Exit(outcome.exit_code())
        if partial:
            raise LbcError("--partial goes with --node")
        saved = service.read_saved_plan(file)
        if saved is None:
            compiled = service.compile_file(file)
            _warn(compiled.config.warnings)
            base = None
        else:
            base, compiled = (saved[0],), saved[1]
        result = service.apply(compiled, StateDir(state), argv=_argv(), lock_timeout=lock_timeout,
                               saved_plan_base=base, wait=not no_wait, ack_timeout=wait_timeout)
        typer.echo(result.render_text(), nl=False)
    raise typer.Exit(result.exit_code())


@app.command()
def history(
    state: StateOption = DEFAULT_STATE,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON record per line.")] = False,
) -> None:
    """List installed versions, oldest first; * marks the live one."""
    with _reported():
        store = StateDir(state)
        records, live = store.history(), store.current_version()
        for r in records:
            if as_json:
                typer.echo(json.dumps({**asdict(r), "live": r.version == live}, sort_keys=True))
                continue
            mark = "*" if r.version == live else " "
            source = r.source or (f"(from {r.previous[:12]})" if r.previous else "")
            typer.echo(f"{mark} {r.version[:12]}  {r.time}  {r.command:<8} {r.origin:<5} {r.who}  {source}")


@app.command()
def show(
    version: Annotated[str | None, typer.Argument(help="Version or unique prefix; default: the live one.")] = None,
    state: StateOption = DEFAULT_STATE,
) -> None:
    """Print an installed routing table as JSON."""
    with _reported():
        store = StateDir(state)
        if version is None:
            version = store.current_version()
            if version is None:
                raise LbcError(f"nothing is installed in {store.root}")
        table = store.read_table(store.resolve_version(version))
        typer.echo(json.dumps(tablemod.to_plain(table), indent=2, sort_keys=True))


@app.command()
def rollback(
    version: Annotated[str | None, typer.Argument(help="Version or unique prefix; default: the previous one.")] = None,
    state: StateOption = DEFAULT_STATE,
    lock_timeout: LockTimeout = 30.0,
    no_wait: NoWait = False,
    wait_timeout: WaitTimeout = 10.0,
) -> None:
    """Make an earlier table live again, through the same install path as apply."""
    with _reported():
        result = service.rollback(StateDir(state), version, argv=_argv(), lock_timeout=lock_timeout,
                                  wait=not no_wait, ack_timeout=wait_timeout)
        typer.echo(result.render_text(), nl=False)
    raise typer.Exit(result.exit_code())


@app.command()
def up(
    file: Annotated[Path | None, typer.Argument(help="Config to apply first; default: resume the live table.")] = None,
    state: StateOption = DEFAULT_STATE,
    foreground: Annotated[bool, typer.Option("--foreground", help="Stay attached; Ctrl-C drains and stops.")] = False,
    watch: Annotated[bool, typer.Option("--watch", help="Also run `lbc watch FILE` under supervisord.")] = False,
    ha_node: Annotated[str | None, typer.Option(
        "--ha-node", help="Which of global.ha's nodes this is (default: the one whose address is on this machine).")] = None,
    lock_timeout: LockTimeout = 30.0,
) -> None:
    """Start supervisord and the proxy workers, and return once every worker serves the table."""
    with _reported():
        if watch and file is None:
            raise LbcError("--watch needs the config FILE to watch")
        store = StateDir(state)
        result = service.up(store, file, foreground=foreground, argv=_argv(), lock_timeout=lock_timeout,
                            watch=file.resolve() if watch else None, ha_node=ha_node)
        typer.echo(result.render_text(), nl=False)
        if foreground:
            typer.echo("Running in the foreground; Ctrl-C drains and stops.")
            raise typer.Exit(service.wait_foreground(store, result))


@app.command()
def watch(
    file: ConfigFile,
    state: StateOption = DEFAULT_STATE,
    debounce: Annotated[float, typer.Option("--debounce", help="Quiet seconds before a change is read (and between its two reads).")] = 0.3,
    allow_destructive: Annotated[
        bool, typer.Option("--allow-destructive", help="Also apply changes that remove a listener or most backends.")
    ] = False,
    lock_timeout: LockTimeout = 30.0,
) -> None:
    """Apply FILE whenever it changes (foreground): valid, settled changes only; the last good table keeps serving."""
    with _reported():
        watcher = Watcher(file, StateDir(state), debounce=debounce, allow_destructive=allow_destructive,
                          argv=_argv(), lock_timeout=lock_timeout, say=lambda text: typer.echo(text, err=True))
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: watcher.stop())
        typer.echo(f"lbc watch: watching {file} (state {state})", err=True)
        watcher.run(observer(watcher.notify))


@app.command()
def down(
    state: StateOption = DEFAULT_STATE,
    drain_timeout: Annotated[
        float | None, typer.Option("--drain-timeout", help="Seconds in-flight requests may take (default: the table's).")
    ] = None,
) -> None:
    """Stop accepting, let in-flight requests finish, stop the workers and supervisord."""
    with _reported():
        typer.echo(service.down(StateDir(state), drain_timeout))


export_app = typer.Typer(no_args_is_help=True, help="Render configuration for programs beside lbc.")
app.add_typer(export_app, name="export")


@export_app.command("keepalived")
def export_keepalived(
    file: Annotated[Path, typer.Argument(help="Config with a global.ha section.")],
    state: StateOption = DEFAULT_STATE,
    node: Annotated[str | None, typer.Option(
        "--node", help="Which of global.ha's nodes (default: the one whose address is on this machine).")] = None,
) -> None:
    """keepalived.conf for one node: VRRPv3 for the virtual IPs, with lbc's node check as its script."""
    with _reported():
        typer.echo(service.export_keepalived(file, StateDir(state), node), nl=False)


@app.command("drain-node")
def drain_node(
    state: StateOption = DEFAULT_STATE,
    undo: Annotated[bool, typer.Option("--undo", help="Take traffic again.")] = False,
) -> None:
    """Make /healthz and the node check fail, so traffic moves to other nodes; this node serves on what reaches it."""
    with _reported():
        typer.echo(service.drain_node(StateDir(state), undo))


@app.command("reopen-logs")
def reopen_logs(state: StateOption = DEFAULT_STATE) -> None:
    """Make every worker reopen its access log (after moving it aside, as logrotate does)."""
    with _reported():
        typer.echo(service.reopen_logs(StateDir(state)))


@app.command()
def status(
    state: StateOption = DEFAULT_STATE,
    as_json: Annotated[bool, typer.Option("--json", help="Print the status as JSON.")] = False,
) -> None:
    """Processes, the table each worker serves, and per-backend counters."""
    with _reported():
        result = service.status(StateDir(state))
        if as_json:
            typer.echo(json.dumps(result.to_plain(), indent=2, sort_keys=True))
        else:
            typer.echo(result.render_text(), nl=False)


def main() -> None:
    import gc

    # A command is one short process that builds big trees of objects that all
    # live until it exits: the cyclic collector finds nothing to free, yet ran
    # hundreds of times (about 0.1 s of a big `lbc plan`). Move what the imports
    # made out of its sight and let it run rarely.
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)
    app()
