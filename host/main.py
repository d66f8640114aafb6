"""`cleanlease host`: run the daemon until SIGTERM or SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys

from host import kernel_lease
from host.detectors import make_detector
from host.server import HostConfig, HostDaemon
from protocol import auth, wire
from protocol.address import parse_address
from protocol.messages import Policy


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--export", required=True, metavar="DIR",
                        help="the directory to share with guests (a real directory; "
                             "nothing outside it is ever reachable)")
    parser.add_argument("--listen", required=True, metavar="ADDR",
                        help="unix:PATH (created 0600) or tcp:HOST:PORT (needs a token; "
                             "tcp::PORT listens on loopback only)")
    parser.add_argument("--token-file", metavar="FILE",
                        help="require every guest to prove it knows the token in FILE "
                             "(mode 600; make one with `cleanlease token FILE`).  The token "
                             "never travels: a challenge-response in HELLO (docs/protocol.md).  "
                             f"Required with tcp:.  Default: ${auth.TOKEN_ENV}, if set")
    parser.add_argument("--token", metavar="TOKEN",
                        help="the token itself; other local users can read it in `ps`, so "
                             "prefer --token-file")
    parser.add_argument("--handshake-timeout", type=int, default=5000, metavar="MS",
                        help="close a connection that has not finished HELLO (and the token "
                             "exchange) by then (default: %(default)s)")
    parser.add_argument("--policy", default="clean-lease", type=Policy.from_label,
                        help="never | ttl | always | open-lease | clean-lease (default: %(default)s)")
    parser.add_argument("--lease-term", type=int, default=2000, metavar="MS",
                        help="how long a guest may serve from cache without hearing from "
                             "the host (default: %(default)s)")
    parser.add_argument("--ack-timeout", type=int, default=500, metavar="MS",
                        help="how long a write waits for an ACK before the silent guest is "
                             "fenced once its term has run out (default: %(default)s)")
    parser.add_argument("--clean-after", type=int, default=20, metavar="MS",
                        help="flush a dirty inode after this much idle time, then re-grant "
                             "leases if clean (default: %(default)s)")
    parser.add_argument("--ttl", type=int, default=1000, metavar="MS",
                        help="attribute/entry timeout of the ttl policy (default: %(default)s)")
    parser.add_argument("--max-frame", type=int, default=wire.DEFAULT_MAX_FRAME, metavar="BYTES",
                        help="largest frame payload accepted (default: %(default)s)")
    parser.add_argument("--detector", default="auto",
                        choices=("auto", "none", "inotify", "fanotify", "kernel-lease"),
                        help="how host-local writes are seen: fanotify pre-content events "
                             "(before they land; under open-lease this means kernel read "
                             "leases, broken by any open for write), kernel-lease, inotify "
                             "(after), none; auto picks the best this machine supports for the "
                             "policy and says why on stderr (default: %(default)s)")
    parser.add_argument("--stats", metavar="PATH", help="write counters as JSON here on exit")


def config_from(args: argparse.Namespace, environ=os.environ) -> HostConfig:
    try:
        where = parse_address(args.listen)
    except ValueError as exc:
        raise SystemExit(f"cleanlease host: --listen: {exc}")
    try:
        token = auth.token_from(args.token, args.token_file, environ)
    except auth.TokenError as exc:
        raise SystemExit(f"cleanlease host: {exc}")
    if where.kind == "tcp" and token is None:
        raise SystemExit(f"cleanlease host: --listen {args.listen} needs a token, or anyone who "
                         f"can reach the port could read and write the export: make one with "
                         f"`cleanlease token FILE` and pass --token-file FILE (the guests need "
                         f"the same)")
    export = os.path.realpath(args.export)
    if not os.path.isdir(export):
        raise SystemExit(f"cleanlease host: --export {args.export!r} is not a directory")
    if not wire.MIN_MAX_FRAME <= args.max_frame <= wire.ABSOLUTE_MAX_FRAME:
        raise SystemExit(f"cleanlease host: --max-frame must be between {wire.MIN_MAX_FRAME} "
                         f"and {wire.ABSOLUTE_MAX_FRAME}")
    for name in ("lease_term", "ack_timeout", "clean_after", "ttl", "handshake_timeout"):
        if getattr(args, name) < 0:
            raise SystemExit(f"cleanlease host: --{name.replace('_', '-')} must not be negative")
    return HostConfig(export=export, policy=args.policy, lease_term_ms=args.lease_term,
                      ack_timeout_ms=args.ack_timeout, clean_after_ms=args.clean_after,
                      ttl_ms=args.ttl, max_frame=args.max_frame, token=token,
                      handshake_timeout_ms=args.handshake_timeout)


async def serve(args: argparse.Namespace) -> int:
    """Serve until SIGTERM/SIGINT.  Prints `READY <address>` once accepting guests."""
    config = config_from(args)
    os.umask(0)  # modes asked for by guests are applied as given, as virtiofsd does
    try:
        detector, why = make_detector(args.detector, config.export, config.policy)
    except ValueError as exc:
        raise SystemExit(f"cleanlease host: {exc}")
    print(f"cleanlease host: {why}", file=sys.stderr, flush=True)
    # The export's root fd is opened here, before the detector's bind mount
    # (fanotify): the daemon's own I/O never goes through the marked mount.
    daemon = HostDaemon(config, detector)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        address = await daemon.start(args.listen)
        print(f"READY {address} policy={config.policy.label} detector={daemon.detector.label} "
              f"auth={'token' if config.token else 'none'}", flush=True)
        await stop.wait()
    finally:
        # Answers every pending permission event, releases kernel leases and
        # unmounts the bind, also when start() or the loop fails.
        await daemon.close()
    if args.stats:
        daemon.write_stats(args.stats)
    if args.listen.startswith("unix:"):
        try:
            os.unlink(args.listen[5:])
        except FileNotFoundError:
            pass
    return 0


def main(args: argparse.Namespace) -> int:
    # Kernel lease breaks arrive as a real-time signal that must be blocked in
    # every thread, and threads inherit the mask: block it before any thread
    # exists (asyncio.to_thread and the event loop's executor start threads).
    kernel_lease.block_lease_signals()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="host %(levelname)s %(message)s")
    return args.run_loop(serve(args))
