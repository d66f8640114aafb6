"""Hostile peers of issue 13, for tests/test_limits.py and `make soak` (benchmarks/soak.py).

Each attacker is a plain blocking socket speaking the real protocol (the
sans-I/O `Connection`), as a hostile client written from scratch would, and
does one thing the daemon's budgets (host/limits.py) must withstand:

* `pipelined_reads`: maximum-size READs pipelined, its socket never read;
* `trickled_frame`: a frame header, then its payload at 1 byte per interval;
* `silent_session`: HELLO (and AUTH), then nothing;
* `handshake_flood`: connections that never say HELLO, refreshed;
* `wrong_tokens`: AUTH with a wrong proof, over and over;
* `descriptor_hog`: LOOKUP and OPEN of as many distinct files as it may;
* `failing_forgets`: FORGETs of node ids it does not hold;
* `unknown_noreply`: unknown opcodes without NEED_REPLY.

Every call is bounded in time; none raises for what the daemon does to it
(a refusal, a disconnection): it returns what it saw.
"""

from __future__ import annotations

import errno
import os
import select
import socket
import struct
import time
from dataclasses import dataclass, field

from protocol import auth, wire
from protocol.address import parse_address
from protocol.connection import NEED_DATA, Connection, Role
from protocol.messages import (
    Auth,
    AuthReply,
    ConnectionClosed,
    Forget,
    FsReply,
    FsRequest,
    Hello,
    HelloReply,
    Lookup,
    Open,
    Read,
)

ROOT = 1


class PeerClosed(Exception):
    """The daemon closed (or reset) the connection."""


class Peer:
    """One raw connection to the daemon at `address` (unix:PATH or tcp:HOST:PORT),
    from `source` (a local IP to bind, for per-address limits) if given."""

    def __init__(self, address: str, *, source: str | None = None, timeout: float = 10.0):
        where = parse_address(address)
        if where.kind == "unix":
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(timeout)
            self.sock.connect(where.path)
        else:
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self.sock.settimeout(timeout)
            if source:
                self.sock.bind((source, 0))
            self.sock.connect((where.host, where.port))
        self.conn = Connection(Role.GUEST)
        self.next_unique = 1
        self.hello_reply: HelloReply | None = None

    # --- frames ------------------------------------------------------------------------

    def send(self, message) -> None:
        try:
            self.sock.sendall(self.conn.send(message))
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise PeerClosed(str(exc)) from None

    def event(self):
        """The next message from the daemon; PeerClosed at the end of the stream."""
        while True:
            event = self.conn.next_event()
            if event is not NEED_DATA:
                if isinstance(event, ConnectionClosed):
                    raise PeerClosed("end of stream")
                return event
            try:
                data = self.sock.recv(1 << 20)
            except (ConnectionResetError, BrokenPipeError) as exc:
                raise PeerClosed(str(exc)) from None
            self.conn.receive_data(data)

    def handshake(self, name: str = "attacker", token: bytes | None = None) -> int:
        """HELLO (and AUTH with `token`, right or wrong); returns the error (0: in)."""
        self.send(Hello(wire.PROTOCOL_VERSION, wire.SUPPORTED_FEATURES, wire.DEFAULT_MAX_FRAME,
                        name, os.urandom(wire.CLIENT_ID_SIZE)))
        reply = self.hello_reply = self.event()
        if reply.error or not reply.features & wire.FEATURE_AUTH:
            return reply.error
        nonce = auth.new_nonce()
        proof = auth.guest_proof(token or b"\0" * 32, reply.nonce, nonce)
        self.send(Auth(nonce, proof))
        answer = self.event()
        assert isinstance(answer, AuthReply)
        return answer.error

    def request(self, nodeid: int, op) -> int:
        """Send one FS request without waiting; returns its unique."""
        unique = self.next_unique
        self.next_unique += 1
        self.send(FsRequest(unique, nodeid, op))
        return unique

    def call(self, nodeid: int, op) -> FsReply:
        unique = self.request(nodeid, op)
        while True:
            event = self.event()
            if isinstance(event, FsReply) and event.unique == unique:
                return event

    def open(self, name: str) -> tuple[int, int]:
        entry = self.call(ROOT, Lookup(os.fsencode(name)))
        if entry.error:
            raise OSError(-entry.error, f"LOOKUP {name}: {os.strerror(-entry.error)}")
        opened = self.call(entry.body.nodeid, Open(os.O_RDONLY))
        if opened.error:
            raise OSError(-opened.error, f"OPEN {name}: {os.strerror(-opened.error)}")
        return entry.body.nodeid, opened.body.fh

    def closed_by_daemon(self, timeout: float) -> bool:
        """Wait up to `timeout` s for the daemon to close this connection, without
        reading what it sent (POLLRDHUP is raised with unread data pending)."""
        poller = select.poll()
        poller.register(self.sock, select.POLLRDHUP | select.POLLHUP | select.POLLERR)
        return bool(poller.poll(max(0, int(timeout * 1000))))

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def raw_frame(request: int, flags: int, payload: bytes) -> bytes:
    return struct.pack("<III", request, flags, len(payload)) + payload


# --- the attacks ---------------------------------------------------------------------------

