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
import errno
import json
import logging
import os
import stat as stat_module
import time
from dataclasses import dataclass

from host import cachestat
from host.backend import ExportFS
from host.detectors import Detector as HostDetector
from host.detectors import NullDetector
from host.leases import HOST_LOCAL, WAIT, InodeState, LeaseTable, Recall
from protocol import auth, wire
from protocol.address import parse_address
from protocol.codec import UnsupportedOpcode
from protocol.connection import NEED_DATA, Connection, Role, State
from protocol.errors import ProtocolError
from protocol.fuse import FATTR_ATIME, FATTR_FH, FATTR_MODE, FATTR_MTIME, FATTR_SIZE, Opcode
from protocol.messages import (
    LEASE_FIRST_DIRTY,
    LEASE_GRANTED,
    NO_LEASE,
    Ack,
    Attr,
    AttrOut,
    Auth,
    AuthReply,
    ConnectionClosed,
    CreateOut,
    DirEntry,
    EmptyOut,
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
    OpenOut,
    Policy,
    ReaddirOut,
    ReadOut,
    WriteOut,
)

log = logging.getLogger("cleanlease.host")

EKEYEXPIRED = errno.EKEYEXPIRED  # the reply to every request of a fenced guest


@dataclass
class HostConfig:
    export: str
    policy: Policy = Policy.CLEAN_LEASE
    lease_term_ms: int = 2000
    ack_timeout_ms: int = 500
    clean_after_ms: int = 20
    ttl_ms: int = 1000
    max_frame: int = wire.DEFAULT_MAX_FRAME
    max_in_flight: int = 256
    max_sessions: int = 64
    max_handles_per_guest: int = 1024
    # With a token, every connection must prove it knows it (protocol/auth.py)
    # before anything else is served.
    token: bytes | None = None
    # A connection that has not finished HELLO (and AUTH) by then is closed, so
    # that silent or slow peers cannot hold sockets; at most max_sessions may
    # be that far at once.
    handshake_timeout_ms: int = 5000


@dataclass
class HostStats:
    sessions: int = 0
    auth_failures: int = 0
    handshakes_refused: int = 0  # too many at once, or not finished in time
    requests: int = 0
    errors: int = 0
    protocol_errors: int = 0
    invalidations_sent: int = 0
    inval_entries_sent: int = 0
    acks: int = 0
    recalls: int = 0
    fenced: int = 0
    flushes: int = 0
    rearms: int = 0
    rearm_refused: int = 0
    bytes_to_guests: int = 0
    host_local_events: int = 0
    recall_wait_max_ns: int = 0  # the longest a recall has taken (there were `recalls`)

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        del d["recall_wait_max_ns"]
        d["recall_wait_ns"] = {"count": self.recalls, "max": self.recall_wait_max_ns}
        return d


class Session:
    """One connected guest: its connection, its handles' write modes, its liveness."""

    def __init__(self, daemon: "HostDaemon", transport: asyncio.Transport):
        self.daemon = daemon
        self.transport = transport
        self.conn = Connection(Role.HOST, max_frame=daemon.config.max_frame,
                               max_in_flight=daemon.config.max_in_flight)
        self.guest_id = 0
        self.name = "?"
        self.last_seen = time.monotonic()
        self.fenced = False
        self.closed = False
        self.write_handles: dict[int, int] = {}  # fh -> nodeid, for open-lease
        self.acks: dict[int, asyncio.Future] = {}
        self.host_nonce = b""  # the AUTH challenge sent in the HELLO reply
        self.handshake_timer: asyncio.TimerHandle | None = None

    def send(self, message) -> None:
        """Write `message`; dropped if the connection has failed or is closing (the
        guest is gone, or about to be: nothing it could still use is lost)."""
        if self.closed or self.transport.is_closing() or self.conn.state in (State.ERROR,
                                                                              State.CLOSED):
            return
        data = self.conn.send(message)
        self.daemon.stats.bytes_to_guests += len(data)
        self.transport.write(data)

    def lease_expiry(self) -> float:
        """The latest instant this guest may still serve from its cache."""
        return self.last_seen + self.daemon.config.lease_term_ms / 1000.0


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


