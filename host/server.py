"""The host daemon: serves guests over the cleanlease protocol.

One asyncio protocol object per guest connection feeds bytes to a sans-I/O
`Connection` and dispatches each FS request through one table (`HANDLERS`),
in the manner of virtiofsd's server: a handler returns a reply or raises
OSError, which becomes an errno reply; any other exception is logged and
becomes EIO.  Nothing a guest sends can stop the daemon serving the others.

What to cache and when to invalidate is decided by `host/leases.py`; this
module performs what it decides: sends INVALIDATE/INVAL_ENTRY, waits for ACKs
(or fences a silent guest once its lease term has surely run out), applies
the modification only then, and flushes and re-arms dirty inodes.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import errno
import functools
import json
import logging
import os
import resource
import socket
import stat as stat_module
import struct
import time
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import TypeVar

from host import cachestat, replies, statx
from host.boot import BootMarker
from host.backend import ExportFS
from host.detectors import Detector as HostDetector
from host.detectors import NullDetector
from host.leases import HOST_LOCAL, WAIT, InodeState, LeaseTable, Recall
from host.limits import FRAMES_PER_TURN, FdBudget, FlowControl, PeerGate, ThrottledLog
from host.ops import HANDLERS
from host.recall import Recaller
from host.session import HostConfig, HostStats, Session, printable
from protocol import auth, wire
from protocol.address import parse_address
from protocol.codec import UnsupportedOpcode
from protocol.connection import NEED_DATA
from protocol.errors import ProtocolError
from protocol.fuse import Opcode
from protocol.messages import (
    LEASE_FIRST_DIRTY,
    LEASE_GRANTED,
    LEASE_NOT_RENEWED,
    NO_LEASE,
    Ack,
    Attr,
    AttrOut,
    Auth,
    AuthReply,
    ConnectionClosed,
    EntryOut,
    FsReply,
    FsRequest,
    Heartbeat,
    HeartbeatReply,
    Hello,
    HelloReply,
    InvalEntry,
    Invalidate,
    LeaseGrant,
    Policy,
)

log = logging.getLogger("cleanlease.host")

T = TypeVar("T")
EKEYEXPIRED = errno.EKEYEXPIRED  # the reply to every request of a fenced guest


class FailedModification(OSError):
    """A modification failed after its recall had started (EFBIG, ENOSPC, EIO...).

    The recall happened and the inode's generation moved on, so the error
    reply must still carry it (`lease`): the writer then drops any grant of an
    older generation still on its way, as after a successful modification."""

    def __init__(self, exc: OSError, lease: LeaseGrant):
        super().__init__(exc.errno, exc.strerror)
        self.lease = lease


@dataclass
class Modification:
    """What `HostDaemon.modification` yields: the inode, and whether this is the
    first dirtying modification (it started a recall)."""

    nodeid: int
    first: bool


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


class HostDaemon:
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
        self.leases = LeaseTable(config.policy, needs_arming=self.detector.needs_arming,
                                 on_forgotten=self.detector.forget)
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
                                 clock=clock)
        self.replies = replies.ReplyCache(per_client=config.max_in_flight)
        self._flush_timers: dict[int, asyncio.TimerHandle] = {}
        # Until then no modification lands: leases a predecessor on this export
        # granted may still be live (host/boot.py).
        self.boot_marker = boot_marker or BootMarker(config.export, config.lease_term_ms)
        self._grace_until = 0.0
        self._tasks: set[asyncio.Task] = set()
        self._server: asyncio.AbstractServer | None = None

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

    # --- connections and the handshake -----------------------------------------

    def accept(self, transport: asyncio.Transport) -> Session:
        """A new connection.  It gets `handshake_timeout_ms` to finish HELLO (and
        AUTH).  Its peer address may have at most `handshakes_per_peer` under
        way (beyond, it is closed at once); when all `max_handshakes` slots
        are taken, the oldest handshake of the peer holding the most slots
        makes room for it, so peers that flood cannot lock a newcomer out."""
        cfg = self.config
        session = Session(cfg, self.stats, transport, clock=self.clock)
        session.flow = FlowControl(
            transport, output_bound=cfg.output_bound, input_bound=cfg.input_bound,
            output_timeout=cfg.output_timeout_ms / 1000.0,
            frame_timeout=cfg.frame_timeout_ms / 1000.0,
            on_stuck=functools.partial(self._output_stuck, session),
            on_slow_frame=functools.partial(self._slow_frame, session), small_reply=_SMALL_REPLY)
        if session.peer != "unix" and not self.peers.handshake_slot(session.peer):
            self.stats.handshakes_per_peer_refused += 1
            self.throttled.warning("handshakes per address",
                                   "connection %s: its address has %d handshakes under way "
                                   "already, refusing another", _peer(session), cfg.handshakes_per_peer)
            session.closed = True
            transport.abort()
            return session
        session.peer_slot = session.peer != "unix"
        if len(self._handshaking) >= cfg.max_handshakes and not self._evict_a_handshake(session):
            self.stats.handshakes_refused += 1
            self.throttled.warning("handshake slots full",
                                   "%d connections are still in their handshake: refusing another",
                                   len(self._handshaking))
            self._end_handshake(session)
            session.closed = True
            transport.abort()
            return session
        self._handshaking[session] = None
        session.handshake_timer = asyncio.get_running_loop().call_later(
            self.config.handshake_timeout_ms / 1000.0, self._handshake_expired, session)
        return session

    def _handshake_expired(self, session: Session) -> None:
        if session in self._handshaking:
            self.stats.handshakes_refused += 1
            self.throttled.warning("handshake timeout",
                                   "connection %s: no finished handshake in %d ms, closing",
                                   _peer(session), self.config.handshake_timeout_ms)
            session.transport.abort()

    def _evict_a_handshake(self, newcomer: Session) -> bool:
        """Close the oldest handshake of the peer address holding the most slots,
        if it holds more than the newcomer's; False if none qualifies."""
        counts: dict[str, int] = {}
        for other in self._handshaking:
            counts[other.peer] = counts.get(other.peer, 0) + 1
        busiest = max(counts, key=counts.get, default=None)
        if busiest is None or counts[busiest] <= counts.get(newcomer.peer, 0):
            return False
        oldest = min((other for other in self._handshaking if other.peer == busiest),
                     key=lambda other: other.accepted_at)
        self.stats.handshakes_evicted += 1
        self.throttled.warning("handshake evicted",
                               "handshake slots full: closing the oldest handshake of %s "
                               "(it holds %d) for a connection from %s", printable(busiest), counts[busiest],
                               printable(newcomer.peer))
        self._end_handshake(oldest)
        oldest.transport.abort()
        return True

    def _end_handshake(self, session: Session) -> None:
        self._handshaking.pop(session, None)
        if session.handshake_timer is not None:
            session.handshake_timer.cancel()
        if session.peer_slot:
            session.peer_slot = False
            self.peers.handshake_over(session.peer)

    def _register(self, session: Session) -> None:
        """The handshake is over: `session` is served from now on."""
        self._end_handshake(session)
        self.sessions[session.guest_id] = session
        self.stats.sessions += 1
        log.info("guest %s connected as %d", session.name, session.guest_id)

    def _hello(self, session: Session, hello: Hello) -> None:
        cfg = self.config
        error = 0
        if hello.version != wire.PROTOCOL_VERSION:
            error = -errno.EPROTO
        elif len(self.sessions) >= cfg.max_sessions:
            error = -errno.EUSERS
        max_frame = max(wire.MIN_MAX_FRAME, min(cfg.max_frame, hello.max_frame))
        features = hello.features & wire.NEGOTIABLE_FEATURES
        nonce = bytes(wire.NONCE_SIZE)
        guest_id = 0
        if error == 0:
            guest_id = self._next_guest_id
            self._next_guest_id += 1
            # Only ever logged: never raw (a peer could forge log lines).
            session.guest_id, session.name = guest_id, printable(hello.name)
            session.client_id = hello.client_id
            session.caches_unleased = bool(features & wire.FEATURE_CACHES_UNLEASED)
            if cfg.token is not None:
                # The host decides, whatever the guest offered.
                features |= wire.FEATURE_AUTH
                nonce = session.host_nonce = auth.new_nonce()
        session.send(HelloReply(error, wire.PROTOCOL_VERSION, features, cfg.policy,
                                self.detector.kind, cfg.lease_term_ms, cfg.ttl_ms, max_frame,
                                guest_id, self.boot_id, nonce))
        if error:
            session.transport.close()
        elif cfg.token is None:
            self._register(session)

    def _auth(self, session: Session, message: Auth) -> None:
        """Check the guest's proof; answer with ours, or refuse and close."""
        token = self.config.token
        expected = auth.guest_proof(token, session.host_nonce, message.nonce)
        if not auth.proof_matches(expected, message.proof):
            self.stats.auth_failures += 1
            delay = self.peers.wrong_token_delay(session.peer)
            self.stats.wrong_token_delays_ms += int(delay * 1000)
            self.throttled.warning("wrong token",
                                   "connection %s (%s): wrong token, refusing it in %d ms",
                                   _peer(session), session.name, delay * 1000)
            asyncio.get_running_loop().call_later(delay, self._refuse_token, session)
            return
        if len(self.sessions) >= self.config.max_sessions:
            session.send(AuthReply(-errno.EUSERS))
            session.transport.close()
            return
        session.send(AuthReply(0, auth.host_proof(token, message.nonce, session.host_nonce)))
        self._register(session)

    def _refuse_token(self, session: Session) -> None:
        session.send(AuthReply(-errno.EACCES))
        session.transport.close()

    # --- the budgets' verdicts (host/limits.py) -----------------------------------

    def _output_stuck(self, session: Session) -> None:
        self.stats.output_stuck += 1
        self.throttled.warning("output stuck",
                               "guest %s (%d): %d bytes of replies unread for %d ms, disconnecting",
                               session.name, session.guest_id,
                               session.transport.get_write_buffer_size(),
                               self.config.output_timeout_ms)
        _reset(session.transport)

    def _slow_frame(self, session: Session) -> None:
        self.stats.slow_frames += 1
        self.throttled.warning("slow frame",
                               "connection %s, guest %s (%d): a frame not complete %d ms "
                               "after it began, disconnecting", _peer(session), session.name, session.guest_id,
                               self.config.frame_timeout_ms)
        session.transport.abort()

    def _schedule_idle_sweep(self) -> None:
        period = max(0.05, self.config.idle_timeout_ms / 4000.0)
        self._idle_timer = asyncio.get_running_loop().call_later(period, self._idle_sweep)

    def _idle_sweep(self) -> None:
        """Close authenticated sessions that sent nothing for `idle_timeout_ms`,
        hold no open handle and no live lease term (a session holding leases
        must heartbeat within its term anyway; under a policy without leases,
        one that holds no node id either): they would hold a session slot for
        ever (EUSERS for newcomers)."""
        self._schedule_idle_sweep()
        now = self.clock()
        idle = self.config.idle_timeout_ms / 1000.0
        for session in list(self.sessions.values()):
            if session.closed or now - session.last_seen < idle:
                continue
            if self.fs.handles_of(session.guest_id) or session.conn.outstanding_requests:
                continue
            if self.leases.leasing:
                if session.lease_expiry() > now:
                    continue
            elif self.fs.inodes.held_by(session.guest_id):
                continue
            self.stats.idle_closed += 1
            self.throttled.info("idle session",
                                "guest %s (%d): nothing sent for %d ms, no handle, no live lease: "
                                "closing its session", session.name, session.guest_id,
                                self.config.idle_timeout_ms)
            session.transport.close()

    def _fd_refused(self, session: Session, exc: OSError) -> None:
        """A lookup or open was refused by the descriptor budget: counted, and
        logged at most once every 10 s."""
        self.stats.fd_refusals += 1
        self.throttled.warning("descriptor budget", "guest %s (%d): %s (%s; %d refusals so far)",
                               session.name, session.guest_id, os.strerror(exc.errno),
                               exc.strerror, self.stats.fd_refusals)

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
            log.exception("guest %d: %s failed", session.guest_id, request.opcode.name)
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

    def lease_for(self, session: Session, nodeid: int, *, is_dir: bool = False) -> LeaseGrant:
        """Grant `session` a lease on `nodeid` if the policy allows; the reply must
        be sent in the same step (no await in between)."""
        grant = self.leases.grant(nodeid, session.guest_id, is_dir=is_dir)
        if grant is None:
            if session.caches_unleased and not is_dir:
                self.leases.unleased(nodeid, session.guest_id)
            if self.leases.wants_arming(nodeid):
                self._arm(nodeid)
            return NO_LEASE
        self.detector.watch(nodeid, is_dir)
        return LeaseGrant(nodeid, grant.generation, self.config.lease_term_ms, LEASE_GRANTED)

    async def before_unleased_reply(self, session: Session, nodeid: int) -> None:
        """Call before reading what a reply about regular inode `nodeid` carries
        (data, attributes), and build that reply in the step this returns in.
        Only for requests a guest's kernel sends holding no lock but the pages'
        of `nodeid` (READ, GETATTR, a read-only OPEN; not LOOKUP, sent with the
        directory locked).

        A guest whose cache keeps unleased replies (a mount) is held back while
        a recall of `nodeid` runs, and then until every modification that was
        waiting for it or was in flight has landed: its reply then carries the
        new bytes, and no writer has to recall it for them.  But only while it
        owes no ACK at all: a purge its kernel carries out for an ACK may wait
        for the page lock it holds for this very READ (or for a notifier
        thread busy with such a purge).  So a guest that owes one is answered
        at once, and one held back is answered as soon as it starts to owe one
        (`Session.when_owing`); it is then tainted, and recalled again once the
        modification has landed if the recall was still running.  Other guests
        return at once.
        """
        if not (session.caches_unleased and self.leases.leasing):
            return
        if nodeid in self._host_local_recalls:
            # The kernel lands a host-local write only after its event is
            # answered: a reader held until then would read the old bytes at
            # the worst moment.  Answered now, it is recalled again right
            # after the event is answered (`host_local_modify`).
            return
        counted = landing_waited = False
        while not session.acks and not session.closed:
            if (over := self._recall_over.get(nodeid)) is not None:
                waits = [over]
                landing_waited = False  # that recall's writers land next
            elif not landing_waited and (landing := self._modifying.get(nodeid)):
                waits = list(landing)
                landing_waited = True  # once per recall: later writers hold nobody back
            else:
                return
            if not counted:
                counted = True
                self.stats.unleased_reads_held += 1
            for event in waits:
                if session.acks:
                    break  # it owes an ACK now: answer at once
                await asyncio.wait({event, session.when_owing()},
                                   return_when=asyncio.FIRST_COMPLETED)

    async def run_blocking(self, call, *args):
        """Run `call(*args)` (a system call that may block: a write waiting for
        an inode lock a host process holds) on a worker thread, and return its
        result; the event loop serves everyone else meanwhile.  Cancelling the
        caller does not abandon the call: this returns (raising CancelledError)
        only once the call is over, so a modification's end is never counted
        while its write may still land."""
        if self._run_inline is not None:
            return await self._run_inline(functools.partial(call, *args))
        future = asyncio.get_running_loop().run_in_executor(self._workers, call, *args)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            while not future.done():
                try:
                    await asyncio.shield(future)
                except asyncio.CancelledError:
                    continue
                except BaseException:
                    break
            raise

    def restart_grace_left(self) -> float:
        """Seconds until no lease a predecessor on this export granted can be
        live (host/boot.py); 0 once that is so."""
        return max(0.0, self._grace_until - self.clock())

    async def _after_restart_grace(self) -> None:
        """Wait until no lease a predecessor on this export granted can be live."""
        remaining = self.restart_grace_left()
        if remaining > 0:
            await asyncio.sleep(remaining)

    def _arm(self, nodeid: int) -> None:
        """A clean inode its detector does not watch yet was read: arm it, then, if
        it may have been written unseen, check it is clean (invariant 4).  This
        reply grants nothing, since its data was read before the arming; the
        next read is granted."""
        unseen = self.detector.may_have_missed_writes(nodeid)
        if not self.detector.arm(nodeid):
            return
        if (self.leases.policy is Policy.CLEAN_LEASE and unseen
                and not self._page_cache_clean(nodeid)):
            self.detector.disarm(nodeid)
            self.modified(nodeid)  # dirty when first seen: flush, then re-arm as after a write
            return
        self.leases.set_armed(nodeid, True)

    def _page_cache_clean(self, nodeid: int) -> bool:
        try:
            if not stat_module.S_ISREG(os.stat(self.fs.inodes.host_fd(nodeid)).st_mode):
                return True  # no pages: a symlink's target changes only by a namespace change
            return cachestat.is_clean(self.fs.writable_fd(nodeid))
        except OSError:
            return False

    def revoked(self, nodeid: int, first_dirty: bool = False) -> LeaseGrant:
        """The trailer of a reply to a modification: no lease, and the inode's
        current generation, so the writer drops its own copy and any grant it
        receives later for an older generation."""
        leases = self.leases.peek(nodeid)
        return LeaseGrant(nodeid, leases.generation if leases else 0, 0,
                          LEASE_FIRST_DIRTY if first_dirty else 0)

    def entry_out(self, nodeid: int, st: os.stat_result, *, cacheable: bool = True) -> EntryOut:
        """The entry of a LOOKUP (or CREATE, MKDIR) reply.  With `cacheable`
        false its entry validity is 0: a guest (the kernel of a mount, or the
        library client) must not cache the name.  Its `generation` is the
        inode's birth time (host/statx.py): with the inode number it names
        the file, since ext4 gives a freed inode number to the next file."""
        valid = self._validity_s()
        try:
            generation = statx.birth_time_ns(self.fs.inodes.host_fd(nodeid))
        except OSError:
            generation = 0
        return EntryOut(nodeid, generation, valid if cacheable else 0, valid, 0, 0,
                        Attr.from_stat(st))

    def attr_out(self, st: os.stat_result) -> AttrOut:
        return AttrOut(self._validity_s(), 0, Attr.from_stat(st))

    def _validity_s(self) -> int:
        """How long a kernel guest may trust entries and attributes (FUSE timeouts)."""
        policy = self.config.policy
        if policy is Policy.NEVER:
            return 0
        if policy is Policy.TTL:
            return max(1, self.config.ttl_ms // 1000)
        return 86400  # always, and the lease policies: until invalidated

    # --- modifications: the first dirtying write path ----------------------------

    @asynccontextmanager
    async def modification(self, nodeid: int, writer: int, *, is_dir: bool = False):
        """`async with d.modification(nodeid, writer) as m:` carry out one modification.

        On entry, waits until no other guest can serve its copy of `nodeid`
        (`_modify`); `m.first` says whether this modification started the
        recall.  From then until the body exits the modification is *in
        flight*: no lease on `nodeid` is granted and it is not re-armed, so the
        body may await (its system call on a worker: `run_blocking`).  Every exit of
        the body, success, an errno or a cancellation, counts the modification
        as landed and schedules the flush that leads back to CLEAN
        (`modified`), since after the recall the daemon cannot know the file
        is unchanged.  An OSError from the body is raised again as a
        FailedModification carrying the trailer (`revoked`) that publishes the
        inode's new generation to the writer.
        """
        await self._after_restart_grace()  # before it can hold readers back (_landing)
        with self._landing(nodeid):
            first, late = await self._modify(nodeid, writer, is_dir=is_dir)
            self.leases.modification_begins(nodeid)
            try:
                yield Modification(nodeid, first)
            except OSError as exc:
                raise FailedModification(exc, self.revoked(nodeid, first)) from exc
            else:
                # Guests that cache unleased replies and were sent `nodeid`
                # while its recall ran, or while this modification was in
                # flight, without being held back (`before_unleased_reply`), may
                # hold the bytes it just replaced: purge them before the writer
                # learns it is done, and wait for any other such purge still
                # running (a concurrent modification's), which may cover a
                # reply sent before this one landed.
                late |= self.leases.read_while_recalling(nodeid) - {writer}
                if late:
                    await self._recall_late(nodeid, late)
                await self.recaller.running_over(nodeid)
            finally:
                self.modified(nodeid, begun=True)

    @contextmanager
    def _landing(self, nodeid: int):
        """While inside, a modification of `nodeid` waits for its recall or is
        landing: readers held back by `before_unleased_reply` wait for it."""
        done = asyncio.get_running_loop().create_future()
        self._modifying.setdefault(nodeid, set()).add(done)
        try:
            yield
        finally:
            landing = self._modifying[nodeid]
            landing.discard(done)
            if not landing:
                del self._modifying[nodeid]
            done.set_result(None)

    async def _recall_late(self, nodeid: int, guests: frozenset[int]) -> None:
        self.stats.late_recalls += len(guests)
        leases = self.leases.peek(nodeid)
        generation = leases.generation if leases else 0
        await self.recaller.carry_out(Recall(nodeid, generation, guests), lambda seq: Invalidate(
            seq, nodeid, 0, 0, generation), data=True)

    async def _modify(self, nodeid: int, writer: int, *,
                      is_dir: bool = False) -> tuple[bool, frozenset[int]]:
        """Return once `writer` may modify `nodeid`: every other guest's copy is gone.

        Returns (first, late): first is True if this modification is the first
        dirtying one (it started a recall); late are the guests that cache
        unleased replies and were sent `nodeid` while the recall ran without
        being held back (`before_unleased_reply`: they owed an ACK).  Must be
        followed, with no await in between, by the modification and
        `modified(nodeid)`, or by `modification_begins(nodeid)`; and then by a
        recall of `late`.
        """
        late = await self._recall_for(nodeid, lambda: self.leases.begin_modification(
            nodeid, writer, is_dir=is_dir))
        if late is not None:
            self.detector.disarm(nodeid)
            return True, late - {writer}
        if self.leases.policy is Policy.OPEN_LEASE:
            self.detector.disarm(nodeid)  # see open_for_write
        return False, frozenset()

    def modified(self, nodeid: int, *, begun: bool = False) -> None:
        """A modification of `nodeid` has landed (`begun`: announced by
        `modification_begins`): schedule the flush that cleans it."""
        self.leases.modification_landed(nodeid, begun=begun)
        if self.leases.policy is Policy.CLEAN_LEASE:
            self._schedule_flush(nodeid)

    async def open_for_write(self, nodeid: int, writer: int) -> None:
        await self._recall_for(nodeid, lambda: self.leases.open_for_write(nodeid, writer))
        if self.leases.policy is Policy.OPEN_LEASE:
            # Drop the daemon's kernel read lease before it opens the file for
            # write itself: breaking its own lease would block it for
            # lease-break-time (docs/kernel.md).
            self.detector.disarm(nodeid)

    async def _recall_for(self, nodeid: int, decide) -> frozenset[int] | None:
        """Ask the lease table (`decide()`) until no recall of `nodeid` is in progress,
        and carry out the Recall it answers, if any.  None if there was none.
        Else every other copy of `nodeid` is gone (invariant 2) but those of the
        guests returned (`LeaseTable.read_while_recalling`), and the caller
        must land its modification, or announce it (`modification_begins`), in
        this same step (no await in between).

        The recall ends (`recall_finished`) in the caller's own step, right
        before the modification lands: ended any earlier, in the recall's task,
        a reply or a re-arm could slip in between and grant a lease on the old
        data that nobody would recall.  The invalidations and waits run as the
        daemon's own task: a caller cancelled while it waits does not cut them
        short; the recall then ends when they do, and, since the daemon cannot
        know what the caller did, counts as a modification (a flush follows)."""
        await self._after_restart_grace()
        while (decision := decide()) is WAIT:
            await asyncio.shield(self._recall_over[nodeid])
        if not isinstance(decision, Recall):
            return None
        over = self._recall_over[nodeid] = asyncio.get_running_loop().create_future()
        waits = self._spawn(self.recaller.carry_out(decision, lambda seq: Invalidate(
            seq, decision.ino, 0, 0, decision.generation), data=True))

        def end(cancelled: bool) -> None:
            self._recall_over.pop(nodeid, None)
            self.leases.recall_finished(nodeid)
            if cancelled:
                self.modified(nodeid)
            over.set_result(None)  # the writers WAITing behind it ask again

        try:
            await asyncio.shield(waits)
        except BaseException:
            waits.add_done_callback(lambda _: end(cancelled=True))
            raise
        end(cancelled=False)
        return self.leases.read_while_recalling(nodeid)

    def nodeid_of_name(self, parent: int, name: bytes) -> int | None:
        """The node id of the inode `name` in `parent` names now (`ExportFS.peek`)."""
        return self.fs.peek(parent, name)

    def before_create(self, parent: int, name: bytes) -> None:
        """CREATE may open an existing file for write: under open-lease, drop the
        kernel lease of whatever inode has that name now (see open_for_write)."""
        if self.leases.policy is not Policy.OPEN_LEASE:
            return
        nodeid = self.nodeid_of_name(parent, name)
        if nodeid is not None:
            self.detector.disarm(nodeid)

    @asynccontextmanager
    async def namespace_change(self, writer: int, *names: tuple[int, bytes]):
        """`async with d.namespace_change(writer, (directory, name), ...):` change
        names (one, or a RENAME's two).

        On entry, waits until no other guest may serve any of the `names` from
        its cache.  The recalls of all of them run at once, so a RENAME
        between two directories waits at most one term for their silent
        holders, not one per directory.  From entry until every exit of the
        body (the change landed, failed or was cancelled), each directory's
        names are in flux: no lease on it is granted and LOOKUPs in it say
        that their entry may not be cached (`entry_out`), so that a lookup
        answered while a recall still waits for a slow holder cannot cache
        the old name.
        """
        await self._after_restart_grace()
        begun, recalls = [], []
        try:
            for directory, name in names:
                decision = self.leases.begin_namespace_change(directory, writer)
                begun.append(directory)
                if isinstance(decision, Recall):
                    recalls.append(self.recaller.carry_out(decision, functools.partial(
                        InvalEntry, parent=directory, name=name, generation=decision.generation)))
            if recalls:
                await asyncio.shield(self._spawn(_all(recalls)))
            yield
        finally:
            for directory in begun:
                self.leases.namespace_change_landed(directory)

    # --- host-local changes, reported by the detector ---------------------------------

    async def host_local_modify(self, nodeid: int) -> None:
        """A process on the host is modifying (or has modified) `nodeid`.

        Returns once no guest can serve its old copy.  A pre-content detector
        answers the kernel only after this returns, so the write lands after
        the recall; an after-the-fact detector calls it to shorten the window.
        In DIRTY there is nothing to recall but tainted guests; the cachestat
        check before the next re-arm sees what the write dirtied.
        """
        self.stats.host_local_events += 1
        await self._after_restart_grace()
        self._host_local_recalls[nodeid] = self._host_local_recalls.get(nodeid, 0) + 1
        try:
            first, late = await self._modify(nodeid, HOST_LOCAL)
        finally:
            if self._host_local_recalls[nodeid] == 1:
                del self._host_local_recalls[nodeid]
            else:
                self._host_local_recalls[nodeid] -= 1
        if first:
            self.modified(nodeid)
        if late:
            # The kernel lands the write when it will: recall them at once, and
            # keep them tainted, so that a guest modification that comes next
            # waits for them too (this recall runs beside it).
            for guest in late:
                self.leases.unleased(nodeid, guest)
            self._spawn(self._recall_late(nodeid, late))

    def host_local_modification(self, nodeid: int) -> None:
        """After the fact: recall the leases on `nodeid` if it was clean."""
        if self.leases.state_of(nodeid) is InodeState.CLEAN:
            self._spawn(self.host_local_modify(nodeid))

    def host_local_namespace_change(self, directory: int, name: bytes) -> None:
        """After the fact: a name in `directory` changed on the host."""
        self.stats.host_local_events += 1
        self._spawn(self._recall_host_local_name(directory, name))

    async def _recall_host_local_name(self, directory: int, name: bytes) -> None:
        async with self.namespace_change(HOST_LOCAL, (directory, name)):
            pass  # the change has landed already: only its recall is left to do

    def host_local_overflow(self) -> None:
        """Events were lost: recall every lease, since any inode may have changed."""
        for nodeid in self.leases.leased_inodes():
            self.host_local_modification(nodeid)

    # --- clean again ---------------------------------------------------------------

    def _schedule_flush(self, nodeid: int) -> None:
        handle = self._flush_timers.pop(nodeid, None)
        if handle is not None:
            handle.cancel()
        loop = asyncio.get_running_loop()
        self._flush_timers[nodeid] = loop.call_later(
            self.config.clean_after_ms / 1000.0, lambda: self._spawn(self._idle_flush(nodeid)))

    async def _idle_flush(self, nodeid: int) -> None:
        self._flush_timers.pop(nodeid, None)
        try:
            sync = self.fs.flush_inode(nodeid)
        except OSError:
            return  # gone (unlinked and forgotten): nothing to re-arm
        mark = self.leases.flush_started(nodeid)
        try:
            await self.run_blocking(sync)
        except OSError as exc:  # EIO from writeback: stay DIRTY, try again later
            log.warning("flush of node %d failed: %s; will retry", nodeid, exc)
            self._schedule_flush(nodeid)
            return
        self.stats.flushes += 1
        self.leases.flush_finished(nodeid, mark)
        self.try_rearm(nodeid)

    def flushed(self, nodeid: int, mark: int) -> None:
        """A guest's FSYNC covering modifications up to `mark` has completed."""
        self.leases.flush_finished(nodeid, mark)
        self.try_rearm(nodeid)

    def try_rearm(self, nodeid: int) -> bool:
        """DIRTY -> CLEAN if flushed and the page cache is clean.  Arm first, then check
        (invariant 4): a write racing us is seen by the detector or by cachestat."""
        if not self.leases.rearm_begin(nodeid):
            return False
        armed = self.detector.arm(nodeid) is not False  # None: a detector that cannot fail
        try:
            clean = armed and cachestat.is_clean(self.fs.writable_fd(nodeid))
        except OSError:
            clean = False
        if self.leases.rearm_finish(nodeid, clean):
            self.stats.rearms += 1
            return True
        self.stats.rearm_refused += 1
        self.detector.disarm(nodeid)
        self._schedule_flush(nodeid)
        return False

    # --- reporting -------------------------------------------------------------------

    def stats_dict(self) -> dict:
        d = self.stats.as_dict()
        d["retries_answered"] = self.replies.answered
        d["policy"] = self.config.policy.label
        d["detector"] = self.detector.label
        d["detector_events"] = self.detector.events
        d["detector_stats"] = self.detector.stats()
        return d

    def write_stats(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.stats_dict(), f, indent=2)


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


_SMALL_REPLY = 512  # the room reserved for a reply without data (attributes, an entry)


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
    return _SMALL_REPLY


async def _all(coroutines) -> None:
    await asyncio.gather(*coroutines)


def _reset(transport: asyncio.Transport) -> None:
    """Abort with a TCP reset: a plain close would leave the unsent replies to the
    kernel, which keeps trying to deliver them (and its FIN after them) to a
    peer that does not read."""
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    transport.abort()


def _peer(session: Session) -> str:
    """Where a connection comes from, for logs (a Unix socket peer has no name)."""
    peer = session.transport.get_extra_info("peername")
    return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "unix"
