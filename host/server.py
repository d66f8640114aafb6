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
import dataclasses
import errno
import json
import logging
import os
import stat as stat_module
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass

from host import cachestat, replies
from host.backend import ExportFS
from host.detectors import Detector as HostDetector
from host.detectors import NullDetector
from host.leases import HOST_LOCAL, WAIT, InodeState, LeaseTable, Recall, term_end
from protocol import auth, wire
from protocol.address import parse_address
from protocol.codec import UnsupportedOpcode
from protocol.connection import NEED_DATA, Connection, Role, State
from protocol.errors import ProtocolError
from protocol.fuse import FATTR_ATIME, FATTR_FH, FATTR_MODE, FATTR_MTIME, FATTR_SIZE, Opcode
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
    # Holders whose connection was lost while they held a lease: a recall
    # waited for their term to run out (a mount's kernel keeps its pages).
    departed_waits: int = 0
    renewals_withheld: int = 0  # replies sent with LEASE_NOT_RENEWED (an ACK was owed)

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
        self.client_id = bytes(16)
        self.last_seen = time.monotonic()
        # The latest instant from which the host renewed this guest's term: the
        # arrival of a request (or HEARTBEAT) whose reply renewed it.  No reply
        # renews while an invalidation is owed (`acks`), so while the host waits
        # for an ACK, this, and the instant it may fence at, stand still.
        self.renewed_at = self.last_seen
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
        """The instant after which this guest surely serves nothing from its cache,
        clock margins included (host/leases.py, `term_end`)."""
        return term_end(self.renewed_at, self.daemon.config.lease_term_ms / 1000.0)

    def renews(self, received_at: float) -> bool:
        """May a reply to a frame received at `received_at` renew this guest's term?

        Not while an invalidation sent to it is unACKed, nor once it is fenced.
        When it may, the term is counted from `received_at` from now on."""
        if self.fenced or self.acks:
            return False
        if received_at > self.renewed_at:
            self.renewed_at = received_at
        return True


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
        self._departed: dict[int, Session] = {}  # lost connections whose term runs on
        self.replies = replies.ReplyCache(per_client=config.max_in_flight,
                                          clients=4 * config.max_sessions)
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
            session.client_id = hello.client_id
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

    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def session_lost(self, session: Session) -> None:
        """A guest's connection went away: its handles go at once, its leases only
        once its term has surely run out.

        A lost connection is not an ACK: a guest that mounted the export may
        still serve its kernel's pages and attributes.  Until `lease_expiry`
        it counts as a silent holder (`_departed`): a recall waits for its
        term to run out, and its pending ACKs stay unanswered."""
        session.closed = True
        self._end_handshake(session)
        if self.sessions.get(session.guest_id) is not session:
            return
        del self.sessions[session.guest_id]
        self.fs.close_handles_of(session.guest_id)
        self.leases.drop_writer(session.guest_id)
        remaining = session.lease_expiry() - time.monotonic()
        if session.fenced or remaining <= 0 or not self.leases.holds_any(session.guest_id):
            self._forget_guest(session.guest_id)
            return
        # Its node ids stay known too: a lease is kept by node id, and a writer
        # looking the file up again must find the same one, and its holder.
        self._departed[session.guest_id] = session
        asyncio.get_running_loop().call_later(remaining, self._departed_expired, session)

    def _departed_expired(self, session: Session) -> None:
        """The term of a guest whose connection was lost has run out: it holds nothing."""
        if self._departed.pop(session.guest_id, None) is session:
            self._forget_guest(session.guest_id)

    def _forget_guest(self, guest: int) -> None:
        self.leases.drop_holder(guest)
        self.fs.drop_owner(guest)

    # --- one request --------------------------------------------------------------

    async def _serve_request(self, session: Session, request: FsRequest,
                             received_at: float) -> None:
        if (session.client_id != replies.NO_CLIENT_ID and not session.fenced
                and replies.needs_reply_cache(request)):
            reply = await self._at_most_once(session, request)
        else:
            reply = await self._carry_out(session, request)
        if reply is not None and not session.renews(received_at):
            self.stats.renewals_withheld += 1
            reply = dataclasses.replace(reply, lease=dataclasses.replace(
                reply.lease, flags=reply.lease.flags | LEASE_NOT_RENEWED))
        if reply is not None and not session.closed:
            try:
                session.send(reply)
            except ProtocolError as exc:  # e.g. a reply larger than the frame maximum
                log.error("guest %d: cannot send reply: %s", session.guest_id, exc)
                session.send(FsReply(request.unique, -errno.EIO))

    async def _at_most_once(self, session: Session, request: FsRequest) -> FsReply:
        """Carry out a non-idempotent request once per (client id, unique): a
        retry after a reconnect gets the first attempt's reply, waiting for it
        if that attempt is still under way (host/replies.py)."""
        earlier = self.replies.first_attempt(session.client_id, request.unique)
        if earlier is not None:
            return await asyncio.shield(earlier)
        first = self.replies.record(session.client_id, request.unique)
        reply = FsReply(request.unique, -errno.EIO)  # should this attempt be cancelled
        try:
            reply = await self._carry_out(session, request)
            return reply
        finally:
            first.set_result(reply)

    async def _carry_out(self, session: Session, request: FsRequest) -> FsReply | None:
        """Run the request's handler; an errno (or a bug) becomes an error reply."""
        handler = HANDLERS.get(request.opcode)
        try:
            if session.fenced:
                raise OSError(EKEYEXPIRED, "lease expired: this guest was fenced; say HELLO again")
            if handler is None:
                raise OSError(errno.ENOSYS, f"opcode {request.opcode} not implemented")
            reply = await handler(self, session, request)
        except OSError as exc:
            self.stats.errors += 1
            reply = FsReply(request.unique, -(exc.errno or errno.EIO),
                            lease=getattr(exc, "lease", NO_LEASE))
        except Exception:  # a bug must not take the daemon down
            self.stats.errors += 1
            log.exception("guest %d: %s failed", session.guest_id, request.opcode.name)
            reply = FsReply(request.unique, -errno.EIO)
        return reply

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

    def entry_out(self, nodeid: int, st: os.stat_result, *, cacheable: bool = True) -> EntryOut:
        """The entry of a LOOKUP (or CREATE, MKDIR) reply.  With `cacheable`
        false its entry validity is 0: a guest (the kernel of a mount, or the
        library client) must not cache the name."""
        valid = self._validity_s()
        return EntryOut(nodeid, 0, valid if cacheable else 0, valid, 0, 0, Attr.from_stat(st))

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
        (`modify`); `m.first` says whether this modification started the
        recall.  The body must modify with no await in between.  Every exit of
        the body, success, an errno or a cancellation, counts the modification
        as landed and schedules the flush that leads back to CLEAN
        (`modified`), since after the recall the daemon cannot know the file
        is unchanged.  An OSError from the body is raised again as a
        FailedModification carrying the trailer (`revoked`) that publishes the
        inode's new generation to the writer.
        """
        first = await self.modify(nodeid, writer, is_dir=is_dir)
        try:
            yield Modification(nodeid, first)
        except OSError as exc:
            raise FailedModification(exc, self.revoked(nodeid, first)) from exc
        finally:
            self.modified(nodeid)

    async def modify(self, nodeid: int, writer: int, *, is_dir: bool = False) -> bool:
        """Return once `writer` may modify `nodeid`: every other guest's copy is gone.

        Returns True if this modification is the first dirtying one (it
        started a recall).  Must be followed, with no await in between, by the
        modification and `modified(nodeid)`: use `modification`, which pairs
        them on every exit.  Host-local writers (whose modification the kernel
        carries out) call it directly.
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
        every other copy of `nodeid` is gone (invariant 2).

        The recall runs as the daemon's own task, not the caller's: a caller
        cancelled while it waits does not cut a recall short (that would leave
        the inode DIRTY with a holder that never purged, so that later writes
        would send it nothing)."""
        while (decision := decide()) is WAIT:
            await asyncio.shield(self._recall_done[nodeid])
        if not isinstance(decision, Recall):
            return False
        recall = asyncio.ensure_future(self._recall(decision))
        self._recall_done[nodeid] = recall  # before any await: a second writer WAITs on it
        await asyncio.shield(recall)
        return True

    async def _recall(self, recall: Recall) -> None:
        """Carry out `recall` of an inode's data; then the modification may land."""
        try:
            await self._carry_out_recall(recall, lambda seq: Invalidate(
                seq, recall.ino, 0, 0, recall.generation))
        finally:
            self.leases.recall_finished(recall.ino)
            self._recall_done.pop(recall.ino, None)

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

    @asynccontextmanager
    async def namespace_change(self, directory: int, name: bytes, writer: int):
        """`async with d.namespace_change(directory, name, writer):` change one name.

        On entry, waits until no other guest may serve `name` in `directory`
        from its cache.  From entry until every exit of the body (the change
        landed, failed or was cancelled), the directory's names are in flux:
        no lease on it is granted and LOOKUPs in it say that their entry may
        not be cached (`entry_out`), so that a lookup answered while the
        recall still waits for a slow holder cannot cache the old name.
        """
        decision = self.leases.begin_namespace_change(directory, writer)
        try:
            if isinstance(decision, Recall):
                await asyncio.shield(asyncio.ensure_future(self._carry_out_recall(
                    decision, lambda seq: InvalEntry(seq, directory, name, decision.generation))))
            yield
        finally:
            self.leases.namespace_change_landed(directory)

    async def _carry_out_recall(self, recall: Recall, make) -> None:
        """Send one invalidation to each holder and wait for every ACK or fence.

        Invariant 2: this returns only when no holder can still serve the old
        data: it ACKed, or its term has surely run out (it was fenced, or its
        connection was lost that long ago).  The holders are waited for
        concurrently, so the wait is at most ack timeout + term (+ the clock
        margin) however many of them are silent (invariant 3).
        """
        started = time.monotonic_ns()
        self.stats.recalls += 1
        try:
            waits = []
            for guest in recall.holders:
                session = self.sessions.get(guest)
                if session is not None and not session.closed and not session.fenced:
                    waits.append(self._await_ack(session, self._send_invalidation(session, make)))
                elif (departed := self._departed.get(guest)) is not None:
                    self.stats.departed_waits += 1
                    waits.append(self._await_term_end(departed))
            await asyncio.gather(*waits)
        finally:
            waited = time.monotonic_ns() - started
            self.stats.recall_wait_max_ns = max(self.stats.recall_wait_max_ns, waited)

    def _send_invalidation(self, session: Session, make) -> asyncio.Future:
        """Send `make(seq)` to `session`; returns the future of its ACK.  If it
        cannot be sent, the connection is closed: a lost one, never ACKed."""
        seq = self._next_seq
        self._next_seq += 1
        message = make(seq)
        ack = asyncio.get_running_loop().create_future()
        session.acks[seq] = ack  # from now on no reply renews this guest's term
        try:
            session.send(message)
        except ProtocolError:
            session.transport.abort()
        if isinstance(message, Invalidate):
            self.stats.invalidations_sent += 1
        else:
            self.stats.inval_entries_sent += 1
        return ack

    async def _await_ack(self, session: Session, ack: asyncio.Future) -> None:
        """Wait for one holder's ACK: up to the ack timeout, or up to the end of
        its term if that is later.  A holder that has not ACKed by then is
        fenced: its term has surely run out, so it serves nothing any more.
        A lost connection is not an ACK: its future is never resolved."""
        # Its term stands still from the moment the invalidation was sent
        # (Session.renews), so this limit cannot move however busy it is.
        limit = max(self.config.ack_timeout_ms / 1000.0, session.lease_expiry() - time.monotonic())
        try:
            await asyncio.wait_for(asyncio.shield(ack), limit)
            return
        except asyncio.TimeoutError:
            pass
        log.warning("guest %s (%d) did not ACK; fenced after its lease term", session.name,
                    session.guest_id)
        session.fenced = True
        self.stats.fenced += 1
        self.leases.drop_holder(session.guest_id)

    async def _await_term_end(self, session: Session) -> None:
        """A holder whose connection was lost: wait until its term has surely run out."""
        remaining = session.lease_expiry() - time.monotonic()
        if remaining > 0:
            await asyncio.sleep(remaining)

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
        self._spawn(self._recall_host_local_name(directory, name))

    async def _recall_host_local_name(self, directory: int, name: bytes) -> None:
        async with self.namespace_change(directory, name, HOST_LOCAL):
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
            await asyncio.to_thread(sync)
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