def pipelined_reads(address: str, name: str, *, requests: int = 256, size: int = 1 << 20,
                    token: bytes | None = None) -> Peer:
    """Open `name` and pipeline `requests` READs of `size`, never reading a reply.
    Returns the peer (still connected, unless the daemon closed it)."""
    peer = Peer(address)
    peer.handshake("reader-that-never-reads", token)
    nodeid, fh = peer.open(name)
    peer.sock.setblocking(False)
    data = b"".join(peer.conn.send(FsRequest(10_000 + i, nodeid, Read(fh, 0, size)))
                    for i in range(requests))
    peer.sock.setblocking(True)
    peer.sock.settimeout(2.0)
    try:
        peer.sock.sendall(data)
    except (OSError, socket.timeout):
        pass  # the daemon stopped reading (as it should) or closed us
    return peer


def trickled_frame(address: str, *, interval: float = 0.2, duration: float = 5.0,
                   token: bytes | None = None) -> tuple[Peer, bool, float]:
    """After the handshake, send a frame header announcing 4 KiB, then one byte
    per `interval`.  Returns (peer, closed by the daemon, seconds until then)."""
    peer = Peer(address)
    peer.handshake("trickler", token)
    start = time.monotonic()
    peer.sock.sendall(struct.pack("<III", wire.Request.FS, 0x9, 4096))
    while time.monotonic() - start < duration:
        if peer.closed_by_daemon(interval):
            return peer, True, time.monotonic() - start
        try:
            peer.sock.send(b"\0")
        except OSError:
            return peer, True, time.monotonic() - start
    return peer, False, time.monotonic() - start


def silent_session(address: str, token: bytes | None = None, name: str = "silent") -> Peer:
    """HELLO (and AUTH), then nothing."""
    peer = Peer(address)
    error = peer.handshake(name, token)
    if error:
        peer.close()
        raise OSError(-error, f"handshake refused: {os.strerror(-error)}")
    return peer


@dataclass
class Flood:
    """Connections that never say HELLO, from `sources` (one local IP each)."""

    address: str
    sources: list[str]
    per_source: int
    peers: list[Peer] = field(default_factory=list)
    refused: int = 0

    def fill(self, deadline: float | None = None) -> None:
        """Open connections until each source holds `per_source` (closed ones are
        replaced: the refresh of the attack), or until time.monotonic() passes
        `deadline`."""
        kept = []
        for p in self.peers:
            if p.closed_by_daemon(0):
                p.close()
            else:
                kept.append(p)
        self.peers = kept
        have: dict[str, int] = {}
        for p in self.peers:
            src = p.sock.getsockname()[0]
            have[src] = have.get(src, 0) + 1
        for source in self.sources:
            for _ in range(self.per_source - have.get(source, 0)):
                if deadline is not None and time.monotonic() > deadline:
                    return
                try:
                    self.peers.append(Peer(self.address, source=source, timeout=0.5))
                except OSError:
                    self.refused += 1

    def close(self) -> None:
        for p in self.peers:
            p.close()
        self.peers.clear()


def wrong_tokens(address: str, attempts: int, source: str | None = None) -> list[float]:
    """`attempts` wrong proofs, one connection each, one after the other; the
    seconds each refusal took."""
    took = []
    for _ in range(attempts):
        peer = Peer(address, source=source, timeout=30.0)
        start = time.monotonic()
        try:
            peer.send(Hello(wire.PROTOCOL_VERSION, wire.SUPPORTED_FEATURES,
                            wire.DEFAULT_MAX_FRAME, "guesser", os.urandom(16)))
            peer.event()  # the HELLO reply
            start = time.monotonic()
            peer.send(Auth(auth.new_nonce(), os.urandom(32)))
            answer = peer.event()
            assert isinstance(answer, AuthReply) and answer.error == -errno.EACCES, answer
        except PeerClosed:
            pass
        took.append(time.monotonic() - start)
        peer.close()
    return took


def descriptor_hog(address: str, names: list[str], token: bytes | None = None,
                   open_too: bool = True) -> tuple[Peer, int, dict[int, int]]:
    """LOOKUP (and OPEN) every name in `names` and keep them all.  Returns (peer,
    how many it got, {errno: count} of the refusals)."""
    peer = Peer(address)
    peer.handshake("hog", token)
    got, refused = 0, {}
    for name in names:
        entry = peer.call(ROOT, Lookup(os.fsencode(name)))
        if entry.error:
            refused[-entry.error] = refused.get(-entry.error, 0) + 1
            continue
        got += 1
        if open_too:
            opened = peer.call(entry.body.nodeid, Open(os.O_RDONLY))
            if opened.error:
                refused[-opened.error] = refused.get(-opened.error, 0) + 1
            else:
                got += 1
    return peer, got, refused


def failing_forgets(address: str, count: int, token: bytes | None = None) -> Peer:
    """`count` FORGETs of a node id this peer never got (no reply is due)."""
    peer = Peer(address)
    peer.handshake("forgetful", token)
    # Built by hand, as a hostile client would, and cheaply (the attacker must
    # not be what slows the good guests on a small machine).
    frame = peer.conn.send(FsRequest(1, 4242, Forget(1)))
    head, unique_at = frame[:20], 20
    peer.sock.sendall(b"".join(head + struct.pack("<Q", 50_000 + i) + frame[unique_at + 8:]
                               for i in range(count)))
    return peer


def unknown_noreply(address: str, count: int, token: bytes | None = None) -> Peer:
    """`count` FS requests with an unknown opcode (9999) and NEED_REPLY clear."""
    peer = Peer(address)
    peer.handshake("unknown-opcodes", token)
    header = struct.pack("<IIQQIIIHH", 40, 9999, 0, 1, 0, 0, 0, 0, 0)
    peer.sock.sendall(raw_frame(wire.Request.FS, 0x1, header) * count)
    return peer