class HostDaemon:
    """The daemon's state: the export, the lease table, the sessions."""

    def __init__(self, config: HostConfig, detector: HostDetector | None = None):
        self.config = config
        self.fs = ExportFS(config.export, max_handles_per_owner=config.max_handles_per_guest)
        self.detector = detector or NullDetector()
        self.leases = LeaseTable(config.policy, needs_arming=self.detector.needs_arming)
        self.boot_id = os.urandom(16)
        self.sessions: dict[int, Session] = {}  # only those that finished the handshake
        self._handshaking: set[Session] = set()
        self.stats = HostStats()
        self._next_guest_id = 1
        self._next_seq = 1
        self._recall_done: dict[int, asyncio.Future] = {}
        self._flush_timers: dict[int, asyncio.TimerHandle] = {}
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
        await self.detector.start(self)
        return address

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for session in [*self.sessions.values(), *self._handshaking]:
            session.transport.close()
        for handle in self._flush_timers.values():
            handle.cancel()
        for task in list(self._tasks):
            task.cancel()
        await self.detector.stop()

    # --- connections and the handshake -----------------------------------------

    def accept(self, transport: asyncio.Transport) -> Session:
        """A new connection.  It gets `handshake_timeout_ms` to finish HELLO (and
        AUTH); beyond `max_sessions` unfinished handshakes it is closed at once."""
        session = Session(self, transport)
        if len(self._handshaking) >= self.config.max_sessions:
            self.stats.handshakes_refused += 1
            log.warning("%d connections are still in their handshake: refusing another",
                        len(self._handshaking))
            session.closed = True
            transport.abort()
            return session
        self._handshaking.add(session)
        session.handshake_timer = asyncio.get_running_loop().call_later(
            self.config.handshake_timeout_ms / 1000.0, self._handshake_expired, session)
        return session

    def _handshake_expired(self, session: Session) -> None:
        if session in self._handshaking:
            self.stats.handshakes_refused += 1
            log.warning("connection %s: no finished handshake in %d ms, closing",
                        _peer(session), self.config.handshake_timeout_ms)
            session.transport.abort()

    def _end_handshake(self, session: Session) -> None:
        self._handshaking.discard(session)
        if session.handshake_timer is not None:
            session.handshake_timer.cancel()

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
        features = hello.features & wire.SUPPORTED_FEATURES
        nonce = bytes(wire.NONCE_SIZE)
        guest_id = 0
        if error == 0:
            guest_id = self._next_guest_id
            self._next_guest_id += 1
            session.guest_id, session.name = guest_id, hello.name
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
            log.warning("connection %s (%s): wrong token, closing", _peer(session),
                        session.name)
            session.send(AuthReply(-errno.EACCES))
            session.transport.close()
            return
        if len(self.sessions) >= self.config.max_sessions:
            session.send(AuthReply(-errno.EUSERS))
            session.transport.close()
            return
        session.send(AuthReply(0, auth.host_proof(token, message.nonce, session.host_nonce)))
        self._register(session)

    # --- bytes in --------------------------------------------------------------

    def feed(self, session: Session, data: bytes) -> None:
        """Process bytes from a guest; a protocol error closes only that guest."""
        session.last_seen = time.monotonic()
        conn = session.conn
        try:
            conn.receive_data(data)
            while True:
                try:
                    event = conn.next_event()
                except UnsupportedOpcode as exc:
                    session.send(FsReply(exc.unique, -errno.ENOSYS))
                    continue
                if event is NEED_DATA:
                    return
                if isinstance(event, ConnectionClosed):
                    session.transport.close()
                    return
                self._dispatch_event(session, event)
        except ProtocolError as exc:
            self.stats.protocol_errors += 1
            log.warning("guest %s (%d): protocol error, closing: %s", session.name,
                        session.guest_id, exc)
            session.transport.abort()

    def _dispatch_event(self, session: Session, event) -> None:
        if isinstance(event, FsRequest):
            self.stats.requests += 1
            self._spawn(self._serve_request(session, event))
        elif isinstance(event, Ack):
            self.stats.acks += 1
            future = session.acks.pop(event.seq, None)
            if future is not None and not future.done():
                future.set_result(None)
        elif isinstance(event, Heartbeat):
            session.send(HeartbeatReply(event.seq))
        elif isinstance(event, Hello):
            self._hello(session, event)
        elif isinstance(event, Auth):
            self._auth(session, event)

    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def session_lost(self, session: Session) -> None:
        """A guest went away: its leases, handles and pending ACKs go with it."""
        session.closed = True
        self._end_handshake(session)
        if self.sessions.get(session.guest_id) is session:
            del self.sessions[session.guest_id]
            self.leases.drop_holder(session.guest_id)
            self.fs.drop_owner(session.guest_id)
        for future in session.acks.values():
            if not future.done():
                future.set_result(None)  # a guest that is gone caches nothing
        session.acks.clear()

    # --- one request --------------------------------------------------------------

    async def _serve_request(self, session: Session, request: FsRequest) -> None:
        handler = HANDLERS.get(request.opcode)
        try:
            if session.fenced:
                raise OSError(EKEYEXPIRED, "lease expired: this guest was fenced; say HELLO again")
            if handler is None:
                raise OSError(errno.ENOSYS, f"opcode {request.opcode} not implemented")
            reply = await handler(self, session, request)
        except OSError as exc:
            self.stats.errors += 1
            reply = FsReply(request.unique, -(exc.errno or errno.EIO))
        except Exception:  # a bug must not take the daemon down
            self.stats.errors += 1
            log.exception("guest %d: %s failed", session.guest_id, request.opcode.name)
            reply = FsReply(request.unique, -errno.EIO)
        if reply is not None and not session.closed:
            try:
                session.send(reply)
            except ProtocolError as exc:  # e.g. a reply larger than the frame maximum
                log.error("guest %d: cannot send reply: %s", session.guest_id, exc)
                session.send(FsReply(request.unique, -errno.EIO))

    def lease_for(self, session: Session, nodeid: int, *, is_dir: bool = False) -> LeaseGrant:
        """Grant `session` a lease on `nodeid` if the policy allows; the reply must
        be sent in the same step (no await in between)."""
        grant = self.leases.grant(nodeid, session.guest_id, is_dir=is_dir)
        if grant is None:
            if self.leases.wants_arming(nodeid):
                self._arm(nodeid)
            return NO_LEASE
        self.detector.watch(nodeid, is_dir)
        return LeaseGrant(nodeid, grant.generation, self.config.lease_term_ms, LEASE_GRANTED)

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

    def entry_out(self, nodeid: int, st: os.stat_result) -> EntryOut:
        valid = self._validity_s()
        return EntryOut(nodeid, 0, valid, valid, 0, 0, Attr.from_stat(st))

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

    async def modify(self, nodeid: int, writer: int, *, is_dir: bool = False) -> bool:
        """Return once `writer` may modify `nodeid`: every other guest's copy is gone.

        Returns True if this modification is the first dirtying one (it
        started a recall).  Must be followed, with no await in between, by the
        modification and `modified(nodeid)`.
        """
        if await self._recall_for(nodeid, lambda: self.leases.begin_modification(
                nodeid, writer, is_dir=is_dir)):
            self.detector.disarm(nodeid)
            return True
        if self.leases.policy is Policy.OPEN_LEASE:
            self.detector.disarm(nodeid)  # see open_for_write
        return False

    def modified(self, nodeid: int) -> None:
        """A modification of `nodeid` has landed: schedule the flush that cleans it."""
        self.leases.modification_landed(nodeid)
        if self.leases.policy is Policy.CLEAN_LEASE:
            self._schedule_flush(nodeid)

    async def open_for_write(self, nodeid: int, writer: int) -> None:
        await self._recall_for(nodeid, lambda: self.leases.open_for_write(nodeid, writer))
        if self.leases.policy is Policy.OPEN_LEASE:
            # Drop the daemon's kernel read lease before it opens the file for
            # write itself: breaking its own lease would block it for
            # lease-break-time (docs/kernel.md).
            self.detector.disarm(nodeid)

    async def _recall_for(self, nodeid: int, decide) -> bool:
        """Ask the lease table (`decide()`) until no recall of `nodeid` is in progress,
        and carry out the Recall it answers, if any.  True if there was one: then
        every other copy of `nodeid` is gone (invariant 2)."""
        while (decision := decide()) is WAIT:
            await asyncio.shield(self._recall_done[nodeid])
        if not isinstance(decision, Recall):
            return False
        await self._carry_out_recall(decision, lambda seq: Invalidate(
            seq, decision.ino, 0, 0, decision.generation))
        self.leases.recall_finished(nodeid)
        return True

    def before_create(self, parent: int, name: bytes) -> None:
        """CREATE may open an existing file for write: under open-lease, drop the
        kernel lease of whatever inode has that name now (see open_for_write)."""
        if self.leases.policy is not Policy.OPEN_LEASE:
            return
        try:
            st = os.stat(name, dir_fd=self.fs.inodes.host_fd(parent), follow_symlinks=False)
        except (OSError, ValueError):
            return
        nodeid = self.fs.inodes.lookup_key(st.st_dev, st.st_ino)
        if nodeid is not None:
            self.detector.disarm(nodeid)

    async def namespace_change(self, directory: int, name: bytes, writer: int) -> None:
        """Return once no other guest may serve `name` in `directory` from its cache."""
        decision = self.leases.begin_namespace_change(directory, writer)
        if isinstance(decision, Recall):
            await self._carry_out_recall(decision, lambda seq: InvalEntry(
                seq, directory, name, decision.generation), track=False)

    async def _carry_out_recall(self, recall: Recall, make, *, track: bool = True) -> None:
        """Send one invalidation to each holder and wait for every ACK or fence.

        Invariant 2: this returns only when no holder can still serve the old
        data: it ACKed, disconnected, or was fenced after its term ran out.
        """
        loop = asyncio.get_running_loop()
        done = loop.create_future() if track else None
        if track:
            self._recall_done[recall.ino] = done
        started = time.monotonic_ns()
        self.stats.recalls += 1
        try:
            waiting: dict[asyncio.Future, Session] = {}
            for guest in recall.holders:
                session = self.sessions.get(guest)
                if session is None or session.closed or session.fenced:
                    continue
                seq = self._next_seq
                self._next_seq += 1
                message = make(seq)
                future = loop.create_future()
                session.acks[seq] = future
                try:
                    session.send(message)
                except ProtocolError:
                    session.transport.abort()
                    continue
                if isinstance(message, Invalidate):
                    self.stats.invalidations_sent += 1
                else:
                    self.stats.inval_entries_sent += 1
                waiting[future] = session
            if waiting:
                timeout = self.config.ack_timeout_ms / 1000.0
                _, pending = await asyncio.wait(list(waiting), timeout=timeout)
                for future in pending:
                    await self._fence(waiting[future], future)
        finally:
            waited = time.monotonic_ns() - started
            self.stats.recall_wait_max_ns = max(self.stats.recall_wait_max_ns, waited)
            if track:
                self._recall_done.pop(recall.ino, None)
                if not done.done():
                    done.set_result(None)

    async def _fence(self, session: Session, ack: asyncio.Future) -> None:
        """A holder did not ACK in time: wait until its lease has surely expired
        (it stops serving from cache by itself then), or its ACK comes late."""
        remaining = session.lease_expiry() - time.monotonic()
        if remaining > 0:
            try:
                await asyncio.wait_for(asyncio.shield(ack), remaining)
                return
            except asyncio.TimeoutError:
                pass
        if ack.done():
            return
        log.warning("guest %s (%d) did not ACK; fenced after its lease term", session.name,
                    session.guest_id)
        session.fenced = True
        self.stats.fenced += 1
        self.leases.drop_holder(session.guest_id)

    # --- host-local changes, reported by the detector ---------------------------------

    async def host_local_modify(self, nodeid: int) -> None:
        """A process on the host is modifying (or has modified) `nodeid`.

        Returns once no guest can serve its old copy.  A pre-content detector
        answers the kernel only after this returns, so the write lands after
        the recall; an after-the-fact detector calls it to shorten the window.
        In DIRTY there is nothing to recall; the cachestat check before the
        next re-arm sees what the write dirtied.
        """
        self.stats.host_local_events += 1
        if await self.modify(nodeid, HOST_LOCAL):
            self.modified(nodeid)

    def host_local_modification(self, nodeid: int) -> None:
        """After the fact: recall the leases on `nodeid` if it was clean."""
        if self.leases.state_of(nodeid) is InodeState.CLEAN:
            self._spawn(self.host_local_modify(nodeid))

    def host_local_namespace_change(self, directory: int, name: bytes) -> None:
        """After the fact: a name in `directory` changed on the host."""
        self.stats.host_local_events += 1
        self._spawn(self.namespace_change(directory, name, HOST_LOCAL))

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
            fd = self.fs.writable_fd(nodeid)
        except OSError:
            return  # gone (unlinked and forgotten): nothing to re-arm
        mark = self.leases.flush_started(nodeid)
        await asyncio.to_thread(os.fdatasync, fd)
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
        d["policy"] = self.config.policy.label
        d["detector"] = self.detector.label
        d["detector_events"] = self.detector.events
        d["detector_stats"] = self.detector.stats()
        return d

    def write_stats(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.stats_dict(), f, indent=2)


