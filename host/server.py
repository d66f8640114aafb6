"""The host daemon: serves guests over the cleanlease protocol.

One asyncio protocol object per guest connection feeds bytes to a sans-I/O
`Connection` and dispatches each FS request through one table (`HANDLERS`),
in the manner of virtiofsd's server: a handler returns a reply or raises
OSError, which becomes an errno reply; any other exception is logged and
becomes EIO.  Nothing a guest sends can stop the daemon serving the others.

What to cache and when to invalidate is decided by `host/leases.py`; the
daemon performs what it decides in `host/coherence.py` (grants, recalls,
modifications, flushes and re-arms; a mixin of `HostDaemon`), and lets
connections in through `host/connections.py` (the handshake and the budgets'
verdicts; another mixin).  This module holds the daemon's state, its
listener, the bytes in and the request path (`_serve_request`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import errno
import json
import logging
import os
import resource
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from host import replies
from host.boot import BootMarker
from host.backend import ExportFS
from host.detectors import Detector as HostDetector
from host.detectors import NullDetector
from host.coherence import Coherence
from host.control.gate import ControlGate
from host.connections import Connections
from host.leases import LeaseTable
from host.limits import FRAMES_PER_TURN, SMALL_REPLY, FdBudget, PeerGate, ThrottledLog
from host.ops import HANDLERS
from host.recall import Recaller
from host.session import HostConfig, HostStats, Session, printable
from host.witness import Witnesses
from protocol.address import parse_address
from protocol.codec import UnsupportedOpcode
from protocol.connection import NEED_DATA
from protocol.errors import ProtocolError
from protocol.fuse import Opcode
from protocol.messages import Detector as DetectorKind
from protocol.messages import (
    LEASE_NOT_RENEWED,
    NO_LEASE,
    Ack,
    Auth,
    ConnectionClosed,
    FsReply,
    FsRequest,
    Granularity,
    Heartbeat,
    HeartbeatReply,
    Hello,
    LeaseGrant,
    Policy,
    Purged,
    Witness,
)

log = logging.getLogger("cleanlease.host")

T = TypeVar("T")
EKEYEXPIRED = errno.EKEYEXPIRED  # the reply to every request of a fenced guest


class _GuestProtocol(asyncio.Protocol):
    def __init__(self, daemon: "HostDaemon"):
        self.daemon = daemon
        self.session: Session | None = None

    def connection_made(self, transport):
        self.session = self.daemon.accept(transport)

    def data_received(self, data):
        self.daemon.feed(self.session, data)

    def eof_received(self):
        self.daemon.feed(self.session, b"")
        return False

    def connection_lost(self, exc):
        self.daemon.session_lost(self.session)

    # Output over the session's bound (host/limits.py, FlowControl).
    def pause_writing(self):
        if self.session.flow is not None:
            self.daemon.stats.output_paused += 1
            self.session.flow.pause_writing()

    def resume_writing(self):
        if self.session.flow is not None:
            self.session.flow.resume_writing()


class HostDaemon(Connections, Coherence, Witnesses, ControlGate):
    """The daemon's state: the export, the lease table, the sessions."""

    def __init__(self, config: HostConfig, detector: HostDetector | None = None, *,
                 clock: Callable[[], float] = time.monotonic,
                 run_blocking: Callable[[Callable[[], T]], Awaitable[T]] | None = None,
                 boot_id: bytes | None = None, boot_marker: BootMarker | None = None,
                 export_fs: Callable[..., ExportFS] = ExportFS):
        """`clock` is the daemon's monotonic clock (seconds), for terms and
        deadlines; its timers are the running loop's.  `run_blocking(fn)`, if
        given, replaces the worker threads of the `run_blocking` method: the
        deterministic simulator (workload/dst/) runs blocking backend calls
        inline with it.  `boot_id` (random by default) and
        `boot_marker` (the export's, in the runtime directory) are given by
        the simulator and by tests; `export_fs` builds the backend (the
        simulator's adds a seeded fault layer)."""
        self.config = config
        self.clock = clock
        self._run_inline = run_blocking
        self.detector = detector or NullDetector()
        self.granularity = effective_granularity(config, self.detector.kind)
        self.leases = LeaseTable(config.policy, needs_arming=self.detector.needs_arming,
                                 on_forgotten=self.detector.forget, granularity=self.granularity)
        self.fd_budget = budget_for(config)
        self.fs = export_fs(config.export, max_handles_per_owner=self.fd_budget.handles_per_guest,
                           on_forget=self.leases.forget_inode, max_handles=self.fd_budget.handles,
                           max_nodeids=self.fd_budget.nodeids,
                           max_nodeids_per_owner=self.fd_budget.nodeids_per_guest)
        self.peers = PeerGate(per_peer=config.handshakes_per_peer,
                              base_delay=config.wrong_token_delay_ms / 1000.0,
                              max_delay=config.wrong_token_max_delay_ms / 1000.0)
        self._idle_timer: asyncio.TimerHandle | None = None
        # What the budgets do is logged once per kind and interval (host/limits.py).
        self.throttled = ThrottledLog(log, clock=clock)
        self.boot_id = boot_id if boot_id is not None else os.urandom(16)
        self.sessions: dict[int, Session] = {}  # only those that finished the handshake
        # (a dict, used as an ordered set: iterated in a deterministic order)
        self._handshaking: dict[Session, None] = {}
        self.stats = HostStats()
        self._next_guest_id = 1
        self._recall_over: dict[int, asyncio.Future] = {}  # inode -> its recall has ended
        # inode -> one future per modification waiting for its recall or landing
        self._modifying: dict[int, set[asyncio.Future]] = {}
        # inode -> host-local modifications waiting for their recall (readers of
        # those are not held: before_unleased_reply)
        self._host_local_recalls: dict[int, int] = {}
        # Blocking system calls of guest requests (`run_blocking`).
        self._workers = concurrent.futures.ThreadPoolExecutor(
            max_workers=16, thread_name_prefix="cleanlease-io")
        self.recaller = Recaller(config, self.stats, self.leases, self.sessions, self._forget_guest,
                                 ask_witness=self.ask_witness, clock=clock)
        self.replies = replies.ReplyCache(per_client=config.max_in_flight)
        self._flush_timers: dict[int, asyncio.TimerHandle] = {}
        # Until then no modification lands: leases a predecessor on this export
        # granted may still be live (host/boot.py).
        self.boot_marker = boot_marker or BootMarker(config.export, config.lease_term_ms)
        self._grace_until = 0.0
        self._tasks: set[asyncio.Task] = set()
        self._server: asyncio.AbstractServer | None = None
        self.init_control()  # per-file holds and the change journal (host/control/)

    # --- listening -------------------------------------------------------------

    async def start(self, listen: str) -> str:
        """Listen on `unix:PATH` or `tcp:HOST:PORT`; returns the address actually bound.

        Raises ValueError for any other form of `listen`."""
        loop = asyncio.get_running_loop()
        where = parse_address(listen)
        if where.kind == "unix":
            if os.path.exists(where.path):
                os.unlink(where.path)
            old = os.umask(0o177)  # the socket is created 0600: only our user may connect
            try:
                self._server = await loop.create_unix_server(lambda: _GuestProtocol(self),
                                                             where.path)
            finally:
                os.umask(old)
            address = f"unix:{where.path}"
        else:
            self._server = await loop.create_server(lambda: _GuestProtocol(self), where.host,
                                                    where.port)
            bound = self._server.sockets[0].getsockname()
            address = f"tcp:{bound[0]}:{bound[1]}"
        await self.begin()
        return address

    async def begin(self) -> None:
        """Start serving (`start` calls it once it listens; the simulator, which
        connects its own transports through `accept`, calls it directly): wait
        out the predecessor's leases (host/boot.py), start the detector."""
        grace = self.boot_marker.start()
        if grace > 0:
            self._grace_until = self.clock() + grace
            log.info("a previous daemon on this export may have granted leases that live "
                     "%.2f s more: modifications wait until then", grace)
        await self.detector.start(self)
        log.info("%s", self.fd_budget.describe())
        self._schedule_idle_sweep()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        self.throttled.flush()
        for session in [*self.sessions.values(), *self._handshaking]:
            session.transport.close()
        for handle in self._flush_timers.values():
            handle.cancel()
        for task in list(self._tasks):
            task.cancel()
        await self.detector.stop()
        # A write still blocked in the kernel finishes on its own; do not wait for it.
        self._workers.shutdown(wait=False, cancel_futures=True)
        self.boot_marker.closed(leases_may_live=self.stats.sessions > 0)

    # --- bytes in --------------------------------------------------------------

    def feed(self, session: Session, data: bytes) -> None:
        """Process bytes from a guest; a protocol error closes only that guest."""
        session.last_seen = self.clock()
        session.conn.receive_data(data)
        if not session.draining:
            self._drain(session)

    def _drain(self, session: Session) -> None:
        """Handle the frames buffered for `session`, at most FRAMES_PER_TURN of
        them in one turn of the event loop: the rest wait for the next turn,
        with the session's reading paused meanwhile, so that a guest sending
        a flood of small frames (FORGETs) cannot keep the loop from the
        others (host/limits.py)."""
        session.draining = False
        if session.closed:
            return
        conn = session.conn
        turn = FRAMES_PER_TURN
        try:
            while True:
                if turn == 0:
                    session.draining = True
                    session.flow.hold_reading(True)
                    asyncio.get_running_loop().call_soon(self._drain, session)
                    return
                turn -= 1
                try:
                    event = conn.next_event()
                except UnsupportedOpcode as exc:
                    if exc.needs_reply:
                        self._reply(session, FsReply(exc.unique, -errno.ENOSYS),
                                    session.last_seen)
                    else:
                        self._unsupported_noreply(session, exc)
                    continue
                if event is NEED_DATA:
                    session.flow.hold_reading(False)
                    session.flow.frame_progress(conn.unfinished_frame)
                    return
                if isinstance(event, ConnectionClosed):
                    session.transport.close()
                    return
                self._dispatch_event(session, event)
        except ProtocolError as exc:
            self.stats.protocol_errors += 1
            log.warning("guest %s (%d): protocol error, closing: %s", session.name,
                        session.guest_id, printable(str(exc), 200))
            session.transport.abort()

    def _unsupported_noreply(self, session: Session, exc: UnsupportedOpcode) -> None:
        """An unknown opcode without NEED_REPLY: its sender awaits nothing, so
        nothing is sent (docs/protocol.md, section 9); counted, logged once
        per session."""
        self.stats.unsupported_noreply += 1
        if not session.unsupported_logged:
            session.unsupported_logged = True
            log.warning("guest %s (%d): unsupported FUSE opcode %d without NEED_REPLY, "
                        "ignored (no reply); further ones of this guest are only counted",
                        session.name, session.guest_id, exc.opcode)

    def _dispatch_event(self, session: Session, event) -> None:
        if isinstance(event, FsRequest):
            self.stats.requests += 1
            self._spawn(self._serve_request(session, event, session.last_seen))
        elif isinstance(event, Ack):
            self.stats.acks += 1
            future = session.acks.pop(event.seq, None)
            if future is not None and not future.done():
                future.set_result(None)
        elif isinstance(event, Heartbeat):
            self._heartbeat(session, event)
        elif isinstance(event, Hello):
            self._hello(session, event)
        elif isinstance(event, Auth):
            self._auth(session, event)
        elif isinstance(event, Witness):
            self._witness(session, event)
        elif isinstance(event, Purged):
            self._purged(session, event)

    def _heartbeat(self, session: Session, heartbeat: Heartbeat) -> None:
        """Renew the guest's term, or say why not: a fenced session learns that it
        was fenced from its next frame of any kind, heartbeats included."""
        if session.fenced:
            error = -EKEYEXPIRED
        elif not session.renews(session.last_seen):
            self.stats.renewals_withheld += 1
            error = -errno.EAGAIN
        else:
            error = 0
        session.send(HeartbeatReply(heartbeat.seq, error))

    def _spawn(self, coro) -> asyncio.Task:
        """Run `coro` as the daemon's task (cancelled by `close`)."""
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def session_lost(self, session: Session) -> None:
        """A guest's connection went away: its handles go at once, its leases only
        once its term has surely run out (`Recaller.connection_lost`)."""
        session.closed = True
        self._end_handshake(session)
        if session.flow is not None:
            session.flow.close()
        if self.sessions.get(session.guest_id) is not session:
            return
        del self.sessions[session.guest_id]
        if session.witness_of:
            self.witness_lost(session)
        self.fs.close_handles_of(session.guest_id)
        self.leases.drop_writer(session.guest_id)
        self.recaller.connection_lost(session)

    def _forget_guest(self, guest: int) -> None:
        """`guest` holds nothing any more: its leases and node ids go."""
        self.leases.drop_holder(guest)
        self.fs.drop_owner(guest)

    # --- one request --------------------------------------------------------------

    async def _serve_request(self, session: Session, request: FsRequest,
                             received_at: float) -> None:
        # The session's flow budgets (host/limits.py): the request's bytes count
        # until it is answered, and its reply's room is reserved before it is
        # carried out, so that a guest that does not read its replies stops
        # being read instead of growing the daemon's memory.
        flow, size, room = session.flow, request_size(request), reply_size(request, session)
        flow.request_read(size)
        try:
            room = await flow.reply_room(room)
            try:
                if session.closed:
                    return
                if (session.client_id != replies.NO_CLIENT_ID and not session.fenced
                        and replies.needs_reply_cache(request)):
                    reply = await self._at_most_once(session, request)
                else:
                    reply = await self._carry_out(session, request)
                if reply is not None:
                    self._reply(session, reply, received_at)
            finally:
                flow.reply_sent(room)
        finally:
            flow.request_done(size)

    def _reply(self, session: Session, reply: FsReply, received_at: float) -> None:
        """Send `reply` to a request received at `received_at`, marked
        LEASE_NOT_RENEWED unless it may renew the guest's term (`Session.renews`)."""
        if session.closed:
            return
        withheld = not session.renews(received_at)
        if withheld:
            self.stats.renewals_withheld += 1
            reply = dataclasses.replace(reply, lease=dataclasses.replace(
                reply.lease, flags=reply.lease.flags | LEASE_NOT_RENEWED))
        try:
            session.send(reply)
        except ProtocolError as exc:  # e.g. a reply larger than the frame maximum
            log.error("guest %d: cannot send reply: %s", session.guest_id, exc)
            session.send(FsReply(reply.unique, -errno.EIO, lease=LeaseGrant(
                flags=LEASE_NOT_RENEWED if withheld else 0)))

    async def _at_most_once(self, session: Session, request: FsRequest) -> FsReply:
        """Carry out a non-idempotent request once per (client id, unique): a
        retry after a reconnect gets the first attempt's reply, waiting for it
        if that attempt is still under way (host/replies.py)."""
        cache, client, unique = self.replies, session.client_id, request.unique
        while (earlier := cache.first_attempt(client, unique)) is not None:
            reply = await asyncio.shield(earlier)
            if reply is not None:
                return reply
            # That attempt was not carried out: this one is the first now.
        first = cache.record(client, unique)
        reply = None
        try:
            reply = await self._carry_out(session, request)
            return reply
        finally:
            if reply is None or (reply.error and session.closed):
                # Cancelled, or failed on a session that was lost meanwhile (its
                # handles closed under it: EBADF, ESTALE): not carried out, so
                # a retry must carry it out, not learn that error.
                cache.forget(client, unique)
                first.set_result(None)
            else:
                first.set_result(reply)

    async def _carry_out(self, session: Session, request: FsRequest) -> FsReply | None:
        """Run the request's handler; an errno (or a bug) becomes an error reply,
        except for a request that has none (FORGET): its errors are counted
        (`noreply_errors`) and logged at most once per session."""
        handler = HANDLERS.get(request.opcode)
        try:
            if session.fenced:
                raise OSError(EKEYEXPIRED, "lease expired: this guest was fenced; say HELLO again")
            if handler is None:
                raise OSError(errno.ENOSYS, f"opcode {request.opcode} not implemented")
            reply = await handler(self, session, request)
        except OSError as exc:
            self.stats.errors += 1
            if exc.errno in (errno.EMFILE, errno.ENFILE):
                self._fd_refused(session, exc)
            reply = FsReply(request.unique, -(exc.errno or errno.EIO),
                            lease=getattr(exc, "lease", NO_LEASE))
        except Exception:  # a bug must not take the daemon down
            self.stats.errors += 1
            self.throttled.exception(f"handler {request.opcode.name}", "guest %d: %s failed",
                                    session.guest_id, request.opcode.name)
            reply = FsReply(request.unique, -errno.EIO)
        if reply is not None and not request.needs_reply:
            self.stats.noreply_errors += 1
            if not session.noreply_error_logged:
                session.noreply_error_logged = True
                log.warning("guest %s (%d): %s failed (%s); it has no reply, and further such "
                            "failures of this guest are only counted", session.name,
                            session.guest_id, request.opcode.name, os.strerror(-reply.error))
            return None
        return reply

    # --- reporting -------------------------------------------------------------------

    def stats_dict(self) -> dict:
        d = self.stats.as_dict()
        d["retries_answered"] = self.replies.answered
        d["policy"] = self.config.policy.label
        d["detector"] = self.detector.label
        d["granularity"] = self.granularity.label
        d["detector_events"] = self.detector.events
        d["detector_stats"] = self.detector.stats()
        return d

    def write_stats(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.stats_dict(), f, indent=2)