# --- the handlers, one per opcode ------------------------------------------------------


def _peer(session: Session) -> str:
    """Where a connection comes from, for logs (a Unix socket peer has no name)."""
    peer = session.transport.get_extra_info("peername")
    return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "unix"


def _is_dir(st: os.stat_result) -> bool:
    return stat_module.S_ISDIR(st.st_mode)


async def _lookup(d: HostDaemon, s: Session, r: FsRequest) -> FsReply:
    nodeid, st = d.fs.lookup(s.guest_id, r.nodeid, r.op.name)
    # While a name in the directory is being recalled, the entry may not be cached.
    cacheable = not d.leases.names_changing(r.nodeid)
    return FsReply(r.unique, 0, d.entry_out(nodeid, st, cacheable=cacheable),
                   d.lease_for(s, nodeid, is_dir=_is_dir(st)))


async def _forget(d: HostDaemon, s: Session, r: FsRequest) -> None:
    d.fs.forget(s.guest_id, r.nodeid, r.op.nlookup)
    return None  # FORGET has no reply


async def _getattr(d: HostDaemon, s: Session, r: FsRequest) -> FsReply:
    st = d.fs.getattr(s.guest_id, r.nodeid)
    return FsReply(r.unique, 0, d.attr_out(st), d.lease_for(s, r.nodeid, is_dir=_is_dir(st)))