# --- the handlers, one per opcode ------------------------------------------------------


def _peer(session: Session) -> str:
    """Where a connection comes from, for logs (a Unix socket peer has no name)."""
    peer = session.transport.get_extra_info("peername")
    return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "unix"


def _is_dir(st: os.stat_result) -> bool:
    return stat_module.S_ISDIR(st.st_mode)


async def _lookup(d: HostDaemon, s: Session, r: FsRequest) -> FsReply:
    nodeid, st = d.fs.lookup(s.guest_id, r.nodeid, r.op.name)
    return FsReply(r.unique, 0, d.entry_out(nodeid, st), d.lease_for(s, nodeid, is_dir=_is_dir(st)))


async def _forget(d: HostDaemon, s: Session, r: FsRequest) -> None:
    d.fs.forget(s.guest_id, r.nodeid, r.op.nlookup)
    return None  # FORGET has no reply


async def _getattr(d: HostDaemon, s: Session, r: FsRequest) -> FsReply:
    st = d.fs.getattr(s.guest_id, r.nodeid)
    return FsReply(r.unique, 0, d.attr_out(st), d.lease_for(s, r.nodeid, is_dir=_is_dir(st)))


async def _setattr(d: HostDaemon, s: Session, r: FsRequest) -> FsReply:
    op = r.op
    before = d.fs.getattr(s.guest_id, r.nodeid)  # refuse unknown nodeids before recalling
    await d.modify(r.nodeid, s.guest_id, is_dir=_is_dir(before))
    st = d.fs.setattr(
        s.guest_id, r.nodeid,
        size=op.size if op.valid & FATTR_SIZE else None,
        mode=op.mode & 0o7777 if op.valid & FATTR_MODE else None,
        atime_ns=op.atime * 1_000_000_000 + op.atimensec if op.valid & FATTR_ATIME else None,
        mtime_ns=op.mtime * 1_000_000_000 + op.mtimensec if op.valid & FATTR_MTIME else None,
        fh=op.fh if op.valid & FATTR_FH else None)
    d.modified(r.nodeid)
    return FsReply(r.unique, 0, d.attr_out(st), d.revoked(r.nodeid))


