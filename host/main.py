"""`cleanlease host`: run the daemon until SIGTERM or SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys

from host import kernel_lease, limits
from host.control.server import ControlServer, control_path_for
from host.detectors import make_detector
from host.server import HostConfig, HostDaemon, budget_for
from protocol import auth, wire
from protocol.address import parse_address
from protocol.messages import Granularity, Policy


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
    parser.add_argument("--granularity", default="range", type=Granularity.from_label,
                        help="what a recall of a regular file covers under clean-lease: inode "
                             "(every page and the attributes) or range (only the pages a write "
                             "changes, and the attributes; guests keep the rest).  Range needs "
                             "the fanotify detector, or none: under inotify, whose events carry "
                             "no range, the daemon falls back to inode and says so in READY and "
                             "in its stats (default: %(default)s)")
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
    limits = parser.add_argument_group(
        "limits", "what one guest or peer may take of the daemon (docs/reliability.md, "
                  "\"Limits\"); the descriptor caps are derived from RLIMIT_NOFILE, whose soft "
                  "limit is raised to the hard one at start")
    limits.add_argument("--max-sessions", type=int, default=64, metavar="N",
                        help="authenticated sessions at once; HELLO beyond gets EUSERS "
                             "(default: %(default)s)")
    limits.add_argument("--max-handshakes", type=int, default=64, metavar="N",
                        help="connections in HELLO/AUTH at once; when all are taken the oldest "
                             "handshake of the address holding the most makes room "
                             "(default: %(default)s)")
    limits.add_argument("--handshakes-per-peer", type=int, default=8, metavar="N",
                        help="handshakes at once from one TCP peer address; more are closed at "
                             "once (default: %(default)s)")
    limits.add_argument("--output-bound", type=int, default=1 << 20, metavar="BYTES",
                        help="a session's unsent replies; over it its requests are not read "
                             "until it reads (default: %(default)s)")
    limits.add_argument("--input-bound", type=int, default=16 << 20, metavar="BYTES",
                        help="bytes of a session's requests in flight; over it reading pauses "
                             "(default: %(default)s)")
    limits.add_argument("--output-timeout", type=int, default=5000, metavar="MS",
                        help="disconnect a session whose output stays over --output-bound this "
                             "long (default: %(default)s)")
    limits.add_argument("--frame-timeout", type=int, default=10000, metavar="MS",
                        help="disconnect a connection whose started frame is not complete this "
                             "long after it began (default: %(default)s)")
    limits.add_argument("--idle-timeout", type=int, default=60000, metavar="MS",
                        help="close a session that sent nothing this long and holds no handle "
                             "and no live lease (default: %(default)s)")
    limits.add_argument("--wrong-token-delay", type=int, default=100, metavar="MS",
                        help="wait before refusing a wrong token, doubled for each recent "
                             "failure of that address, at most 20x this (default: %(default)s)")
    limits.add_argument("--max-handles-per-guest", type=int, default=1024, metavar="N",
                        help="open file handles per guest, then EMFILE; never more than a "
                             "quarter of the handle budget (default: %(default)s)")
    limits.add_argument("--max-nodeids-per-guest", type=int, metavar="N",
                        help="node ids per guest, then EMFILE (default: a quarter of the node "
                             "id budget, which is a quarter of the descriptors left after the "
                             "daemon's reserve and the sockets; at most the whole budget: a "
                             "mount's kernel keeps a node id for every name it has looked up, "
                             "so one mount of a large tree alone on a host needs more)")
    limits.add_argument("--fd-limit", type=int, metavar="N",
                        help="set RLIMIT_NOFILE's soft limit to N instead of raising it to the "
                             "hard limit, and budget for N (to try the budget on a small "
                             "limit, as Debian's default 1024)")
    parser.add_argument("--control", metavar="PATH",
                        help="the control socket for `cleanlease freeze/thaw/seal/mark/changes/"
                             "backup` (created 0600; default: the guest socket's path + "
                             "'.control' under unix:, none under tcp:; 'none': no control "
                             "socket)")
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
    for name in ("lease_term", "ack_timeout", "clean_after", "ttl", "handshake_timeout",
                 "output_timeout", "frame_timeout", "idle_timeout", "wrong_token_delay"):
        if getattr(args, name) < 0:
            raise SystemExit(f"cleanlease host: --{name.replace('_', '-')} must not be negative")
    for name in ("max_sessions", "max_handshakes", "handshakes_per_peer", "output_bound",
                 "input_bound", "max_handles_per_guest", "max_nodeids_per_guest"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise SystemExit(f"cleanlease host: --{name.replace('_', '-')} must be at least 1")
    return HostConfig(export=export, policy=args.policy, lease_term_ms=args.lease_term,
                      ack_timeout_ms=args.ack_timeout, clean_after_ms=args.clean_after,
                      ttl_ms=args.ttl, max_frame=args.max_frame, token=token,
                      granularity=args.granularity,
                      handshake_timeout_ms=args.handshake_timeout,
                      max_sessions=args.max_sessions, max_handshakes=args.max_handshakes,
                      handshakes_per_peer=args.handshakes_per_peer,
                      output_bound=args.output_bound, input_bound=args.input_bound,
                      output_timeout_ms=args.output_timeout, frame_timeout_ms=args.frame_timeout,
                      idle_timeout_ms=args.idle_timeout,
                      wrong_token_delay_ms=args.wrong_token_delay,
                      wrong_token_max_delay_ms=20 * args.wrong_token_delay,
                      max_handles_per_guest=args.max_handles_per_guest,
                      max_nodeids_per_guest=args.max_nodeids_per_guest)


async def serve(args: argparse.Namespace) -> int:
    """Serve until SIGTERM/SIGINT.  Prints `READY <address>` once accepting guests."""
    config = config_from(args)
    if args.fd_limit is not None:
        config.fd_limit = limits.set_nofile_limit(args.fd_limit)
    else:
        limits.raise_nofile_limit()
    try:
        budget_for(config)
    except ValueError as exc:
        raise SystemExit(f"cleanlease host: {exc}")
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
    control = None
    try:
        address = await daemon.start(args.listen)
        control_at = args.control or control_path_for(args.listen)
        if control_at and control_at != "none":
            control = ControlServer(daemon)
            await control.start(control_at)
            print(f"cleanlease host: control socket {control_at}", file=sys.stderr, flush=True)
        print(f"READY {address} policy={config.policy.label} detector={daemon.detector.label} granularity={daemon.granularity.label} "
              f"auth={'token' if config.token else 'none'}", flush=True)
        await stop.wait()
    finally:
        if control is not None:
            await control.close()
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
