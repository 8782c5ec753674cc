#!/usr/bin/env python3
"""How long do validate, compile and plan take on a big config?

Target (the issue): validate + compile + plan of 1,000 pools x 10 backends
(10,000 backends, 1,000 routes) in under 2 s, as a whole `lbc plan` process.

    .venv/bin/python bench/config_speed.py            # or: make bench
    .venv/bin/python bench/config_speed.py --runs 9 --profile 25

What it does, in a temporary directory (removed afterwards unless --keep):
1. generates the base config and a variant of it with bench/gen_config.py;
2. `lbc apply`s the base into a fresh state directory;
3. times whole processes (time.perf_counter around subprocess.run), after a
   warm-up round, with the commands interleaved so machine noise hits them
   alike: interpreter + `import lbc.cli` alone (the fixed cost of any command),
   `lbc validate BIG`, `lbc compile BIG -o /dev/null`, `lbc plan BIG` (no
   changes) and `lbc plan VARIANT` (the target);
4. prints min / median / max wall seconds and the verdict (median of
   `lbc plan VARIANT` under the target);
5. runs the plan pipeline stage by stage in fresh processes and prints each
   stage's median time and the time the garbage collector took in it;
6. with --profile N, runs `lbc plan VARIANT` under cProfile and prints the top
   N functions by own time and by cumulative time.

Only the standard library does the measuring, so anyone can rerun it. Quote
medians: the machine this was written on is a noisy, shared 2-core box.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
GEN = HERE / "gen_config.py"
TARGET_S = 2.0


def lbc_command() -> list[str]:
    """The installed `lbc` script beside this interpreter, else `python -m lbc`."""
    script = Path(sys.executable).parent / "lbc"
    return [str(script)] if script.exists() else [sys.executable, "-m", "lbc"]


def run(cmd: list[str], *, ok: tuple[int, ...] = (0,)) -> tuple[float, subprocess.CompletedProcess[bytes]]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True)
    elapsed = time.perf_counter() - start
    if proc.returncode not in ok:
        sys.stderr.write(proc.stderr.decode(errors="replace")[-4000:])
        raise SystemExit(f"config_speed: {' '.join(cmd)} exited {proc.returncode}")
    return elapsed, proc


# -- the in-process breakdown (runs in a fresh child process) ------------------------


class _GcTimer:
    """Time spent in the cyclic garbage collector, via gc.callbacks."""

    def __init__(self) -> None:
        self.total = 0.0
        self.collections = 0
        self._start = 0.0

    def __call__(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.total += time.perf_counter() - self._start
            self.collections += 1


def breakdown(config_path: str, state_path: str) -> dict[str, list[float]]:
    """One `lbc plan` worth of work, stage by stage, as lbc.service.plan_file and
    lbc.config.check_document do it. Returns stage -> [seconds, gc seconds]."""
    gc_timer = _GcTimer()
    gc.callbacks.append(gc_timer)
    stages: dict[str, list[float]] = {}

    def stage(name: str, fn, *args, **kwargs):
        gc_before = gc_timer.total
        t0 = time.perf_counter()
        result = fn(*args, **kwargs)
        stages[name] = [time.perf_counter() - t0, gc_timer.total - gc_before]
        return result

    def imports():
        import lbc.cli  # noqa: F401  (what every `lbc` command imports)

    stage("import lbc.cli", imports)

    from types import MappingProxyType

    from lbc import table as tablemod
    from lbc.compiler import compile_config
    from lbc.config import Config, files, freeze, schema, semantic
    from lbc.config.diagnostics import ERROR
    from lbc.config.loader import read_file
    from lbc.plan import diff
    from lbc.state import StateDir

    doc = stage("read + parse (loader.read_file)", read_file, config_path)
    build = getattr(schema, "_validator", None)  # private; cached after the first call
    if build is not None:
        stage("schema: build validator (cold)", build)
    findings = stage("schema.check", schema.check, doc)
    stage("schema.fill_defaults", schema.fill_defaults, doc.data)
    findings += stage("semantic.check", semantic.check, doc)
    found = stage("files.collect", files.collect, doc, files.utcnow())
    findings += found.diagnostics

    def finish():
        ordered = sorted(set(findings))
        if any(d.severity == ERROR for d in ordered):
            raise SystemExit("config_speed: the config has errors: " + "; ".join(map(str, ordered[:5])))
        return Config(source=doc.file, source_sha256=doc.sha256, tree=freeze(doc.data),
                      files=MappingProxyType(found.blobs), certs=MappingProxyType(found.certs),
                      warnings=tuple(ordered))

    config = stage("freeze (+ Config)", finish)
    table = stage("compile_config", compile_config, config)
    data = stage("table.dump + version_of", lambda: tablemod.dump(table))
    version = tablemod.version_of(data)
    base_version, base = stage("read live table (state.current_table)", StateDir(state_path).current_table)
    plan = stage("plan.diff", diff, base, table, base_version, version)
    stage("plan.render_text (printed by the CLI)", plan.render_text)
    gc.callbacks.remove(gc_timer)
    stages["(gc collections)"] = [float(gc_timer.collections), 0.0]
    return stages


# -- main -------------------------------------------------------------------------------


def fmt(s: float) -> str:
    return f"{s:7.3f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pools", type=int, default=1000)
    ap.add_argument("--backends", type=int, default=10)
    ap.add_argument("--listeners", type=int, default=4)
    ap.add_argument("--variant", type=int, default=1, help="which gen_config variant to plan; default 1")
    ap.add_argument("--runs", type=int, default=7, help="timed runs per command after the warm-up; default 7")
    ap.add_argument("--warmup", type=int, default=1, help="untimed rounds first; default 1")
    ap.add_argument("--breakdown-runs", type=int, default=3, help="fresh processes for the stage breakdown; default 3")
    ap.add_argument("--profile", type=int, default=0, metavar="N", help="print the top N cProfile entries of `lbc plan`")
    ap.add_argument("--target", type=float, default=TARGET_S, help=f"seconds; default {TARGET_S}")
    ap.add_argument("--keep", metavar="DIR", help="work in DIR and keep it (configs, state, profile)")
    ap.add_argument("--breakdown-child", nargs=2, metavar=("CONFIG", "STATE"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.breakdown_child:
        print(json.dumps(breakdown(*args.breakdown_child)))
        return 0

    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="lbc-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        return bench(args, work)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def bench(args: argparse.Namespace, work: Path) -> int:
    lbc = lbc_command()
    big, variant, state = work / "big.yaml", work / f"big-v{args.variant}.yaml", work / "state"
    shape = ["--pools", str(args.pools), "--backends", str(args.backends), "--listeners", str(args.listeners)]
    run([sys.executable, str(GEN), *shape, "-q", "-o", str(big)])
    run([sys.executable, str(GEN), *shape, "-q", "--variant", str(args.variant), "-o", str(variant)])
    if state.exists():
        shutil.rmtree(state)
    run([*lbc, "apply", str(big), "--state", str(state)])
    size = big.stat().st_size
    print(f"config: {args.pools} pools x {args.backends} backends, {args.listeners} listeners "
          f"({size / 1e6:.2f} MB YAML); variant {args.variant}; state applied from the base")
    print(f"python {sys.version.split()[0]} on {os.cpu_count()} CPUs; load average "
          + " ".join(f"{x:.2f}" for x in os.getloadavg()))
    print()

    plan_label = "lbc plan VARIANT --state S"
    commands = [
        ("python -c 'import lbc.cli'", [sys.executable, "-c", "import lbc.cli"]),
        ("lbc validate BIG", [*lbc, "validate", str(big)]),
        ("lbc compile BIG -o /dev/null", [*lbc, "compile", str(big), "-o", os.devnull]),
        ("lbc plan BIG --state S (no changes)", [*lbc, "plan", str(big), "--state", str(state)]),
        (plan_label, [*lbc, "plan", str(variant), "--state", str(state)]),
    ]
    times: dict[str, list[float]] = {label: [] for label, _ in commands}
    for _ in range(args.warmup):
        for _, cmd in commands:
            run(cmd)
    for _ in range(args.runs):
        for label, cmd in commands:  # interleaved: noise spreads over every command
            times[label].append(run(cmd)[0])

    width = max(len(label) for label, _ in commands)
    print(f"whole processes, wall seconds ({args.runs} runs after {args.warmup} warm-up):")
    print(f"  {'command':<{width}}  {'min':>7}  {'median':>7}  {'max':>7}")
    for label, _ in commands:
        t = times[label]
        print(f"  {label:<{width}}  {fmt(min(t))}  {fmt(statistics.median(t))}  {fmt(max(t))}")
    print("  load average after the runs: " + " ".join(f"{x:.2f}" for x in os.getloadavg()))
    median = statistics.median(times[plan_label])
    verdict = "PASS" if median < args.target else "FAIL"
    print(f"\ntarget: `{plan_label}` median {median:.3f} s vs {args.target:.1f} s -> {verdict}"
          f" ({median / args.target:.0%} of budget)\n")

    # Stage breakdown, in fresh processes (caches cold, as in a real `lbc plan`).
    samples: dict[str, list[list[float]]] = {}
    for _ in range(args.breakdown_runs):
        _, proc = run([sys.executable, __file__, "--breakdown-child", str(variant), str(state)])
        for name, value in json.loads(proc.stdout).items():
            samples.setdefault(name, []).append(value)
    collections = samples.pop("(gc collections)", [[0.0, 0.0]])
    rows = [(name, statistics.median(v[0] for v in vals), statistics.median(v[1] for v in vals))
            for name, vals in samples.items()]
    total = sum(r[1] for r in rows)
    width = max(len(r[0]) for r in rows)
    print(f"in-process breakdown of `lbc plan VARIANT` (median of {args.breakdown_runs} fresh processes):")
    print(f"  {'stage':<{width}}  {'seconds':>7}  {'share':>5}  {'of it gc':>8}")
    for name, t, g in rows:
        print(f"  {name:<{width}}  {fmt(t)}  {t / total:5.0%}  {fmt(g)} ")
    gc_total = sum(r[2] for r in rows)
    print(f"  {'total':<{width}}  {fmt(total)}  100%  {fmt(gc_total)}  "
          f"({statistics.median(c[0] for c in collections):.0f} gc collections)")
    print(f"  (whole-process median minus this total, about {median - total:.3f} s, is interpreter start-up, "
          "the CLI layer and exit)")

    if args.profile:
        profile(args, lbc, variant, state, work)
    return 0 if verdict == "PASS" else 1


def profile(args: argparse.Namespace, lbc: list[str], variant: Path, state: Path, work: Path) -> None:
    import pstats

    out = work / "plan.prof"
    cmd = [sys.executable, "-m", "cProfile", "-o", str(out), "-m", "lbc", "plan", str(variant), "--state", str(state)]
    elapsed, _ = run(cmd)
    print(f"\ncProfile of `lbc plan VARIANT` ({elapsed:.2f} s under the profiler; "
          f"profile in {out if args.keep else 'a temporary file'}):")
    for key in ("tottime", "cumulative"):
        print(f"\n-- top {args.profile} by {key} --")
        stats = pstats.Stats(str(out))
        stats.strip_dirs().sort_stats(key).print_stats(args.profile)


if __name__ == "__main__":
    sys.exit(main())