def _writes(flags: int) -> bool:
    return (flags & os.O_ACCMODE) != os.O_RDONLY or bool(flags & os.O_TRUNC)


async def _open(d: HostDaemon, s: Session, r: FsRequest) -> FsReply:
    flags = r.op.flags
    st = d.fs.getattr(s.guest_id, r.nodeid)
    if _is_dir(st):
        raise OSError(errno.EISDIR, "use READDIR on directories")
    writing = _writes(flags)
    if writing:
        await d.open_for_write(r.nodeid, s.guest_id)
    try:
        if flags & os.O_TRUNC:
            await d.modify(r.nodeid, s.guest_id)
        fh = d.fs.open(s.guest_id, r.nodeid, flags)
    except BaseException:
        if writing:
            d.leases.close_for_write(r.nodeid, s.guest_id)
        raise
    if flags & os.O_TRUNC:
        d.modified(r.nodeid)
    if writing:
        s.write_handles[fh] = r.nodeid
        lease = d.revoked(r.nodeid)
    else:
        lease = d.lease_for(s, r.nodeid)
    return FsReply(r.unique, 0, OpenOut(fh), lease)


async def _create(d: HostDaemon, s: Session, r: FsRequest) -> FsReply:
    op = r.op
    d.fs.getattr(s.guest_id, r.nodeid)
    await d.namespace_change(r.nodeid, op.name, s.guest_id)
    d.before_create(r.nodeid, op.name)
    # O_TRUNC on an existing file is a modification: it must wait for the recall.
    flags = op.flags & ~os.O_TRUNC
    nodeid, st, fh = d.fs.create(s.guest_id, r.nodeid, op.name, flags, op.mode & ~op.umask)
    await d.open_for_write(nodeid, s.guest_id)
    s.write_handles[fh] = nodeid
    if op.flags & os.O_TRUNC and st.st_size:
        await d.modify(nodeid, s.guest_id)
        st = d.fs.setattr(s.guest_id, nodeid, size=0, fh=fh)
        d.modified(nodeid)
    return FsReply(r.unique, 0, CreateOut(d.entry_out(nodeid, st), OpenOut(fh)), d.revoked(nodeid))


