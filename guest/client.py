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
import errno
import os
import time
from dataclasses import dataclass

from guest.cache import PAGE_SIZE, GuestCache
from protocol import wire
from protocol.connection import NEED_DATA, Connection, Role
from protocol.errors import ProtocolError
from protocol.fuse import FATTR_SIZE, Opcode
from protocol.messages import (
    Ack,
    Attr,
    ConnectionClosed,
    Create,
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


@dataclass(frozen=True)
class FileHandle:
    path: str
    nodeid: int
    fh: int
    flags: int


@dataclass(frozen=True)
class ReadResult:
    data: bytes
    hit: bool


@dataclass(frozen=True)
class WriteResult:
    size: int
    first_dirty: bool  # this write started a recall: it waited for other guests' ACKs


class _ClientProtocol(asyncio.Protocol):
    def __init__(self, client: "GuestClient"):
        self.client = client

    def connection_made(self, transport):
        self.client._transport = transport

    def data_received(self, data):
        self.client._feed(data)

    def eof_received(self):
        self.client._feed(b"")
        return False

    def connection_lost(self, exc):
        self.client._lost(exc)


class GuestClient:
    """A connected guest.  Create with `await GuestClient.connect(address)`."""

    def __init__(self, *, name: str, cache_bytes: int, request_timeout: float):
        self.name = name
        self.cache_bytes = cache_bytes
        self.request_timeout = request_timeout
        self.conn = Connection(Role.GUEST)
        self.cache: GuestCache | None = None
        self.hello: HelloReply | None = None
        self._transport: asyncio.Transport | None = None
        self._pending: dict[int, tuple[asyncio.Future, float]] = {}
        self._next_unique = 1
        self._next_heartbeat = 1
        self._hello_future: asyncio.Future | None = None
        self._closed: asyncio.Future | None = None
        self._heartbeat_task: asyncio.Task | None = None
        self.on_invalidate = None  # optional callback(message), for tests and logs
        self.acks_sent = 0

    # --- connecting ------------------------------------------------------------

    @classmethod
    async def connect(cls, address: str, *, name: str = "guest", cache_bytes: int = 64 << 20,
                      request_timeout: float = 30.0, heartbeat: bool = True) -> "GuestClient":
        """Connect to `unix:PATH` or `tcp:HOST:PORT` and say HELLO.

        Raises ConnectionError if the host refuses (the message says why) or
        OSError if nothing listens there.
        """
        self = cls(name=name, cache_bytes=cache_bytes, request_timeout=request_timeout)
        loop = asyncio.get_running_loop()
        self._closed = loop.create_future()
        kind, _, rest = address.partition(":")
        if kind == "unix":
            await loop.create_unix_connection(lambda: _ClientProtocol(self), rest)
        elif kind == "tcp":
            host, _, port = rest.rpartition(":")
            await loop.create_connection(lambda: _ClientProtocol(self), host, int(port))
        else:
            raise ValueError(f"address {address!r}: use unix:PATH or tcp:HOST:PORT")
        self._hello_future = loop.create_future()
        self._send(Hello(wire.PROTOCOL_VERSION, wire.SUPPORTED_FEATURES, wire.DEFAULT_MAX_FRAME, name))
        reply: HelloReply = await asyncio.wait_for(self._hello_future, request_timeout)
        if reply.error:
            raise ConnectionError(f"host refused HELLO: {os.strerror(-reply.error)}")
        self.hello = reply
        self.cache = GuestCache(reply.policy, cache_bytes, ttl_s=reply.ttl_ms / 1000.0,
                                lease_term_s=reply.lease_term_ms / 1000.0)
        if heartbeat and self.cache.uses_leases:
            self._heartbeat_task = asyncio.ensure_future(self._heartbeats())
        return self

    @property
    def policy(self) -> Policy:
        return self.hello.policy

    async def close(self) -> None:
        if self._heartbeat_task is not None:
            self._heartbeat_task.cancel()
        if self._transport is not None:
            self._transport.close()
        if self._closed is not None:
            await asyncio.shield(self._closed)

    async def _heartbeats(self) -> None:
        """Renew the lease term while idle, so that leases outlive quiet periods."""
        interval = self.hello.lease_term_ms / 3000.0
        while True:
            await asyncio.sleep(interval)
            seq = self._next_heartbeat
            self._next_heartbeat += 1
            future = asyncio.get_running_loop().create_future()
            self._pending[-seq] = (future, time.monotonic())
            try:
                self._send(Heartbeat(seq))
                await asyncio.wait_for(future, self.request_timeout)
            except (asyncio.TimeoutError, SessionLost, ProtocolError):
                return
            finally:
                self._pending.pop(-seq, None)

    # --- bytes in ---------------------------------------------------------------

    def _send(self, message) -> None:
        if self._transport is None or self._transport.is_closing():
            raise SessionLost("the connection to the host is closed")
        self._transport.write(self.conn.send(message))

    def _feed(self, data: bytes) -> None:
        try:
            self.conn.receive_data(data)
            while True:
                event = self.conn.next_event()
                if event is NEED_DATA:
                    return
                if isinstance(event, ConnectionClosed):
                    self._transport.close()
                    return
                self._handle(event)
        except ProtocolError as exc:
            self._fail_all(SessionLost(f"protocol error from host: {exc}"))
            self._transport.abort()

    def _handle(self, event) -> None:
        match event:
            case FsReply():
                future, sent_at = self._pending.pop(event.unique, (None, 0.0))
                if self.cache is not None:
                    self.cache.renewed(sent_at)
                if future is not None and not future.done():
                    future.set_result(event)
            case Invalidate():
                self.cache.stats.invalidations += 1
                self.cache.invalidate_inode(event.ino, event.generation)
                if self.on_invalidate:
                    self.on_invalidate(event)
                self._send(Ack(event.seq))
                self.acks_sent += 1
            case InvalEntry():
                self.cache.stats.inval_entries += 1
                self.cache.invalidate_entry(event.parent, event.name)
                if self.on_invalidate:
                    self.on_invalidate(event)
                self._send(Ack(event.seq))
                self.acks_sent += 1
            case HeartbeatReply():
                future, sent_at = self._pending.pop(-event.seq, (None, 0.0))
                self.cache.renewed(sent_at)
                if future is not None and not future.done():
                    future.set_result(event)
            case HelloReply():
                if not self._hello_future.done():
                    self._hello_future.set_result(event)

    def _lost(self, exc) -> None:
        self._fail_all(SessionLost(f"connection to the host lost: {exc or 'closed'}"))
        if self.cache is not None:
            self.cache.clear()
        if self._closed is not None and not self._closed.done():
            self._closed.set_result(None)

    def _fail_all(self, exc: Exception) -> None:
        for future, _ in self._pending.values():
            if not future.done():
                future.set_exception(exc)
        self._pending.clear()
        if self._hello_future is not None and not self._hello_future.done():
            self._hello_future.set_exception(exc)

    # --- one request ---------------------------------------------------------------

    async def request(self, nodeid: int, op) -> FsReply:
        """Send one FS request and wait for its reply.

        Raises HostError for an errno reply, SessionLost if the connection
        goes, TimeoutError after `request_timeout`.
        """
        unique = self._next_unique
        self._next_unique += 1
        future = asyncio.get_running_loop().create_future()
        self._pending[unique] = (future, time.monotonic())
        try:
            self._send(FsRequest(unique, nodeid, op))
            reply: FsReply = await asyncio.wait_for(future, self.request_timeout)
        except asyncio.TimeoutError:
            self._pending.pop(unique, None)
            self.conn.forget_request(unique)
            raise TimeoutError(f"{op.opcode.name} got no reply within {self.request_timeout}s") from None
        if reply.error:
            if -reply.error == errno.EKEYEXPIRED:
                self.cache.clear()  # fenced: everything we hold is void
            raise HostError(-reply.error, f"{op.opcode.name}: {os.strerror(-reply.error)}")
        return reply

    # --- names ----------------------------------------------------------------------

    async def _lookup(self, parent: int, name: bytes) -> int:
        cached = self.cache.lookup_entry(parent, name)
        if cached is not None:
            self.cache.stats.entry_hits += 1
            return cached
        reply = await self.request(parent, Lookup(name))
        entry = reply.body
        if self.cache.accept_grant(reply.lease):
            self.cache.store_attr(entry.nodeid, entry.attr)
        if self._entry_cacheable(parent):
            self.cache.store_entry(parent, name, entry.nodeid)
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
        reply = await self.request(ROOT, Getattr())
        if self.cache.accept_grant(reply.lease):
            self.cache.store_attr(ROOT, reply.body.attr)

    # --- the file API ------------------------------------------------------------------

    async def stat(self, path: str) -> Attr:
        nodeid = await self.resolve(path)
        if self.cache.may_serve_attr(nodeid):
            self.cache.stats.attr_hits += 1
            return self.cache.cached_attr(nodeid)
        return await self._getattr(nodeid)

    async def _getattr(self, nodeid: int) -> Attr:
        reply = await self.request(nodeid, Getattr())
        if self.cache.accept_grant(reply.lease):
            self.cache.store_attr(nodeid, reply.body.attr)
        return reply.body.attr

    async def open(self, path: str, flags: int = os.O_RDONLY) -> FileHandle:
        nodeid = await self.resolve(path)
        writing = (flags & os.O_ACCMODE) != os.O_RDONLY or flags & os.O_TRUNC
        if writing:
            self.cache.forget_own_copy(nodeid)
        elif self.cache.policy is Policy.TTL:
            attr = self.cache.cached_attr(nodeid) if self.cache.may_serve_attr(nodeid) else None
            self.cache.revalidate_at_open(nodeid, attr or await self._getattr(nodeid))
        reply = await self.request(nodeid, Open(flags))
        self._take_reply_lease(nodeid, reply, modifies=bool(writing))
        return FileHandle(path, nodeid, reply.body.fh, flags)

    async def create(self, path: str, flags: int = os.O_RDWR, mode: int = 0o644) -> FileHandle:
        parent, name = await self._parent_and_name(path)
        reply = await self.request(parent, Create(name, flags | os.O_CREAT, mode))
        entry, opened = reply.body.entry, reply.body.open
        self.cache.invalidate_entry(parent, name)
        self.cache.forget_own_copy(entry.nodeid)
        self._take_reply_lease(entry.nodeid, reply, modifies=True)
        return FileHandle(path, entry.nodeid, opened.fh, flags)

    def _take_reply_lease(self, nodeid: int, reply: FsReply, *, modifies: bool) -> None:
        if modifies:
            # The reply to our own modification carries the new generation: any
            # grant for an older one, still on its way to us, must be dropped.
            if reply.lease.ino:
                self.cache.invalidate_inode(reply.lease.ino, reply.lease.generation)
            else:
                self.cache.forget_own_copy(nodeid)
        else:
            self.cache.accept_grant(reply.lease)

    async def read(self, handle: FileHandle, offset: int, size: int) -> ReadResult:
        """Read [offset, offset+size): from the cache when the policy allows, else from the host."""
        cache = self.cache
        cache.stats.reads += 1
        nodeid = handle.nodeid
        if cache.may_serve_data(nodeid):
            data = cache.read_pages(nodeid, offset, size)
            if data is not None:
                cache.stats.hits += 1
                return ReadResult(data, True)
        cache.stats.misses += 1
        first = offset - offset % PAGE_SIZE
        end = offset + size
        aligned = ((end + PAGE_SIZE - 1) // PAGE_SIZE) * PAGE_SIZE - first
        reply = await self.request(nodeid, Read(handle.fh, first, aligned))
        data = reply.body.data
        cache.stats.bytes_fetched += len(data)
        if cache.accept_grant(reply.lease):
            cache.store_pages(nodeid, first, data, aligned)
        start = offset - first
        return ReadResult(data[start: start + size], False)

    async def write(self, handle: FileHandle, offset: int, data: bytes) -> WriteResult:
        self.cache.forget_own_copy(handle.nodeid)
        reply = await self.request(handle.nodeid, Write(handle.fh, offset, data))
        self._take_reply_lease(handle.nodeid, reply, modifies=True)
        return WriteResult(reply.body.size, reply.lease.first_dirty)

    async def truncate(self, handle: FileHandle, size: int) -> None:
        self.cache.forget_own_copy(handle.nodeid)
        reply = await self.request(handle.nodeid, Setattr(FATTR_SIZE, size=size))
        self._take_reply_lease(handle.nodeid, reply, modifies=True)

    async def fsync(self, handle: FileHandle, datasync: bool = False) -> None:
        await self.request(handle.nodeid, Fsync(handle.fh, 1 if datasync else 0))

    async def close_file(self, handle: FileHandle) -> None:
        await self.request(handle.nodeid, Release(handle.fh, handle.flags))

    async def listdir(self, path: str = "") -> list[str]:
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

    async def mkdir(self, path: str, mode: int = 0o755) -> None:
        parent, name = await self._parent_and_name(path)
        self.cache.invalidate_entry(parent, name)
        await self.request(parent, Mkdir(name, mode))

    async def unlink(self, path: str) -> None:
        parent, name = await self._parent_and_name(path)
        self.cache.invalidate_entry(parent, name)
        await self.request(parent, Unlink(name))

    async def rename(self, old: str, new: str) -> None:
        old_parent, old_name = await self._parent_and_name(old)
        new_parent, new_name = await self._parent_and_name(new)
        self.cache.invalidate_entry(old_parent, old_name)
        self.cache.invalidate_entry(new_parent, new_name)
        await self.request(old_parent, Rename(new_parent, old_name, new_name))


def _components(path: str) -> list[bytes]:
    """Split a path relative to the export; '.' and empty parts are dropped.

    '..' is passed through: the host refuses it (the guest does not get to
    decide what is inside the export)."""
    return [os.fsencode(p) for p in path.split("/") if p not in ("", ".")]
