"""`cleanlease mount ADDR MNT`: mount an export, for people.

    cleanlease mount unix:/tmp/cl.sock /mnt/share
    cleanlease mount tcp:host:7070 /mnt/share --token-file cl.token
    cleanlease mount unix:/tmp/cl.sock /mnt/share -f     # stay in the foreground

Without -f it starts itself again with -f in a new session, waits until the
mount is up (or failed, and then says why), prints where and under which
policy, and returns: the mount is served in the background until `umount
MNT`, SIGTERM/SIGINT to its process (a clean unmount), or the host going
away.  `findmnt MNT` shows the host's address as the source and
`fuse.cleanlease` as the type; `df MNT` the export's own figures.
(`cleanlease guest --mount` is the simulation's actor: the same mount, with
the actor's lines for the tools that start it.)
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

READY_TIMEOUT_S = 30.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("address", metavar="ADDR", help="the host: unix:PATH or tcp:HOST:PORT")
    parser.add_argument("mountpoint", metavar="MNT", help="an existing directory to mount on")
    parser.add_argument("-f", "--foreground", action="store_true",
                        help="serve the mount in this process until it is unmounted or "
                             "SIGINT/SIGTERM (then unmount cleanly)")
    parser.add_argument("--token-file", metavar="FILE",
                        help="prove to the host that we know the token in FILE (a host on "
                             "tcp: always asks).  Default: $CLEANLEASE_TOKEN, if set")
    parser.add_argument("--token", metavar="TOKEN",
                        help="the token itself (visible in `ps`; prefer --token-file)")
    parser.add_argument("--name", default=None,
                        help="this guest's name in the host's logs (default: the host name)")
    parser.add_argument("--stats", metavar="FILE", help="keep the mount's counters here (JSON)")
    parser.add_argument("--log", metavar="FILE",
                        help="where the background mount writes its log (default: discarded)")


def run(args) -> int:
    from protocol.auth import TokenError, token_from

    if not os.path.isdir(args.mountpoint):
        raise SystemExit(f"cleanlease mount: {args.mountpoint!r} is not a directory; "
                         f"create it first (mkdir -p {args.mountpoint})")
    try:
        token = token_from(args.token, args.token_file, os.environ)
    except TokenError as exc:
        raise SystemExit(f"cleanlease mount: {exc}")
    if args.foreground:
        return _foreground(args, token)
    return _background(args)


def _foreground(args, token: bytes | None) -> int:
    import logging

    from guest.fuse_device import unavailable_reason
    from guest.mount import run_mount
    from workload.cli import run_loop

    why = unavailable_reason()
    if why:
        raise SystemExit(f"cleanlease mount: cannot mount: {why}")
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="cleanlease mount %(levelname)s %(message)s")
    name = args.name or os.uname().nodename
    try:
        return run_loop(run_mount(args.address, args.mountpoint, name=name,
                                  stats_path=args.stats, token=token, source=args.address))
    except (OSError, ValueError) as exc:
        detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise SystemExit(f"cleanlease mount: cannot mount {args.address} at {args.mountpoint}: "
                         f"{detail}.  Is a host serving there (cleanlease host --export DIR "
                         f"--listen {args.address})?") from None


def _background(args) -> int:
    argv = [sys.executable, "-m", "workload.cli", "mount", args.address, args.mountpoint, "-f"]
    for flag in ("token_file", "token", "name", "stats"):
        value = getattr(args, flag)
        if value is not None:
            argv += [f"--{flag.replace('_', '-')}", value]
    with tempfile.TemporaryFile("w+") as early:
        log = open(args.log, "a") if args.log else early
        child = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL,
                                 text=True, start_new_session=True,
                                 cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        line = child.stdout.readline()
        if not line.startswith("READY"):
            child.wait(READY_TIMEOUT_S)
            log.seek(0)
            said = log.read().strip().splitlines()[-5:] if not args.log else [f"see {args.log}"]
            print(f"cleanlease mount: {args.mountpoint} was not mounted:", *said, sep="\n  ",
                  file=sys.stderr)
            return 1
    fields = dict(word.split("=", 1) for word in line.split()[2:] if "=" in word)
    print(f"cleanlease: {args.address} mounted at {os.path.realpath(args.mountpoint)} "
          f"(policy {fields.get('policy', '?')}, guest {fields.get('guest', '?')}, "
          f"pid {child.pid}); `umount {args.mountpoint}` or `kill {child.pid}` unmounts it")
    return 0