async def _read(d: HostDaemon, s: Session, r: FsRequest) -> FsReply:
    op = r.op
    limit = s.conn.max_frame - 64  # room for the headers and the lease trailer
    nodeid = d.fs.nodeid_of_handle(s.guest_id, op.fh)
    data = d.fs.read(s.guest_id, op.fh, op.offset, min(op.size, limit))
    return FsReply(r.unique, 0, ReadOut(data), d.lease_for(s, nodeid))


async def _write(d: HostDaemon, s: Session, r: FsRequest) -> FsReply:
    op = r.op
    nodeid = d.fs.nodeid_of_handle(s.guest_id, op.fh)
    first = await d.modify(nodeid, s.guest_id)
    written = d.fs.write(s.guest_id, op.fh, op.offset, op.data)
    d.modified(nodeid)
    return FsReply(r.unique, 0, WriteOut(written), d.revoked(nodeid, first))


async def _flush(d: HostDaemon, s: Session, r: FsRequest) -> FsReply:
    d.fs.flush(s.guest_id, r.op.fh)
    return FsReply(r.unique, 0, EmptyOut())


async def _fsync(d: HostDaemon, s: Session, r: FsRequest) -> FsReply:
    op = r.op
    nodeid = d.fs.nodeid_of_handle(s.guest_id, op.fh)
    mark = d.leases.flush_started(nodeid)
    await asyncio.to_thread(d.fs.fsync, s.guest_id, op.fh, bool(op.fsync_flags & 1))
    d.flushed(nodeid, mark)
    return FsReply(r.unique, 0, EmptyOut())