async def _setattr(d: HostDaemon, s: Session, r: FsRequest) -> FsReply:
    op = r.op
    before = d.fs.getattr(s.guest_id, r.nodeid)  # refuse unknown nodeids before recalling
    async with d.modification(r.nodeid, s.guest_id, is_dir=_is_dir(before)):
        st = d.fs.setattr(
            s.guest_id, r.nodeid,
            size=op.size if op.valid & FATTR_SIZE else None,
            mode=op.mode & 0o7777 if op.valid & FATTR_MODE else None,
            atime_ns=op.atime * 1_000_000_000 + op.atimensec if op.valid & FATTR_ATIME else None,
            mtime_ns=op.mtime * 1_000_000_000 + op.mtimensec if op.valid & FATTR_MTIME else None,
            fh=op.fh if op.valid & FATTR_FH else None)
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
            async with d.modification(r.nodeid, s.guest_id):
                fh = d.fs.open(s.guest_id, r.nodeid, flags)
        else:
            fh = d.fs.open(s.guest_id, r.nodeid, flags)
    except BaseException:
        if writing:
            d.leases.close_for_write(r.nodeid, s.guest_id)
        raise
    if writing:
        s.write_handles[fh] = r.nodeid
        lease = d.revoked(r.nodeid)
    else:
        lease = d.lease_for(s, r.nodeid)
    return FsReply(r.unique, 0, OpenOut(fh), lease)


