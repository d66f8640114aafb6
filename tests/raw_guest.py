"""A guest the test drives frame by frame, for putting one event between two others.

It speaks the real protocol (the sans-I/O `Connection` and codec) over a real
socket to a real host process, but does nothing by itself: it ACKs an
invalidation only when told (`ack`), heartbeats only when told (`heartbeat`),
and can send a request without waiting for its reply (`send`, then `reply`).
Invalidations are queued as they arrive (`next_invalidation`).
"""

from __future__ import annotations

import asyncio
import os
import time

from protocol import wire
from protocol.address import parse_address
from protocol.connection import NEED_DATA, Connection, Role
from protocol.messages import (
    Ack,
    ConnectionClosed,
    FsReply,
    FsRequest,
    Getattr,
    Heartbeat,
    HeartbeatReply,
    Hello,
    HelloReply,
    InvalEntry,
    Invalidate,
    Lookup,
    Open,
    Purge,
    Purged,
    Read,
    Witness,
    WitnessReply,
)

ROOT = 1


async def until(predicate, what: str, timeout: float = 10.0) -> None:
    """Poll `predicate` without blocking the loop, for state only polling sees
    (a file's bytes, a process's run state); fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.005)


class RawGuest(asyncio.Protocol):
    def __init__(self, name: str, client_id: bytes):
        self.name = name
        self.client_id = client_id
        self.conn = Connection(Role.GUEST)
        self.transport: asyncio.Transport | None = None
        self.hello: HelloReply | None = None
        self._replies: dict[int, asyncio.Future] = {}
        self._heartbeats: dict[int, asyncio.Future] = {}
        self.invalidations: asyncio.Queue = asyncio.Queue()
        self.lost = asyncio.get_running_loop().create_future()
        self._next = 1
        self.sent_at: dict[int, float] = {}  # unique -> time.monotonic() when sent

    @classmethod
    async def connect(cls, address: str, name: str = "raw", client_id: bytes | None = None,
                      features: int = wire.SUPPORTED_FEATURES) -> "RawGuest":
        """Connect and say HELLO offering `features` (add FEATURE_CACHES_UNLEASED
        to be treated as a mount is)."""
        loop = asyncio.get_running_loop()
        self = cls(name, client_id or os.urandom(wire.CLIENT_ID_SIZE))
        where = parse_address(address)
        await loop.create_unix_connection(lambda: self, where.path)
        hello = loop.create_future()
        self._replies[-1] = hello
        self.transport.write(self.conn.send(Hello(wire.PROTOCOL_VERSION, features,
                                                  wire.DEFAULT_MAX_FRAME, name, self.client_id)))
        self.hello = await asyncio.wait_for(hello, 10)
        assert self.hello.error == 0, self.hello
        return self

    # --- asyncio.Protocol -------------------------------------------------------

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.conn.receive_data(data)
        while (event := self.conn.next_event()) is not NEED_DATA:
            self._on(event)

    def _on(self, event) -> None:
        match event:
            case HelloReply():
                self._replies.pop(-1).set_result(event)
            case FsReply():  # kept: `reply` may be asked for it later, or twice
                self._replies[event.unique].set_result(event)
            case HeartbeatReply():
                self._heartbeats.pop(event.seq).set_result(event)
            case Invalidate() | InvalEntry():
                self.invalidations.put_nowait(event)
            case ConnectionClosed():
                self.transport.close()

    def connection_lost(self, exc):
        if not self.lost.done():
            self.lost.set_result(exc)

    # --- what the test does -------------------------------------------------------

    def send(self, nodeid: int, op, unique: int | None = None, caller: tuple = ()) -> int:
        """Send one FS request; returns its unique (wait for it with `reply`).
        `caller`: (uid, gid, pid, groups) to send it as (default: root)."""
        if unique is None:
            unique = self._next
            self._next += 1
        self._replies[unique] = asyncio.get_running_loop().create_future()
        self.sent_at[unique] = time.monotonic()
        self.transport.write(self.conn.send(FsRequest(unique, nodeid, op, *caller)))
        return unique

    async def reply(self, unique: int, timeout: float = 20.0) -> FsReply:
        return await asyncio.wait_for(asyncio.shield(self._replies[unique]), timeout)

    async def call(self, nodeid: int, op, timeout: float = 20.0, caller: tuple = ()) -> FsReply:
        return await self.reply(self.send(nodeid, op, caller=caller), timeout)

    async def next_invalidation(self, timeout: float = 20.0):
        return await asyncio.wait_for(self.invalidations.get(), timeout)

    def ack(self, seq: int) -> None:
        self.transport.write(self.conn.send(Ack(seq)))

    async def heartbeat(self, timeout: float = 20.0) -> HeartbeatReply:
        seq = self._next
        self._next += 1
        future = self._heartbeats[seq] = asyncio.get_running_loop().create_future()
        self.transport.write(self.conn.send(Heartbeat(seq)))
        return await asyncio.wait_for(future, timeout)

    async def open(self, name: str, flags: int = os.O_RDONLY) -> tuple[int, int]:
        """LOOKUP and OPEN `name` in the export's root: (nodeid, fh)."""
        entry = await self.call(ROOT, Lookup(os.fsencode(name)))
        assert entry.error == 0, entry
        opened = await self.call(entry.body.nodeid, Open(flags))
        assert opened.error == 0, opened
        return entry.body.nodeid, opened.body.fh

    async def read(self, nodeid: int, fh: int, size: int = 4096) -> FsReply:
        reply = await self.call(nodeid, Read(fh, 0, size))
        assert reply.error == 0, reply
        return reply

    async def lease(self, name: str) -> tuple[int, int]:
        """Open `name` and read it until this guest holds a lease on it: (nodeid, fh)."""
        nodeid, fh = await self.open(name)
        assert (await self.read(nodeid, fh)).lease.granted, f"{self.name}: no lease on {name}"
        return nodeid, fh

    async def getattr(self, nodeid: int) -> FsReply:
        return await self.call(nodeid, Getattr())

    def close(self) -> None:
        self.transport.abort()