async def _release(d: HostDaemon, s: Session, r: FsRequest) -> FsReply:
    fh = r.op.fh
    d.fs.release(s.guest_id, fh)
    nodeid = s.write_handles.pop(fh, None)
    if nodeid is not None:
        d.leases.close_for_write(nodeid, s.guest_id)
    return FsReply(r.unique, 0, EmptyOut())


async def _readdir(d: HostDaemon, s: Session, r: FsRequest) -> FsReply:
    op = r.op
    entries = d.fs.readdir(s.guest_id, r.nodeid)
    out, used = [], 0
    for index, (name, ino, dtype) in enumerate(entries[op.offset:], start=op.offset + 1):
        size = 24 + len(name) + (8 - len(name) % 8) % 8
        if used + size > min(op.size, s.conn.max_frame - 64):
            break
        out.append(DirEntry(ino, index, dtype, name))
        used += size
    return FsReply(r.unique, 0, ReaddirOut(tuple(out)), d.lease_for(s, r.nodeid, is_dir=True))


async def _mkdir(d: HostDaemon, s: Session, r: FsRequest) -> FsReply:
    op = r.op
    d.fs.getattr(s.guest_id, r.nodeid)
    await d.namespace_change(r.nodeid, op.name, s.guest_id)
    nodeid, st = d.fs.mkdir(s.guest_id, r.nodeid, op.name, op.mode & ~op.umask)
    return FsReply(r.unique, 0, d.entry_out(nodeid, st))