async def _create(d: HostDaemon, s: Session, r: FsRequest) -> FsReply:
    op = r.op
    d.fs.getattr(s.guest_id, r.nodeid)
    async with d.namespace_change(r.nodeid, op.name, s.guest_id):
        d.before_create(r.nodeid, op.name)
        # O_TRUNC on an existing file is a modification: it must wait for the recall.
        flags = op.flags & ~os.O_TRUNC
        nodeid, st, fh = d.fs.create(s.guest_id, r.nodeid, op.name, flags, op.mode & ~op.umask)
    await d.open_for_write(nodeid, s.guest_id)
    s.write_handles[fh] = nodeid
    if op.flags & os.O_TRUNC and st.st_size:
        async with d.modification(nodeid, s.guest_id):
            st = d.fs.setattr(s.guest_id, nodeid, size=0, fh=fh)
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
    async with d.modification(nodeid, s.guest_id) as m:
        written = d.fs.write(s.guest_id, op.fh, op.offset, op.data)
    return FsReply(r.unique, 0, WriteOut(written), d.revoked(nodeid, m.first))


async def _flush(d: HostDaemon, s: Session, r: FsRequest) -> FsReply:
    d.fs.flush(s.guest_id, r.op.fh)
    return FsReply(r.unique, 0, EmptyOut())


async def _fsync(d: HostDaemon, s: Session, r: FsRequest) -> FsReply:
    op = r.op
    nodeid = d.fs.nodeid_of_handle(s.guest_id, op.fh)
    mark = d.leases.flush_started(nodeid)
    await asyncio.to_thread(d.fs.fsync(s.guest_id, op.fh, bool(op.fsync_flags & 1)))
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
    async with d.namespace_change(r.nodeid, op.name, s.guest_id):
        nodeid, st = d.fs.mkdir(s.guest_id, r.nodeid, op.name, op.mode & ~op.umask)
    return FsReply(r.unique, 0, d.entry_out(nodeid, st))


async def _unlink(d: HostDaemon, s: Session, r: FsRequest) -> FsReply:
    d.fs.getattr(s.guest_id, r.nodeid)
    async with d.namespace_change(r.nodeid, r.op.name, s.guest_id):
        d.fs.unlink(s.guest_id, r.nodeid, r.op.name)
    return FsReply(r.unique, 0, EmptyOut())


async def _rmdir(d: HostDaemon, s: Session, r: FsRequest) -> FsReply:
    d.fs.getattr(s.guest_id, r.nodeid)
    async with d.namespace_change(r.nodeid, r.op.name, s.guest_id):
        d.fs.rmdir(s.guest_id, r.nodeid, r.op.name)
    return FsReply(r.unique, 0, EmptyOut())


async def _rename(d: HostDaemon, s: Session, r: FsRequest) -> FsReply:
    op = r.op
    d.fs.getattr(s.guest_id, r.nodeid)
    d.fs.getattr(s.guest_id, op.newdir)
    async with (d.namespace_change(r.nodeid, op.oldname, s.guest_id),
                d.namespace_change(op.newdir, op.newname, s.guest_id)):
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
