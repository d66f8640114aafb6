"""The guest: an asyncio client of the host daemon, with its cache.

A thin asyncio layer (as asyncpg is over its protocol core): the sans-I/O
`Connection` does the framing, `GuestCache` decides what may be served; this
module adds the socket, one future per outstanding request, and timeouts.

Invalidations are applied in the same callback that decodes them, before the
ACK is written and before any later reply is looked at, so a reply can never
re-populate a cache with data the host has already recalled.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import os
import time
from dataclasses import dataclass

from guest.cache import PAGE_SIZE, GuestCache
from protocol import auth, wire
from protocol.address import parse_address
from protocol.connection import NEED_DATA, Connection, Role
from protocol.errors import ProtocolError
from protocol.fuse import FATTR_SIZE
from protocol.messages import (
    Ack,
    Attr,
    Auth,
    AuthReply,
    ConnectionClosed,
    Create,
    Forget,
    Interrupt,
    FsReply,
    FsRequest,
    Fsync,
    Getattr,
    Heartbeat,
    HeartbeatReply,
    Hello,
    HelloReply,
    InvalEntry,
    Invalidate,
    Lookup,
    Mkdir,
    Open,
    Policy,
    Read,
    Readdir,
    Release,
    Rename,
    Setattr,
    Unlink,
    Write,
)

ROOT = 1


class HostError(OSError):
    """The host answered a request with an errno."""


class SessionLost(ConnectionError):
    """The connection to the host is gone; outstanding requests fail with this."""


class OutcomeUnknown(SessionLost):
    """A non-idempotent request (a write, a truncate) was sent, and the host
    restarted before it answered: whether it was carried out cannot be known,
    and repeating it could undo a later write of someone else.  Read the file
    to see what it holds, then decide."""


class AuthenticationFailed(ConnectionError):
    """The token exchange failed: ours was refused, the host's proof was wrong,
    or one side has a token and the other none.  Retrying cannot help."""


@dataclass(eq=False)
class FileHandle:
    """An open file.  `nodeid` and `fh` change when the client re-opens it on a new session.

    `inode` is the host inode it was opened on, (inode number, generation)
    as LOOKUP replies name it: a re-open that finds another inode under
    `path` (the file was replaced meanwhile, even by one that got the same
    inode number) makes the handle `stale`, and every later use fails with
    ESTALE."""

    path: str
    nodeid: int
    fh: int
    flags: int
    inode: tuple[int, int] = (0, 0)
    closed: bool = False
    stale: bool = False

    def check(self) -> None:
        """Raises HostError(ESTALE) if the file it was opened on is no longer at its path."""
        if self.stale:
            raise HostError(errno.ESTALE, f"{self.path}: replaced while the host was "
                                          f"unreachable; open it again")


@dataclass(frozen=True)
class ReadResult:
    data: bytes
    hit: bool


def _read_result(data: bytes, hit: bool) -> ReadResult:
    """ReadResult(data, hit), built without the frozen dataclass's generated __init__
    (which sets each field through object.__setattr__): the same instance, in half
    the time, on the cache-hit path.  Valid while ReadResult is a plain dataclass
    with exactly these fields (checked below)."""
    result = _new(ReadResult)
    fields = result.__dict__
    fields["data"] = data
    fields["hit"] = hit
    return result


_new = object.__new__
assert [f.name for f in dataclasses.fields(ReadResult)] == ["data", "hit"]
assert not hasattr(ReadResult, "__post_init__") and "__slots__" not in ReadResult.__dict__


@dataclass(frozen=True)
class WriteResult:
    size: int
    first_dirty: bool  # this write started a recall: it waited for other guests' ACKs


class _Session:
    """One connection to the host: its protocol state and what is outstanding on it."""

    def __init__(self, client: "GuestClient"):
        self.client = client
        self.conn = Connection(Role.GUEST)
        self.transport: asyncio.Transport | None = None
        self.pending: dict[int, tuple[asyncio.Future, float]] = {}
        loop = asyncio.get_running_loop()
        self.hello_future: asyncio.Future = loop.create_future()
        self.auth_future: asyncio.Future | None = None  # only while an AUTH is unanswered
        self.closed: asyncio.Future = loop.create_future()
        self.lost = False

    def send(self, message) -> None:
        if self.lost or self.transport is None or self.transport.is_closing():
            raise SessionLost("the connection to the host is closed")
        self.transport.write(self.conn.send(message))

    def fail_all(self, exc: Exception) -> None:
        for future, _ in self.pending.values():
            if not future.done():
                future.set_exception(exc)
        self.pending.clear()
        for future in (self.hello_future, self.auth_future):
            if future is not None and not future.done():
                future.set_exception(exc)


class _ClientProtocol(asyncio.Protocol):
    def __init__(self, session: _Session):
        self.session = session

    def connection_made(self, transport):
        self.session.transport = transport

    def data_received(self, data):
        self.session.client._feed(self.session, data)

    def eof_received(self):
        self.session.client._feed(self.session, b"")
        return False

    def connection_lost(self, exc):
        self.session.client._lost(self.session, exc)


# Operations a client may repeat after reconnecting: repeating them has the same effect.
_RETRY_ATTEMPTS = 5


class GuestClient:
    """A guest.  Create with `await GuestClient.connect(address)`.

    With `reconnect=True` (the default) a lost connection is re-established
    with exponential backoff: every cache is dropped (the leases died with the
    session), the files that were open are re-opened, and the API calls that
    are safe to repeat (lookups, reads, positional writes, fsync, stat) are
    retried.  Namespace changes are not: they raise SessionLost, since they
    may or may not have happened.
    """

    # Feature bits offered beyond the plain ones (a mount: FEATURE_CACHES_UNLEASED).
    extra_features = 0

    def __init__(self, address: str, *, name: str, cache_bytes: int, request_timeout: float,
                 heartbeat: bool, reconnect: bool, reconnect_for: float,
                 token: bytes | None = None, clock=time.monotonic, dial=None,
                 client_id: bytes | None = None):
        self.address = address
        # The guest's monotonic clock (seconds), for its term and deadlines; its
        # timers are the running loop's.  `dial(protocol_factory)` opens the
        # connection (by default to `address`); both are the simulator's seams.
        self.clock = clock
        self._dial = dial or self._dial_address
        self.name = name
        self.token = token
        self.cache_bytes = cache_bytes
        self.request_timeout = request_timeout
        self.heartbeat = heartbeat
        self.reconnect = reconnect
        self.reconnect_for = reconnect_for
        self.cache: GuestCache | None = None
        self.hello: HelloReply | None = None
        self.session: _Session | None = None
        self.sessions = 0  # how many sessions this client has had
        self.boot_ids: list[bytes] = []
        self._next_unique = 1
        # Who we are to the host across reconnections (HELLO): it answers a
        # retried WRITE or truncate from its reply cache instead of repeating it.
        self.client_id = client_id or os.urandom(wire.CLIENT_ID_SIZE)
        self._host_ino: dict[int, tuple[int, int]] = {}  # nodeid -> (ino, generation), this session
        self._next_heartbeat = 1
        self._heartbeat_task: asyncio.Task | None = None
        self._reconnect_task: asyncio.Task | None = None
        self._connected = asyncio.Event()
        self._closing = False
        self._gone: Exception | None = None
        self._files: dict[FileHandle, None] = {}  # open files (an ordered set)
        # Optional callback(message), run before the ACK; if it returns an
        # awaitable, the ACK waits for it, and is not sent at all if the
        # awaitable fails or is cancelled (the copy may still be there).
        self.on_invalidate = None
        self.acks_sent = 0

    # --- connecting ------------------------------------------------------------

    @classmethod
    async def connect(cls, address: str, *, name: str = "guest", cache_bytes: int = 64 << 20,
                      request_timeout: float = 30.0, heartbeat: bool = True,
                      reconnect: bool = True, reconnect_for: float = 30.0,
                      token: bytes | None = None, clock=time.monotonic, dial=None,
                      client_id: bytes | None = None) -> "GuestClient":
        """Connect to `unix:PATH` or `tcp:HOST:PORT` and say HELLO.

        With a `token`, the host must prove it knows the same token, and we
        prove it to the host (protocol/auth.py); without one, a host that
        asks for a token is refused.  `clock`, `dial` and `client_id` are
        for the deterministic simulator (workload/dst/): see __init__.

        Raises ValueError for a malformed address, AuthenticationFailed if the
        token exchange fails, ConnectionError if the host refuses otherwise
        (the message says why), OSError if nothing listens there.
        """
        parse_address(address)  # refuse a malformed address before anything else
        self = cls(address, name=name, cache_bytes=cache_bytes, request_timeout=request_timeout,
                   heartbeat=heartbeat, reconnect=reconnect, reconnect_for=reconnect_for,
                   token=token, clock=clock, dial=dial, client_id=client_id)
        await self._open_session()
        self._connected.set()
        return self

    async def _open_session(self) -> None:
        session = _Session(self)
        await self._dial(lambda: _ClientProtocol(session))
        offer = (wire.SUPPORTED_FEATURES | self.extra_features
                 | (wire.FEATURE_AUTH if self.token is not None else 0))
        session.send(Hello(wire.PROTOCOL_VERSION, offer, wire.DEFAULT_MAX_FRAME, self.name,
                           self.client_id))
        try:
            reply: HelloReply = await asyncio.wait_for(session.hello_future, self.request_timeout)
            if reply.error:
                raise ConnectionError(f"host refused HELLO: {os.strerror(-reply.error)}")
            await self._authenticate(session, reply)
        except BaseException:
            session.transport.abort()
            raise
        # Current only once HELLO succeeded: a session lost before that is the
        # reconnect loop's business, not a reason to start another one.
        self.session = session
        self.hello = reply
        self.sessions += 1
        self.boot_ids.append(reply.boot_id)
        if self.cache is None:
            self.cache = GuestCache(reply.policy, self.cache_bytes, ttl_s=reply.ttl_ms / 1000.0,
                                    lease_term_s=reply.lease_term_ms / 1000.0, clock=self.clock)
        else:
            # A new session holds no leases, whatever the boot id says.
            self.cache.clear()
            if self.boot_ids[-2:-1] != [reply.boot_id]:
                self.cache.new_host()
        self.cache.granularity = reply.granularity
        self._host_ino.clear()  # node ids belong to a session
        if self.heartbeat and self.cache.uses_leases:
            self._heartbeat_task = asyncio.ensure_future(self._heartbeats(session))

    async def _dial_address(self, protocol_factory) -> None:
        loop = asyncio.get_running_loop()
        where = parse_address(self.address)
        if where.kind == "unix":
            await loop.create_unix_connection(protocol_factory, where.path)
        else:
            await loop.create_connection(protocol_factory, where.host, where.port)

    async def _authenticate(self, session: _Session, reply: HelloReply) -> None:
        """Run the AUTH exchange if the host asked for one; both sides must have a token.

        Raises AuthenticationFailed saying which side lacks what."""
        asked = bool(reply.features & wire.FEATURE_AUTH)
        if (refusal := auth.guest_refusal(asked, self.token, self.address)) is not None:
            raise AuthenticationFailed(refusal)
        if not asked:
            return
        guest_nonce = auth.new_nonce()
        session.auth_future = asyncio.get_running_loop().create_future()
        session.send(Auth(guest_nonce, auth.guest_proof(self.token, reply.nonce, guest_nonce)))
        answer: AuthReply = await asyncio.wait_for(session.auth_future, self.request_timeout)
        if answer.error == -errno.EACCES:
            raise AuthenticationFailed(
                f"the host at {self.address} refused our token: it has another")
        if answer.error:
            raise ConnectionError(f"host refused the session: {os.strerror(-answer.error)}")
        if not auth.proof_matches(auth.host_proof(self.token, guest_nonce, reply.nonce),
                                  answer.proof):
            raise AuthenticationFailed(
                f"the host at {self.address} could not prove it knows the token: it is not "
                f"the host we were given the token for")

    @property
    def policy(self) -> Policy:
        return self.hello.policy

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def cut_connection(self) -> None:
        """Drop the connection as a failing network would (fault injection): the
        client notices, like any lost session, and reconnects."""
        if self.session is not None and self.session.transport is not None:
            self.session.transport.abort()

    async def close(self) -> None:
        """Close the connection for good (no reconnection)."""
        self._closing = True
        for task in (self._heartbeat_task, self._reconnect_task):
            if task is not None:
                task.cancel()
        session = self.session
        if session is not None and session.transport is not None:
            session.transport.close()
            await asyncio.shield(session.closed)

    async def _heartbeats(self, session: _Session) -> None:
        """Renew the lease term while idle, so that leases outlive quiet periods."""
        interval = self.hello.lease_term_ms / 3000.0
        while not session.lost:
            await asyncio.sleep(interval)
            seq = self._next_heartbeat
            self._next_heartbeat += 1
            future = asyncio.get_running_loop().create_future()
            session.pending[-seq] = (future, self.clock())
            try:
                session.send(Heartbeat(seq))
                await asyncio.wait_for(future, self.request_timeout)
            except (asyncio.TimeoutError, SessionLost, ProtocolError):
                return
            finally:
                session.pending.pop(-seq, None)

    # --- losing and regaining the host ---------------------------------------------

    def _lost(self, session: _Session, exc) -> None:
        session.lost = True
        session.fail_all(SessionLost(f"connection to the host lost: {exc or 'closed'}"))
        if not session.closed.done():
            session.closed.set_result(None)
        if session is not self.session:
            return
        self._connected.clear()
        if self.cache is not None:
            self.cache.clear()
        if self.reconnect and not self._closing:
            if self._reconnect_task is None or self._reconnect_task.done():
                self._reconnect_task = asyncio.ensure_future(self._reconnect())
        else:
            self._gone = SessionLost("the connection to the host is closed")

    async def _reconnect(self) -> None:
        """Try again with exponential backoff for `reconnect_for` seconds, then give up."""
        deadline = self.clock() + self.reconnect_for
        delay = 0.02
        while not self._closing:
            try:
                await self._open_session()
                await self._reopen_files()
                self._connected.set()  # only now: retried calls need the re-opened handles
                return
            except AuthenticationFailed as exc:
                self._gone = exc  # the same token will fail the same way
                self._connected.set()
                return
            except (OSError, ConnectionError, asyncio.TimeoutError, ProtocolError):
                if self.clock() + delay > deadline:
                    self._gone = SessionLost(
                        f"the host at {self.address} is gone: no reconnection in "
                        f"{self.reconnect_for:.0f}s")
                    self._connected.set()  # wake the waiters, so that they see _gone
                    return
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)

    async def _reopen_files(self) -> None:
        """Re-open, by path, what was open.  A file that is gone, or that is now
        another inode (replaced meanwhile), makes its handle stale: the caller
        learns it on its next use (ESTALE), rather than reading or writing a
        file it never opened."""
        for handle in list(self._files):
            flags = handle.flags & ~(os.O_TRUNC | os.O_CREAT | os.O_EXCL)
            try:
                nodeid = await self.resolve(handle.path)
                if self._host_ino.get(nodeid) != handle.inode:
                    raise HostError(errno.ESTALE, "another file")
                reply = await self.request(nodeid, Open(flags))
            except HostError:
                handle.stale = True
                continue
            handle.nodeid, handle.fh = nodeid, reply.body.fh

    async def _wait_connected(self) -> None:
        if not self._connected.is_set():
            await asyncio.wait_for(self._connected.wait(), self.reconnect_for + self.request_timeout)
        if self._gone is not None:
            raise self._gone

    async def _retrying(self, call, *, idempotent: bool = True):
        """Run `call()`; after a lost session, wait for the new one and run it again.

        A call that is not `idempotent` must send its request with the same
        `unique` every time (`new_unique`): the host then carries it out at
        most once.  That holds only while the host is the same boot: after a
        restart such a call raises OutcomeUnknown instead of repeating."""
        boot_id = None
        for attempt in range(_RETRY_ATTEMPTS):
            if not self._connected.is_set() or self._gone is not None:
                await self._wait_connected()  # (connected and not gone: nothing to wait for)
            session = self.session
            if not idempotent:
                if boot_id is None:
                    boot_id = self.hello.boot_id
                elif self.hello.boot_id != boot_id:
                    raise OutcomeUnknown("the host restarted while this request was under way: "
                                         "it may or may not have been carried out")
            try:
                return await call()
            except SessionLost:
                if not self.reconnect or attempt == _RETRY_ATTEMPTS - 1:
                    raise
            except HostError as exc:
                if exc.errno != errno.EKEYEXPIRED or not self.reconnect:
                    raise
            # The session that failed must be gone before we wait for the next one.
            await asyncio.wait_for(asyncio.shield(session.closed), self.request_timeout)
        raise SessionLost(f"fenced by the host {_RETRY_ATTEMPTS} times in a row: giving up")

    # --- bytes in ---------------------------------------------------------------

    def _feed(self, session: _Session, data: bytes) -> None:
        try:
            session.conn.receive_data(data)
            while True:
                event = session.conn.next_event()
                if event is NEED_DATA:
                    return
                if isinstance(event, ConnectionClosed):
                    session.transport.close()
                    return
                self._handle(session, event)
        except ProtocolError as exc:
            session.fail_all(SessionLost(f"protocol error from host: {exc}"))
            session.transport.abort()

    def _handle(self, session: _Session, event) -> None:
        match event:
            case FsReply():
                future, sent_at = session.pending.pop(event.unique, (None, 0.0))
                if future is not None:
                    # Not from a fenced session (EKEYEXPIRED), nor from one the
                    # host withheld renewal from (an invalidation was unACKed).
                    if event.lease.renews and event.error != -errno.EKEYEXPIRED:
                        self.cache.renewed(sent_at)
                    if not future.done():
                        future.set_result(event)
            case Invalidate():
                self.cache.stats.invalidations += 1
                self.cache.invalidate_inode(event.ino, event.generation, event.offset,
                                            event.length)
                self._ack_after_callback(session, event)
            case InvalEntry():
                self.cache.stats.inval_entries += 1
                self.cache.invalidate_entry(event.parent, event.name, event.generation)
                self._ack_after_callback(session, event)
            case HeartbeatReply():
                future, sent_at = session.pending.pop(-event.seq, (None, 0.0))
                if future is not None:
                    if event.error == 0:
                        self.cache.renewed(sent_at)
                    elif event.error == -errno.EKEYEXPIRED:
                        self._fenced(session)
                    if not future.done():
                        future.set_result(event)
            case HelloReply():
                if not session.hello_future.done():
                    session.hello_future.set_result(event)
            case AuthReply():
                if session.auth_future is not None and not session.auth_future.done():
                    session.auth_future.set_result(event)

    def _ack_after_callback(self, session: _Session, event) -> None:
        """ACK once our copy is gone: at once, or when the awaitable that
        `on_invalidate` returned completes (a mount waits for the kernel).
        No ACK if it fails or is cancelled: an ACK means the copy is gone."""
        pending = self.on_invalidate(event) if self.on_invalidate else None
        if pending is None:
            self._ack(session, event.seq)
        else:
            asyncio.ensure_future(pending).add_done_callback(
                lambda done: None if done.cancelled() or done.exception() is not None
                else self._ack(session, event.seq))

    def _ack(self, session: _Session, seq: int) -> None:
        try:
            session.send(Ack(seq))
            self.acks_sent += 1
        except SessionLost:
            pass  # that session is gone: its host no longer waits for this ACK

    # --- one request ---------------------------------------------------------------

    def new_unique(self) -> int:
        """A request id never used before by this client (ids are not reused
        across sessions, so a retry can name its first attempt)."""
        unique = self._next_unique
        self._next_unique += 1
        return unique

    async def request(self, nodeid: int, op, unique: int | None = None,
                      caller: tuple[int, int, int, tuple[int, ...]] | None = None,
                      wait_forever: bool = False) -> FsReply:
        """Send one FS request on the current session and wait for its reply.

        `caller` is (uid, gid, pid, supplementary groups) of whoever the request
        is for (a mount's kernel says); the host carries it out as them.  None:
        as root, pid 0 (a library guest).  `wait_forever`: no `request_timeout`
        (a lock request that waits for another owner's lock).

        `unique` names the request; pass the same one to retry a request
        after a reconnect (the host answers it from its reply cache if it
        carried it out already).  Raises HostError for an errno reply,
        SessionLost if the connection goes (no retry at this level: node ids
        and handles belong to the session), TimeoutError after
        `request_timeout`.  A fenced guest (EKEYEXPIRED) drops every cache
        and starts a new session.
        """
        session = self.session
        if session is None or session.lost:
            raise SessionLost("not connected to the host")
        if unique is None:
            unique = self.new_unique()
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        session.pending[unique] = (future, self.clock())
        timeout = None if wait_forever else self.request_timeout
        timer = None
        try:
            try:
                session.send(FsRequest(unique, nodeid, op) if caller is None
                             else FsRequest(unique, nodeid, op, *caller))
            except BaseException:
                # Not sent: nothing will answer it, and it must not be left for
                # `fail_all` to fail with nobody to see it.
                session.pending.pop(unique, None)
                raise
            if timeout is None or timeout <= 0:
                reply: FsReply = await asyncio.wait_for(future, timeout)
            else:
                # What wait_for does, with one timer and no second future per request.
                timer = loop.call_later(timeout, _time_out, future)
                reply = await future
        except asyncio.TimeoutError:
            session.pending.pop(unique, None)
            session.conn.forget_request(unique)
            raise TimeoutError(f"{op.opcode.name} got no reply within {self.request_timeout}s") from None
        finally:
            if timer is not None:
                timer.cancel()
        if reply.error:
            if -reply.error == errno.EKEYEXPIRED:
                self._fenced(session)
            elif reply.lease.ino:
                # A modification that failed after its recall: the generation
                # moved on all the same, so grants of an older one are stale.
                self.cache.invalidate_inode(reply.lease.ino, reply.lease.generation)
            raise HostError(-reply.error, f"{op.opcode.name}: {os.strerror(-reply.error)}")
        return reply

    def _fenced(self, session: _Session) -> None:
        """The host fenced `session`: every lease we had is void.  Say HELLO again."""
        if session is self.session:
            self.cache.clear()
        if session.transport is not None:
            session.transport.close()

    def interrupt(self, nodeid: int, unique: int) -> None:
        """Tell the host that the caller of our request `unique` (about `nodeid`)
        gave up on it: a waiting SETLKW then answers EINTR.  No reply."""
        session = self.session
        if session is None or session.lost:
            return  # the request went with its session
        session.send(FsRequest(self.new_unique(), nodeid, Interrupt(unique)))

    def forget(self, nodeid: int, nlookup: int) -> None:
        """Tell the host we dropped `nlookup` references to `nodeid` (FORGET has no reply)."""
        session = self.session
        if session is None or session.lost:
            return  # the host dropped every node id of that session anyway
        unique = self.new_unique()
        session.send(FsRequest(unique, nodeid, Forget(nlookup)))

    # --- names ----------------------------------------------------------------------

    async def _lookup(self, parent: int, name: bytes) -> int:
        cached = self.cache.lookup_entry(parent, name)
        if cached is not None:
            self.cache.stats.entry_hits += 1
            return cached
        epoch = self.cache.entry_epoch(parent)
        reply = await self.request(parent, Lookup(name))
        entry = reply.body
        self._host_ino[entry.nodeid] = (entry.attr.ino, entry.generation)
        if self.cache.accept_grant(reply.lease):
            self.cache.store_attr(entry.nodeid, entry.attr)
        # entry_valid 0: the host is changing a name in `parent` right now.
        if (entry.entry_valid or entry.entry_valid_nsec) and self._entry_cacheable(parent):
            self.cache.store_entry(parent, name, entry.nodeid, epoch)
        return entry.nodeid

    def _entry_cacheable(self, parent: int) -> bool:
        if self.cache.uses_leases:
            return self.cache.may_serve_data(parent)  # entries live under the directory's lease
        return self.cache.policy is not Policy.NEVER

    async def resolve(self, path: str) -> int:
        """The nodeid of `path` (relative to the export root)."""
        nodeid = ROOT
        for part in _components(path):
            nodeid = await self._lookup(nodeid, part)
        return nodeid

    async def _parent_and_name(self, path: str) -> tuple[int, bytes]:
        parts = _components(path)
        if not parts:
            raise HostError(errno.EINVAL, "the export root has no parent")
        parent = ROOT
        for part in parts[:-1]:
            parent = await self._lookup(parent, part)
        return parent, parts[-1]

    async def lease_root(self) -> None:
        """Ask for the root directory's attributes (and lease, so entries can be cached)."""
        await self._retrying(lambda: self._getattr(ROOT))

    # --- the file API ------------------------------------------------------------------

    async def stat(self, path: str) -> Attr:
        async def call():
            nodeid = await self.resolve(path)
            if self.cache.may_serve_attr(nodeid):
                self.cache.stats.attr_hits += 1
                return self.cache.cached_attr(nodeid)
            return await self._getattr(nodeid)
        return await self._retrying(call)

    async def _getattr(self, nodeid: int) -> Attr:
        reply = await self.request(nodeid, Getattr())
        if self.cache.accept_grant(reply.lease):
            self.cache.store_attr(nodeid, reply.body.attr)
        return reply.body.attr

    async def open(self, path: str, flags: int = os.O_RDONLY) -> FileHandle:
        """Open `path`.  Retried after a lost session, except with O_TRUNC (a
        modification, which may or may not have happened): SessionLost then."""
        if flags & os.O_TRUNC:
            await self._wait_connected()
            handle = await self._open(path, flags)
        else:
            handle = await self._retrying(lambda: self._open(path, flags))
        self._files[handle] = None
        return handle

    async def _open(self, path: str, flags: int) -> FileHandle:
        nodeid = await self.resolve(path)
        writing = (flags & os.O_ACCMODE) != os.O_RDONLY or flags & os.O_TRUNC
        if writing:
            with self.cache.own_modification(nodeid):
                self.cache.forget_own_copy(nodeid)
                reply = await self.request(nodeid, Open(flags))
                self._take_reply_lease(nodeid, reply, modifies=True)
        else:
            if self.cache.policy is Policy.TTL:
                attr = self.cache.cached_attr(nodeid) if self.cache.may_serve_attr(nodeid) else None
                self.cache.revalidate_at_open(nodeid, attr or await self._getattr(nodeid))
            reply = await self.request(nodeid, Open(flags))
            self._take_reply_lease(nodeid, reply, modifies=False)
        return FileHandle(path, nodeid, reply.body.fh, flags, self._host_ino.get(nodeid, (0, 0)))

    async def create(self, path: str, flags: int = os.O_RDWR, mode: int = 0o644) -> FileHandle:
        """Create (or open) `path`.  Not retried after a lost session: it raises SessionLost."""
        await self._wait_connected()
        parent, name = await self._parent_and_name(path)
        self.cache.invalidate_entry(parent, name)  # lookups on their way must not cache it
        reply = await self.request(parent, Create(name, flags | os.O_CREAT, mode))
        entry, opened = reply.body.entry, reply.body.open
        self.cache.invalidate_entry(parent, name)
        self.cache.forget_own_copy(entry.nodeid)
        self._take_reply_lease(entry.nodeid, reply, modifies=True)
        inode = self._host_ino[entry.nodeid] = (entry.attr.ino, entry.generation)
        handle = FileHandle(path, entry.nodeid, opened.fh, flags, inode)
        self._files[handle] = None
        return handle

    def _take_reply_lease(self, nodeid: int, reply: FsReply, *, modifies: bool,
                          span: tuple[int, int] = (0, 0)) -> None:
        if modifies:
            # The reply to our own modification carries the new generation: any
            # grant for an older one (of `span`, what it changed), still on its
            # way to us, must be dropped.
            if reply.lease.ino:
                self.cache.own_modification_done(reply.lease.ino, reply.lease.generation, span)
            else:
                self.cache.forget_own_copy(nodeid)
        else:
            self.cache.accept_grant(reply.lease)

    async def read(self, handle: FileHandle, offset: int, size: int) -> ReadResult:
        """Read [offset, offset+size): from the cache when the policy allows, else from the host."""
        if handle.stale:
            handle.check()
        cache = self.cache
        stats = cache.stats
        stats.reads += 1
        if self._connected.is_set() and cache.may_serve_data(handle.nodeid):
            data = cache.read_pages(handle.nodeid, offset, size)
            if data is not None:
                stats.hits += 1
                return _read_result(data, True)
        stats.misses += 1
        first = offset - offset % PAGE_SIZE
        end = offset + size
        aligned = ((end + PAGE_SIZE - 1) // PAGE_SIZE) * PAGE_SIZE - first

        async def call():
            handle.check()
            reply = await self.request(handle.nodeid, Read(handle.fh, first, aligned))
            data = reply.body.data
            cache.stats.bytes_fetched += len(data)
            if cache.accept_grant(reply.lease, (first // PAGE_SIZE,
                                                (first + aligned) // PAGE_SIZE)):
                cache.store_pages(handle.nodeid, first, data, aligned)
            return data
        data = await self._retrying(call)
        start = offset - first
        return ReadResult(data[start: start + size], False)

    async def write(self, handle: FileHandle, offset: int, data: bytes) -> WriteResult:
        """Write at `offset`.  Retried after a lost session, carried out at most
        once (the host's reply cache); raises OutcomeUnknown if the host
        restarted meanwhile, ESTALE if the file was replaced."""
        unique = self.new_unique()

        async def call():
            handle.check()
            with self.cache.own_modification(handle.nodeid):
                span = self.cache.own_write_span(handle.nodeid, offset, len(data))
                self.cache.forget_own_copy(handle.nodeid, span)
                reply = await self.request(handle.nodeid, Write(handle.fh, offset, data), unique)
                self._take_reply_lease(handle.nodeid, reply, modifies=True, span=span)
            return WriteResult(reply.body.size, reply.lease.first_dirty)
        return await self._retrying(call, idempotent=False)

    async def truncate(self, handle: FileHandle, size: int) -> None:
        """Set the file's size; retried as `write` is."""
        unique = self.new_unique()

        async def call():
            handle.check()
            with self.cache.own_modification(handle.nodeid):
                self.cache.forget_own_copy(handle.nodeid)
                reply = await self.request(handle.nodeid, Setattr(FATTR_SIZE, size=size), unique)
                self._take_reply_lease(handle.nodeid, reply, modifies=True)
        await self._retrying(call, idempotent=False)

    async def fsync(self, handle: FileHandle, datasync: bool = False) -> None:
        async def call():
            handle.check()
            await self.request(handle.nodeid, Fsync(handle.fh, 1 if datasync else 0))
        await self._retrying(call)

    async def close_file(self, handle: FileHandle) -> None:
        self._files.pop(handle, None)
        if handle.closed:
            return
        handle.closed = True
        if handle.stale:
            return  # its ids belong to a session that is gone: nothing to release
        try:
            await self.request(handle.nodeid, Release(handle.fh, handle.flags))
        except SessionLost:
            pass  # the session is gone, and the host released its handles with it
        except HostError as exc:
            if exc.errno != errno.EKEYEXPIRED:
                raise

    async def listdir(self, path: str = "") -> list[str]:
        async def call():
            nodeid = await self.resolve(path)
            names, offset = [], 0
            while True:
                reply = await self.request(nodeid, Readdir(0, offset))
                entries = reply.body.entries
                if not entries:
                    break
                names.extend(os.fsdecode(e.name) for e in entries)
                offset = entries[-1].off
            self.cache.accept_grant(reply.lease)
            return names
        return await self._retrying(call)

    async def mkdir(self, path: str, mode: int = 0o755) -> None:
        await self._wait_connected()
        parent, name = await self._parent_and_name(path)
        self.cache.invalidate_entry(parent, name)
        await self.request(parent, Mkdir(name, mode))

    async def unlink(self, path: str) -> None:
        await self._wait_connected()
        parent, name = await self._parent_and_name(path)
        self.cache.invalidate_entry(parent, name)
        await self.request(parent, Unlink(name))

    async def rename(self, old: str, new: str) -> None:
        await self._wait_connected()
        old_parent, old_name = await self._parent_and_name(old)
        new_parent, new_name = await self._parent_and_name(new)
        self.cache.invalidate_entry(old_parent, old_name)
        self.cache.invalidate_entry(new_parent, new_name)
        await self.request(old_parent, Rename(new_parent, old_name, new_name))


def _time_out(future: asyncio.Future) -> None:
    """The request timer of GuestClient.request ran out: fail the wait as wait_for would."""
    if not future.done():
        future.set_exception(asyncio.TimeoutError())


def _components(path: str) -> list[bytes]:
    """Split a path relative to the export; '.' and empty parts are dropped.

    '..' is passed through: the host refuses it (the guest does not get to
    decide what is inside the export)."""
    return [os.fsencode(p) for p in path.split("/") if p not in ("", ".")]
