"""The administrator's commands: freeze, thaw, flush, seal, unseal, mark, changes, backup, status.

Each talks to a running daemon over its control socket (`--control`, or
$CLEANLEASE_CONTROL).  A hold lasts as long as the command that asked for
it: `cleanlease freeze PATH` holds the file until its standard input ends
(or SIGINT/SIGTERM), or, with `-- COMMAND ...`, while COMMAND runs.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading

from host.control import backup as backup_module
from host.control.client import ControlClient, ControlError, control_path, format_mark

HOLD_EPILOG = """\
The hold ends when this command ends: at the end of its standard input
(Ctrl-D), on SIGINT/SIGTERM, once COMMAND (after --) exits, or after
--max-hold seconds, whichever comes first; if this process is killed the
daemon notices the closed connection and lifts the hold; if the daemon dies,
every writer it held proceeds.  `cleanlease thaw PATH` from elsewhere lifts
it too.  Prints 'FROZEN PATH ...' (or 'SEALED') once nothing that must wait
is in flight any more.
"""


def _client(args) -> ControlClient:
    try:
        return ControlClient(control_path(args.control))
    except ConnectionError as exc:
        raise SystemExit(f"cleanlease {args.command}: {exc}")


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--control", metavar="SOCKET",
                        help="the daemon's control socket (default: $CLEANLEASE_CONTROL; a "
                             "daemon listening on unix:PATH serves it at PATH.control)")


def _fail(args, exc: ControlError) -> int:
    print(f"cleanlease {args.command}: {exc}", file=sys.stderr)
    return 1


def _hold(args, kind: str) -> int:
    word = "FROZEN" if kind == "freeze" else "SEALED"
    with _client(args) as client:
        try:
            held = getattr(client, kind)(args.path, args.max_hold or 0.0)
        except ControlError as exc:
            return _fail(args, exc)
        if client.last_message:
            print(f"cleanlease {args.command}: warning: {client.last_message}", file=sys.stderr)
        print(f"{word} {args.path} drained={held.drained} drain_ms={held.drain_ns / 1e6:.3f}",
              flush=True)
        done = threading.Event()
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda *_: done.set())
        status = 0
        if args.cmd:
            cmd = args.cmd[1:] if args.cmd[0] == "--" else args.cmd
            status = subprocess.call(cmd)
        else:
            threading.Thread(target=lambda: (sys.stdin.read(), done.set()), daemon=True).start()
            if args.max_hold:
                done.wait(args.max_hold)
            else:
                done.wait()
        try:
            released = getattr(client, "thaw" if kind == "freeze" else "unseal")(args.path)
            print(f"{'THAWED' if kind == 'freeze' else 'UNSEALED'} {args.path} "
                  f"released={released.released}", flush=True)
        except ControlError as exc:
            print(f"cleanlease {args.command}: {exc} (lifted already: --max-hold, or a thaw "
                  "from elsewhere)", file=sys.stderr)
        except ConnectionError as exc:
            print(f"cleanlease {args.command}: {exc}", file=sys.stderr)
            return 1
        return status


def _simple(args, call, show) -> int:
    with _client(args) as client:
        try:
            body = call(client)
        except ControlError as exc:
            return _fail(args, exc)
        if client.last_message:
            print(f"cleanlease {args.command}: note: {client.last_message}", file=sys.stderr)
        show(body)
        return 0


def _changes_show(body) -> None:
    total = sum(n for _, n in body.ranges)
    print(f"{body.status.name.lower()} size={body.size} ranges={len(body.ranges)} bytes={total}")
    for offset, length in body.ranges:
        print(f"{offset} {length}")


def _backup(args) -> int:
    with _client(args) as client:
        try:
            r = backup_module.backup(client, args.src, args.dest, args.since,
                                     max_hold_s=args.max_hold or 0.0)
        except ControlError as exc:
            return _fail(args, exc)
        except ValueError as exc:
            raise SystemExit(f"cleanlease backup: --since: {exc}")
        kind = "incremental" if r.incremental else f"full ({r.why_full})"
        print(f"{kind}: copied {r.bytes_copied} of {r.size} bytes in {len(r.ranges)} ranges; "
              f"frozen {r.frozen_ns / 1e6:.3f} ms")
        print(f"MARK {r.mark}")
        return 0


def add_commands(sub) -> None:
    """Add the control commands to the `cleanlease` parser's subcommands."""
    raw = argparse.RawDescriptionHelpFormatter
    for kind, what in (("freeze", "every modification of PATH (guest writes, truncates, "
                                  "fallocates, attribute changes; host-local writes, held in "
                                  "their fanotify pre-content event) waits; reads go on. It "
                                  "does not flush (see `cleanlease flush`)."),
                       ("seal", "modifications that change PATH's size or extent map wait "
                                "(truncate, fallocate in every mode, writes past the end or "
                                "into holes); overwrites of allocated blocks go on. It never "
                                "fills holes or unshares.")):
        p = sub.add_parser(kind, help=f"hold one file: {kind}", formatter_class=raw,
                           description=f"{kind.capitalize()} PATH (a file of the daemon's "
                                       f"export): {what}", epilog=HOLD_EPILOG)
        p.add_argument("path", metavar="PATH")
        p.add_argument("--max-hold", type=float, metavar="S",
                       help="lift the hold after S seconds whatever happens (daemon-side)")
        p.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- COMMAND",
                       help="run COMMAND while held, then lift the hold")
        _common(p)
        p.set_defaults(func=lambda a, kind=kind: _hold(a, kind))
    for kind, undo in (("thaw", "freeze"), ("unseal", "seal")):
        p = sub.add_parser(kind, help=f"lift a {undo} of PATH",
                           description=f"Lift every {undo} of PATH, whichever client "
                                       "holds it (an administrator's override); the writers "
                                       "held go one by one, in arrival order.")
        p.add_argument("path", metavar="PATH")
        _common(p)
        p.set_defaults(func=lambda a, kind=kind: _simple(
            a, lambda c: getattr(c, kind)(a.path), lambda b: print(f"released={b.released}")))
    p = sub.add_parser("flush", help="write PATH's dirty pages back (fdatasync), nothing else",
                       description="fdatasync PATH in the daemon. A consistent backup is "
                                   "flush, then freeze (what `cleanlease backup` does).")
    p.add_argument("path", metavar="PATH")
    _common(p)
    p.set_defaults(func=lambda a: _simple(a, lambda c: c.flush(a.path), lambda b: print("flushed")))
    p = sub.add_parser("mark", help="a mark of PATH for `changes --since`",
                       description="Print a mark (BOOT:EPOCH) of PATH: `cleanlease changes "
                                   "PATH --since MARK` answers the byte ranges modified after "
                                   "it. Marks live in the daemon's memory: after a restart an "
                                   "old mark answers 'unknown' (everything).")
    p.add_argument("path", metavar="PATH")
    _common(p)
    p.set_defaults(func=lambda a: _simple(a, lambda c: c.mark(a.path),
                                          lambda b: print(format_mark(b.boot_id, b.epoch))))
    p = sub.add_parser("changes", help="byte ranges of PATH modified since a mark",
                       description="Print 'STATUS size=N ranges=K bytes=B', then one "
                                   "'OFFSET LENGTH' line per range (page aligned). STATUS is "
                                   "ranges, unknown (a mark of another boot: assume "
                                   "everything) or whole_file (the detector cannot tell "
                                   "ranges, or a writer it cannot see was there).")
    p.add_argument("path", metavar="PATH")
    p.add_argument("--since", required=True, metavar="MARK", help="what `cleanlease mark` printed")
    _common(p)

    def changes(a):
        try:
            return _simple(a, lambda c: c.changes(a.path, a.since), _changes_show)
        except ValueError as exc:
            raise SystemExit(f"cleanlease changes: --since: {exc}")
    p.set_defaults(func=changes)
    p = sub.add_parser("backup", help="consistent (incremental) copy of one file",
                       description=backup_module.__doc__, formatter_class=raw)
    p.add_argument("src", metavar="SRC", help="a file of the daemon's export")
    p.add_argument("dest", metavar="DEST", help="the copy (created 0600 if missing)")
    p.add_argument("--since", metavar="MARK",
                   help="copy only what changed since MARK (the last backup printed it); "
                        "DEST must be that backup")
    p.add_argument("--max-hold", type=float, metavar="S",
                   help="the freeze is lifted after S seconds even if the copy is not done")
    _common(p)
    p.set_defaults(func=_backup)
    p = sub.add_parser("status", help="holds of PATH and writers waiting",
                       description="Print freezes, seals, modifications waiting and in flight.")
    p.add_argument("path", metavar="PATH")
    _common(p)
    p.set_defaults(func=lambda a: _simple(a, lambda c: c.status(a.path), lambda b: print(
        f"freezes={b.freezes} seals={b.seals} waiting={b.waiting} in_flight={b.in_flight} "
        f"journaled={b.journaled} released={b.released}")))