def effective_granularity(config: HostConfig, detector: DetectorKind) -> Granularity:
    """The granularity the daemon runs with: `config.granularity`, but whole
    inodes unless the policy is clean-lease and every host-local write is
    seen before it lands with its range (fanotify) or none is watched for:
    inotify's IN_MODIFY carries no range and comes after the fact."""
    if config.policy is not Policy.CLEAN_LEASE:
        return Granularity.INODE
    if detector not in (DetectorKind.NONE, DetectorKind.FANOTIFY):
        return Granularity.INODE
    return config.granularity


def budget_for(config: HostConfig) -> FdBudget:
    """The descriptor budget of a daemon with `config` (host/limits.py)."""
    limit = config.fd_limit
    if limit is None:
        limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if limit == resource.RLIM_INFINITY:
            limit = 1 << 20
    return FdBudget.derive(limit, max_sessions=config.max_sessions,
                           max_handshakes=config.max_handshakes,
                           handles_per_guest=config.max_handles_per_guest,
                           nodeids_per_guest=config.max_nodeids_per_guest)


def request_size(request: FsRequest) -> int:
    """What a request holds in memory while in flight, about (its data, if any)."""
    data = getattr(request.op, "data", None)
    return 64 + (len(data) if data is not None else 0)


def reply_size(request: FsRequest, session: Session) -> int:
    """The most a reply to `request` may carry, about: READ and READDIR carry
    up to the size asked (within the frame), the others little."""
    size = getattr(request.op, "size", None)
    if request.opcode in (Opcode.READ, Opcode.READDIR) and isinstance(size, int):
        return min(size, session.conn.max_frame) + 64
    return SMALL_REPLY