class RawWitness(asyncio.Protocol):
    """The witness of a RawGuest (host/witness.py), driven by the test: it hears
    the host's PURGE requests (`next_purge`) and reports a purge when told
    (`purged`)."""

    def __init__(self):
        self.conn = Connection(Role.GUEST)
        self.transport: asyncio.Transport | None = None
        self._reply: asyncio.Future = asyncio.get_running_loop().create_future()
        self.purges: asyncio.Queue = asyncio.Queue()
        self.lost = asyncio.get_running_loop().create_future()

    @classmethod
    async def of(cls, address: str, guest: RawGuest) -> "RawWitness":
        """Connect with `guest`'s client_id and bind as its witness."""
        loop = asyncio.get_running_loop()
        self = cls()
        await loop.create_unix_connection(lambda: self, parse_address(address).path)
        self.transport.write(self.conn.send(Hello(wire.PROTOCOL_VERSION, wire.FEATURE_WITNESS,
                                                  wire.DEFAULT_MAX_FRAME, f"{guest.name}/witness",
                                                  guest.client_id)))
        hello = await asyncio.wait_for(self._reply, 10)
        assert hello.error == 0, hello
        self._reply = loop.create_future()
        self.transport.write(self.conn.send(Witness(guest.hello.guest_id)))
        bound = await asyncio.wait_for(self._reply, 10)
        assert bound.error == 0, bound
        return self

    connection_made = RawGuest.connection_made
    data_received = RawGuest.data_received

    def _on(self, event) -> None:
        match event:
            case HelloReply() | WitnessReply():
                self._reply.set_result(event)
            case Purge():
                self.purges.put_nowait(event)
            case ConnectionClosed():
                self.transport.close()

    def connection_lost(self, exc):
        if not self._reply.done():
            self._reply.set_exception(ConnectionError(f"witness connection lost: {exc}"))
        if not self.lost.done():
            self.lost.set_result(exc)

    async def next_purge(self, timeout: float = 20.0) -> Purge:
        return await asyncio.wait_for(self.purges.get(), timeout)

    def purged(self, reason: int = wire.PURGED_ASKED, inodes: int = 1) -> None:
        self.transport.write(self.conn.send(Purged(reason, inodes)))
