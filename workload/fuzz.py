"""Malformed and hostile frames, for the hostile-input tests and `make chaos`.

Frames start from well-formed FS requests with hostile contents (ids never
issued, names that would leave the export) and are mutated: bit flips,
truncations, unknown opcodes, lying length fields, garbage payloads.  Some
connections end with a frame that must make the daemon close them.
"""

from __future__ import annotations

import os
import random
import socket
import struct

from protocol import codec, wire
from protocol.address import parse_address
from protocol.connection import Connection, Role
from protocol.messages import FsRequest, Getattr, Hello, Lookup, Open, Read, Readdir, Write


def hello_bytes() -> bytes:
    return Connection(Role.GUEST).send(Hello(wire.PROTOCOL_VERSION, 3, wire.DEFAULT_MAX_FRAME, "fuzz"))


def frame(request: int, flags: int, payload: bytes) -> bytes:
    return struct.pack("<III", request, flags, len(payload)) + payload


def valid_requests(rng: random.Random, names: tuple[bytes, ...] = ()) -> list[bytes]:
    """Well-formed FS request frames with hostile contents."""
    ops = [
        (1, Lookup(b"..")), (1, Lookup(b"a/b")), (1, Lookup(b"x" * 300)), (1, Lookup(b".")),
        (rng.randrange(2, 1 << 40), Getattr()), (1, Open(os.O_RDWR)),
        (1, Read(rng.randrange(1 << 32), 0, 4096)), (1, Write(rng.randrange(1 << 32), 0, b"zz")),
        (rng.randrange(1 << 63), Readdir()),
    ] + [(1, Lookup(name)) for name in names]
    frames = []
    for unique, (nodeid, op) in enumerate(ops, start=rng.randrange(1, 1 << 30)):
        code, flags, payload = codec.encode_payload(FsRequest(unique, nodeid, op))
        frames.append(frame(code, flags, payload))
    return frames


def mutate(rng: random.Random, data: bytes) -> bytes:
    data = bytearray(data)
    choice = rng.randrange(5)
    if choice == 0:  # flip bits
        for _ in range(rng.randrange(1, 4)):
            i = rng.randrange(len(data))
            data[i] ^= 1 << rng.randrange(8)
    elif choice == 1 and len(data) > 12:  # cut the payload short of the header's size
        data = data[: rng.randrange(12, len(data))]
    elif choice == 2 and len(data) >= 20:  # an unknown FUSE opcode: answered with ENOSYS
        struct.pack_into("<I", data, 16, rng.choice([0, 99, 4096, 0xFFFFFFFF]))
    elif choice == 3 and len(data) >= 16:  # lie in fuse_in_header.len
        struct.pack_into("<I", data, 12, rng.randrange(1 << 32))
    else:  # garbage payload under a valid header
        data = bytearray(frame(wire.Request.FS, wire.PROTOCOL_VERSION | wire.FLAG_NEED_REPLY,
                               os.urandom(rng.randrange(0, 200))))
    return bytes(data)


def fatal(rng: random.Random) -> bytes:
    """A frame after which the daemon must close the connection."""
    return rng.choice([
        struct.pack("<III", wire.Request.FS, 1 | wire.FLAG_NEED_REPLY, 1 << 30),  # oversize
        struct.pack("<III", 77, 1, 0),  # unknown request code
        struct.pack("<III", wire.Request.HELLO, 1 | wire.FLAG_NEED_REPLY, 0),  # HELLO again, empty
        frame(wire.Request.AUTH, 1 | wire.FLAG_NEED_REPLY, os.urandom(48)),  # AUTH, not asked for
        os.urandom(64),
    ])


def connection_frames(rng: random.Random, names: tuple[bytes, ...] = ()) -> list[bytes]:
    """The frames of one hostile connection (20 to 60, mostly mutated)."""
    frames = []
    for _ in range(rng.randrange(20, 60)):
        f = rng.choice(valid_requests(rng, names))
        frames.append(mutate(rng, f) if rng.random() < 0.8 else f)
    if rng.random() < 0.5:
        frames.append(fatal(rng))
    return frames


def send_connection(address: str, frames: list[bytes], timeout: float = 10.0) -> None:
    """Connect, say HELLO, send `frames`, read until the daemon closes.  (A daemon
    with a token closes at the first frame that is not AUTH.)"""
    where = parse_address(address)
    if where.kind == "unix":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        sock.connect(where.path)
    else:
        sock = socket.create_connection((where.host, where.port), timeout=timeout)
    try:
        sock.sendall(hello_bytes() + b"".join(frames))
        sock.shutdown(socket.SHUT_WR)
        while sock.recv(65536):
            pass
    except (ConnectionResetError, BrokenPipeError):
        pass  # closed on a bad frame before everything was read
    finally:
        sock.close()


def fuzz(address: str, frames: int, seed: int, names: tuple[bytes, ...] = ()) -> int:
    """Send at least `frames` hostile frames over as many connections as it takes."""
    rng = random.Random(seed)
    sent = 0
    while sent < frames:
        batch = connection_frames(rng, names)
        send_connection(address, batch)
        sent += len(batch)
    return sent
