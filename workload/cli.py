"""The `cleanlease` command: host, guest, writer, simulate, bench."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile

DESCRIPTION = """\
cleanlease: a reference prototype of clean-lease cache coherency for virtio-fs.

A host daemon exports a directory to guest processes; a guest may cache an
inode only while it is clean on the host.  The first dirtying write recalls
every guest's copy before it lands; leases come back once the inode is flushed.

  cleanlease host --export DIR --listen unix:/tmp/cl.sock
  cleanlease mount unix:/tmp/cl.sock /mnt/share     mount it (for people; root)
  cleanlease token cl.token
  cleanlease host --export DIR --listen tcp::7070 --token-file cl.token
  cleanlease simulate --workload read-mostly --guests 3 --duration 5
  cleanlease simulate --workload host-edit --policies all --plot out.png

An administrator's commands, over the daemon's control socket (docs/seeds.md):
  cleanlease freeze FILE -- cp FILE /backup/      hold every modification of FILE
  cleanlease mark FILE; cleanlease changes FILE --since MARK
  cleanlease backup FILE /backup/FILE --since MARK
"""


def run_loop(coro, loop_name: str = "uvloop"):
    """Run `coro` on uvloop (the default) or the stock asyncio loop."""
    if loop_name == "uvloop":
        import uvloop

        return uvloop.run(coro)
    return asyncio.run(coro)


def _positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError("must be greater than 0")
    return value


def _workload_arguments(parser: argparse.ArgumentParser) -> None:
    from workload.workloads import WORKLOADS

    parser.add_argument("--workload", default="read-mostly", metavar="NAME",
                        help=f"one of: {', '.join(WORKLOADS)} (default: %(default)s)")
    parser.add_argument("--trace", metavar="FILE",
                        help="replay a JSON-lines trace instead (docs/workloads.md)")
    parser.add_argument("--guests", type=int, default=3, help="guest processes (default: %(default)s)")
    parser.add_argument("--host-writers", type=int, default=0,
                        help="extra host-local writer processes (default: workload's own)")
    parser.add_argument("--seed", type=int, default=1, help="workload seed (default: %(default)s)")
    parser.add_argument("--duration", type=_positive_float, default=5.0, metavar="S",
                        help="seconds of workload (default: %(default)s)")


def _loop_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop",
                        help="event loop (default: %(default)s)")


def build_parser() -> argparse.ArgumentParser:
    from host import main as host_main

    parser = argparse.ArgumentParser(prog="cleanlease", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    host = sub.add_parser("host", help="run the host daemon",
                          description="Serve DIR to guests until SIGTERM/SIGINT. Prints "
                                      "'READY <address> ...' once it accepts connections.")
    host_main.add_arguments(host)
    _loop_argument(host)
    host.set_defaults(func=_host)

    from workload import mount_command

    mount = sub.add_parser("mount", help="mount an export at MNT (for people)",
                           description=mount_command.__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    mount_command.add_arguments(mount)
    mount.set_defaults(func=mount_command.run)

    guest = sub.add_parser("guest", help="run one guest actor of a workload (the "
                                         "simulation's; to mount an export, use mount)",
                           description="Connect to a host and run one guest actor of a "
                                       "workload (used by simulate; prints READY, waits for "
                                       "'GO <t0_ns>' on stdin).")
    guest.add_argument("--connect", required=True, metavar="ADDR", help="unix:PATH or tcp:HOST:PORT")
    guest.add_argument("--actor", help="which actor of the workload (g0, g1, ...); required "
                                        "unless --mount")
    guest.add_argument("--log", help="operation log to write (JSON lines); required unless --mount")
    guest.add_argument("--stats", help="counters to write (JSON); required unless --mount, "
                                       "where it is optional and kept up to date")
    guest.add_argument("--mount", metavar="MNT",
                       help="mount the export at MNT through /dev/fuse (root only).  Without "
                            "--log: serve it until SIGINT/SIGTERM or until the host goes away; "
                            "prints 'READY MNT ...'.  With --actor, --log and --stats: run that "
                            "actor's operations as system calls on files under MNT, then "
                            "unmount (what simulate --mount starts; docs/mount.md)")
    guest.add_argument("--token-file", metavar="FILE",
                       help="prove to the host that we know the token in FILE, and make the "
                            "host prove it too (a host over tcp: always asks).  Default: "
                            "$CLEANLEASE_TOKEN, if set")
    guest.add_argument("--token", metavar="TOKEN",
                       help="the token itself (visible in `ps`; prefer --token-file)")
    guest.add_argument("--cache-bytes", type=int, default=64 << 20,
                       help="page cache size (default: %(default)s)")
    _workload_arguments(guest)
    _loop_argument(guest)
    guest.set_defaults(func=_guest)

    writer = sub.add_parser("writer", help="run one host-local writer of a workload",
                            description="Write into the export directly, as a host program "
                                        "would (used by simulate).")
    writer.add_argument("--export", required=True, metavar="DIR")
    writer.add_argument("--actor", required=True, help="which host-local actor (h0, h1, ...)")
    writer.add_argument("--log", required=True)
    writer.add_argument("--stats", required=True)
    _workload_arguments(writer)
    _loop_argument(writer)
    writer.set_defaults(func=_writer)

    token = sub.add_parser("token", help="make a new random token for --token-file",
                           description="Make 32 random bytes, as hex: a token for `cleanlease "
                                       "host --token-file` and its guests.  Whoever has it may "
                                       "use the export.")
    token.add_argument("file", nargs="?", metavar="FILE",
                       help="create FILE (mode 600, never overwritten) and write the token "
                            "there; without FILE, print it")
    token.set_defaults(func=_token)

    sim = sub.add_parser("simulate", help="run a workload with real processes and report",
                         description="Start a host, guest processes and host-local writers "
                                     "on a fresh export, run a named workload, check every "
                                     "read for staleness and print the figures.")
    _workload_arguments(sim)
    sim.add_argument("--policy", default="clean-lease",
                     help="policy for a single run (default: %(default)s)")
    sim.add_argument("--policies", metavar="LIST",
                     help="comma-separated policies, or 'all', to compare side by side")
    sim.add_argument("--cache-bytes", type=int, default=64 << 20)
    sim.add_argument("--lease-term", type=int, default=2000, metavar="MS")
    sim.add_argument("--ack-timeout", type=int, default=500, metavar="MS")
    sim.add_argument("--clean-after", type=int, default=20, metavar="MS",
                     help="host flushes a dirty inode after this idle time (default: %(default)s)")
    sim.add_argument("--detector", default="auto", choices=("auto", "none", "inotify", "fanotify"),
                     help="how the host sees host-local writes (default: %(default)s)")
    sim.add_argument("--granularity", default="range", choices=("inode", "range"),
                     help="what a clean-lease recall covers: the whole inode, or only the "
                          "pages a write changes (the host falls back to inode under inotify, "
                          "and the report says so; default: %(default)s)")
    sim.add_argument("--json", metavar="PATH", help="write the figures as JSON")
    sim.add_argument("--plot", metavar="PNG", help="plot hit rate and stale reads per policy")
    sim.add_argument("--workdir", metavar="DIR",
                     help="where exports go (default: a temporary directory under /tmp)")
    sim.add_argument("--keep", action="store_true", help="keep exports and logs")
    sim.add_argument("--mount", action="store_true",
                     help="run each guest actor through its own FUSE mount (root, /dev/fuse): "
                          "the workload's operations become system calls on the mount, and "
                          "hits are reads the kernel served without a READ (docs/mount.md)")
    sim.add_argument("--tcp", action="store_true",
                     help="connect guests over loopback TCP with a fresh token (the token "
                          "exchange of docs/protocol.md, section 3a) instead of a Unix socket")
    _loop_argument(sim)
    sim.set_defaults(func=_simulate)
    chaos = sub.add_parser("chaos", help="seeded fault injection against a real simulation",
                           description="Run a multi-writer workload under clean-lease while "
                                       "stopping guests, cutting connections, restarting the "
                                       "host and sending malformed frames; then report stale "
                                       "reads, lost writes, the worst writer stall and daemon "
                                       "crashes. Exits 1 if any promise broke.")
    chaos.add_argument("--workload", default="read-mostly")
    chaos.add_argument("--policy", default="clean-lease")
    chaos.add_argument("--guests", type=int, default=3)
    chaos.add_argument("--seed", type=int, default=1)
    chaos.add_argument("--duration", type=_positive_float, default=20.0, metavar="S")
    chaos.add_argument("--mean-gap", type=_positive_float, default=0.8, metavar="S",
                       help="mean time between faults (default: %(default)s)")
    chaos.add_argument("--lease-term", type=int, default=1000, metavar="MS")
    chaos.add_argument("--ack-timeout", type=int, default=300, metavar="MS")
    chaos.add_argument("--workdir", default=None)
    chaos.add_argument("--keep", action="store_true")
    chaos.add_argument("--tcp", action="store_true",
                       help="guests over loopback TCP with a token: every reconnect and host "
                            "restart runs the token exchange again, and the fuzzer is a peer "
                            "without the token")
    chaos.set_defaults(func=_chaos)
    from workload import chaos_mount

    cmount = sub.add_parser("chaos-mount", help="seeded faults against mounted guests and "
                                                 "applications reading through them",
                            description="Run a host, mounted guests and applications that read "
                                        "through the mounts with pread(2) and mappings, and "
                                        "write; cut, stop and kill mount guests at seeded "
                                        "instants; report stale reads, lost writes and the "
                                        "worst writer stall. Exits 1 if any promise broke "
                                        "(workload/chaos_mount.py).")
    chaos_mount.add_arguments(cmount)
    cmount.set_defaults(func=chaos_mount.run)

    from workload.dst import run as dst_run

    dst = sub.add_parser("dst", help="deterministic simulation: many seeded schedules of the "
                                     "real host and guest code on virtual time",
                         description="Run the project's own daemon (lease table, recalls, "
                                     "sessions, handlers) and guest clients in one process on "
                                     "a virtual-time event loop, with simulated connections "
                                     "(delays, stalls, cuts), per-node clocks, a seeded fault "
                                     "layer on the real backend, host-local writers, guest "
                                     "pauses, kills and host restarts; check every schedule "
                                     "(stale reads, lost writes, recall stalls, leftover lease "
                                     "state). A failing seed prints its trace; --seed S replays "
                                     "it bit for bit (docs/simulation.md). Exits 1 on a failure.")
    dst_run.add_arguments(dst)
    dst.set_defaults(func=dst_run.main)

    res = sub.add_parser("results", help="regenerate docs/results.md (all workloads x policies)",
                         description="Run every workload under every policy and write the "
                                     "tables and plots to docs/results.md.")
    res.add_argument("--workloads", metavar="LIST", help="comma-separated subset (default: all)")
    res.add_argument("--guests", type=int, default=3)
    res.add_argument("--seed", type=int, default=1)
    res.add_argument("--duration", type=_positive_float, default=5.0, metavar="S")
    res.add_argument("--detector", default="auto", choices=("auto", "none", "inotify", "fanotify"))
    res.add_argument("--output", default="docs/results.md")
    res.add_argument("--img-dir", default="docs/img")
    res.add_argument("--workdir", default=None, help="where exports go (default: under /tmp)")
    res.set_defaults(func=_results)

    bench = sub.add_parser("bench", help="measure codec, cache hit/miss, recall stall, daemon "
                                         "throughput and memory, each against a baseline",
                           description="Measure, each against a baseline measured in the same "
                                       "run: codec µs per message (fast path and construct) vs "
                                       "struct; 4 KiB miss via a real host vs a raw echo of the "
                                       "same bytes; hit latency; the first dirtying write with "
                                       "1/4/16 lease holders vs one round trip; daemon ops/s "
                                       "with 1-16 guests; uvloop vs asyncio; cache memory per "
                                       "MiB (docs/performance.md).")
    bench.add_argument("--json", metavar="PATH", help="also write every figure as JSON")
    bench.add_argument("--quick", action="store_true",
                       help="fewer samples (a smoke run; figures are noisier)")
    bench.set_defaults(func=_bench)

    from host.control import cli as control_cli

    control_cli.add_commands(sub)  # freeze, thaw, flush, seal, unseal, mark, changes, backup
    return parser


def _bench(args) -> int:
    from workload import bench

    return bench.run(args)


def _chaos(args) -> int:
    from workload import chaos

    args.workdir = args.workdir or tempfile.mkdtemp(prefix="cleanlease-chaos-")
    os.makedirs(args.workdir, exist_ok=True)
    return chaos.run(args)


def _results(args) -> int:
    from workload import results

    args.workdir = args.workdir or tempfile.mkdtemp(prefix="cleanlease-results-")
    os.makedirs(args.workdir, exist_ok=True)
    return results.main(args)


def _host(args) -> int:
    from host import main as host_main

    args.run_loop = lambda coro: run_loop(coro, args.loop)
    return host_main.main(args)


def _make_workload(args):
    from workload.workloads import make_workload

    try:
        return make_workload(args.workload, args.guests, args.host_writers, args.trace)
    except ValueError as exc:
        raise SystemExit(f"cleanlease: {exc}")


def _token(args) -> int:
    from protocol.auth import new_token, write_token_file

    if args.file is None:
        print(new_token())
        return 0
    try:
        write_token_file(args.file)
    except OSError as exc:
        raise SystemExit(f"cleanlease token: cannot create {args.file}: {exc.strerror} "
                         f"(an existing token file is never overwritten)")
    print(f"cleanlease token: wrote a new token to {args.file} (mode 600)", file=sys.stderr)
    return 0


def _resolve_guest_token(args) -> None:
    """args.token becomes the token's bytes (or None), from --token, --token-file or
    $CLEANLEASE_TOKEN; exits with the reason if it cannot be used."""
    from protocol.auth import TokenError, token_from

    try:
        args.token = token_from(args.token, args.token_file, os.environ)
    except TokenError as exc:
        raise SystemExit(f"cleanlease guest: {exc}")


def _guest(args) -> int:
    _resolve_guest_token(args)
    if args.mount and args.log is None:
        return _guest_mount(args)
    missing = [f"--{name}" for name in ("actor", "log", "stats") if getattr(args, name) is None]
    if missing:
        raise SystemExit(f"cleanlease guest: {', '.join(missing)} required (unless --mount MNT)")
    if args.mount:
        return _guest_mount_actor(args)
    from workload.agent import run_guest

    return run_loop(run_guest(args, _make_workload(args)), args.loop)


def _guest_mount_actor(args) -> int:
    """`cleanlease guest --mount MNT --actor gN --log L --stats S ...`: one guest actor of
    a workload, through a FUSE mount (workload/mount_agent.py; simulate --mount)."""
    import logging

    from guest.fuse_device import unavailable_reason
    from workload.mount_agent import run_mount_actor

    why = unavailable_reason()
    if why:
        raise SystemExit(f"cleanlease guest: cannot mount: {why}")
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format=f"guest {args.actor} %(levelname)s %(message)s")
    return run_loop(run_mount_actor(args, _make_workload(args)), args.loop)


def _guest_mount(args) -> int:
    """`cleanlease guest --connect ADDR --mount MNT`: a guest that mounts (guest/mount/)."""
    import logging

    from guest.fuse_device import unavailable_reason
    from guest.mount import run_mount

    why = unavailable_reason()
    if why:
        raise SystemExit(f"cleanlease guest: cannot mount: {why}")
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="guest %(levelname)s %(message)s")
    return run_loop(run_mount(args.connect, args.mount, name=args.actor or "mount",
                              stats_path=args.stats, token=args.token), args.loop)


def _writer(args) -> int:
    from workload.agent import run_host_writer

    return run_loop(run_host_writer(args, _make_workload(args)), args.loop)


def _simulate(args) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from protocol.messages import Policy
    from workload import report
    from workload.simulate import SimOptions, SimulationError, run_policy

    workload = _make_workload(args)
    if args.policies:
        labels = [p.label for p in Policy] if args.policies == "all" else args.policies.split(",")
    else:
        labels = [args.policy]
    try:
        labels = [Policy.from_label(label.strip()).label for label in labels]
    except ValueError as exc:
        raise SystemExit(f"cleanlease simulate: {exc}")
    opts = SimOptions(workload=args.workload, guests=args.guests, host_writers=args.host_writers,
                      duration=args.duration, seed=args.seed, cache_bytes=args.cache_bytes,
                      lease_term_ms=args.lease_term, ack_timeout_ms=args.ack_timeout,
                      clean_after_ms=args.clean_after, detector=args.detector,
                      granularity=args.granularity, loop=args.loop,
                      trace=args.trace, keep=args.keep, mount=args.mount, tcp=args.tcp)
    if args.mount:
        from guest.fuse_device import unavailable_reason

        why = unavailable_reason()
        if why:
            raise SystemExit(f"cleanlease simulate --mount: cannot mount: {why}")
    # A pipe or a file gets wide tables rather than squeezed ones.
    console = Console(width=None if sys.stdout.isatty() else 140)
    workdir = args.workdir or tempfile.mkdtemp(prefix="cleanlease-")
    os.makedirs(workdir, exist_ok=True)
    runs = []
    with Progress(TextColumn("{task.description}"), BarColumn(), TimeRemainingColumn(),
                  console=Console(stderr=True), transient=True) as progress:
        for label in labels:
            task = progress.add_task(f"{workload.name} / {label}", total=1.0)
            try:
                runs.append(run_policy(workload, label, opts, workdir,
                                       progress=lambda f, t=task: progress.update(t, completed=f)))
            except SimulationError as exc:
                console.print(f"[red]simulation failed under {label}:[/red] {exc}")
                return 1
            progress.update(task, completed=1.0)
    rows = report.print_runs(console, runs, per_guest=len(runs) == 1)
    console.print("guests connect over: " + ("loopback TCP, token-authenticated" if args.tcp
                                             else "a Unix socket"))
    if args.json:
        report.write_json(args.json, runs, vars(opts))
    if args.plot:
        report.plot(args.plot, workload.name, rows)
    if not args.keep and not args.workdir:
        import shutil

        shutil.rmtree(workdir, ignore_errors=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return args.func(args) or 0


if __name__ == "__main__":
    sys.exit(main())