async def _unlink(d: HostDaemon, s: Session, r: FsRequest) -> FsReply:
    d.fs.getattr(s.guest_id, r.nodeid)
    await d.namespace_change(r.nodeid, r.op.name, s.guest_id)
    d.fs.unlink(s.guest_id, r.nodeid, r.op.name)
    return FsReply(r.unique, 0, EmptyOut())


async def _rmdir(d: HostDaemon, s: Session, r: FsRequest) -> FsReply:
    d.fs.getattr(s.guest_id, r.nodeid)
    await d.namespace_change(r.nodeid, r.op.name, s.guest_id)
    d.fs.rmdir(s.guest_id, r.nodeid, r.op.name)
    return FsReply(r.unique, 0, EmptyOut())


async def _rename(d: HostDaemon, s: Session, r: FsRequest) -> FsReply:
    op = r.op
    d.fs.getattr(s.guest_id, r.nodeid)
    d.fs.getattr(s.guest_id, op.newdir)
    await d.namespace_change(r.nodeid, op.oldname, s.guest_id)
    await d.namespace_change(op.newdir, op.newname, s.guest_id)
    d.fs.rename(s.guest_id, r.nodeid, op.oldname, op.newdir, op.newname)
    return FsReply(r.unique, 0, EmptyOut())


HANDLERS = {
    Opcode.LOOKUP: _lookup,
    Opcode.FORGET: _forget,
    Opcode.GETATTR: _getattr,
    Opcode.SETATTR: _setattr,
    Opcode.OPEN: _open,
    Opcode.CREATE: _create,
    Opcode.READ: _read,
    Opcode.WRITE: _write,
    Opcode.FLUSH: _flush,
    Opcode.FSYNC: _fsync,
    Opcode.RELEASE: _release,
    Opcode.READDIR: _readdir,
    Opcode.MKDIR: _mkdir,
    Opcode.UNLINK: _unlink,
    Opcode.RMDIR: _rmdir,
    Opcode.RENAME: _rename,
}
