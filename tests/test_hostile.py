"""Hostile input against a running daemon: it answers with errnos or closes that
connection, never crashes, never reaches outside the export, and keeps serving
everyone else."""

from __future__ import annotations

import asyncio
import errno
import os
import random
import socket
import struct

import pytest

from guest.client import GuestClient, HostError
from protocol import codec, wire
from protocol.connection import Connection, Role
from protocol.messages import (
    FsRequest,
    Getattr,
    Hello,
    Lookup,
    Open,
    Read,
    Readdir,
    Write,
)

GOOD_NAME = "the-good-guests-file-with-a-long-name.dat"
GOOD_DATA = bytes(range(256)) * 16


def _hello_bytes() -> bytes:
    return Connection(Role.GUEST).send(Hello(wire.PROTOCOL_VERSION, 3, wire.DEFAULT_MAX_FRAME, "fuzz"))


def _frame(request: int, flags: int, payload: bytes) -> bytes:
    return struct.pack("<III", request, flags, len(payload)) + payload


def _valid_requests(rng: random.Random) -> list[bytes]:
    """Well-formed FS request frames with hostile contents (ids never issued, odd names)."""
    ops = [
        (1, Lookup(b"..")), (1, Lookup(b"a/b")), (1, Lookup(b"x" * 300)), (1, Lookup(b".")),
        (rng.randrange(2, 1 << 40), Getattr()), (1, Open(os.O_RDWR)),
        (1, Read(rng.randrange(1 << 32), 0, 4096)), (1, Write(rng.randrange(1 << 32), 0, b"zz")),
        (rng.randrange(1 << 63), Readdir()), (1, Lookup(os.fsencode(GOOD_NAME))),
    ]
    frames = []
    for unique, (nodeid, op) in enumerate(ops, start=rng.randrange(1, 1 << 30)):
        code, flags, payload = codec.encode_payload(FsRequest(unique, nodeid, op))
        frames.append(_frame(code, flags, payload))
    return frames


def _mutate(rng: random.Random, frame: bytes) -> bytes:
    data = bytearray(frame)
    choice = rng.randrange(5)
    if choice == 0:  # flip bits
        for _ in range(rng.randrange(1, 4)):
            i = rng.randrange(len(data))
            data[i] ^= 1 << rng.randrange(8)
    elif choice == 1:  # truncate the payload but keep the header's size
        data = data[: rng.randrange(12, len(data))] if len(data) > 12 else data
        data += b"\x00" * 0
    elif choice == 2:  # an unknown FUSE opcode (the connection survives with ENOSYS)
        if len(data) >= 20:
            struct.pack_into("<I", data, 16, rng.choice([0, 99, 4096, 0xFFFFFFFF]))
    elif choice == 3:  # lie about the fuse_in_header length
        if len(data) >= 16:
            struct.pack_into("<I", data, 12, rng.randrange(1 << 32))
    else:  # garbage payload under a valid header
        payload = os.urandom(rng.randrange(0, 200))
        data = bytearray(_frame(wire.Request.FS, wire.PROTOCOL_VERSION | wire.FLAG_NEED_REPLY,
                                payload))
    return bytes(data)


def _fatal(rng: random.Random) -> bytes:
    """A frame after which the daemon must close the connection."""
    return rng.choice([
        struct.pack("<III", wire.Request.FS, 1 | wire.FLAG_NEED_REPLY, 1 << 30),  # oversize
        struct.pack("<III", 77, 1, 0),  # unknown request code
        struct.pack("<III", wire.Request.HELLO, 1 | wire.FLAG_NEED_REPLY, 0),  # HELLO again, empty
        os.urandom(64),
    ])


def _send_connection(address: str, frames: list[bytes]) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(address.partition(":")[2])
    try:
        sock.sendall(_hello_bytes() + b"".join(frames))
        sock.shutdown(socket.SHUT_WR)
        while sock.recv(65536):  # drain replies until the daemon closes
            pass
    except (ConnectionResetError, BrokenPipeError):
        pass  # the daemon closed on a bad frame before reading everything
    finally:
        sock.close()


async def test_ten_thousand_malformed_frames_while_a_good_guest_reads(export, start_host):
    (export / GOOD_NAME).write_bytes(GOOD_DATA)
    host, address = start_host(export, "--detector", "none")
    good = await GuestClient.connect(address, name="good", reconnect=False)
    handle = await good.open(GOOD_NAME)
    def fuzz() -> int:
        rng = random.Random(2024)
        sent = 0
        while sent < 10_000:
            frames = []
            for _ in range(rng.randrange(20, 60)):
                frame = rng.choice(_valid_requests(rng))
                frames.append(_mutate(rng, frame) if rng.random() < 0.8 else frame)
            if rng.random() < 0.5:
                frames.append(_fatal(rng))
            _send_connection(address, frames)
            sent += len(frames)
        return sent

    # The fuzzer runs in a thread, so that the good guest keeps reading (and
    # answering invalidations) while the frames arrive.
    fuzzing = asyncio.ensure_future(asyncio.to_thread(fuzz))
    reads = 0
    while not fuzzing.done():
        result = await good.read(handle, 0, len(GOOD_DATA))
        assert result.data == GOOD_DATA
        reads += 1
        await asyncio.sleep(0.001)
    assert await fuzzing >= 10_000
    assert host.proc.poll() is None, "the daemon died"
    assert reads > 100
    # A fresh guest is still served after all of it.
    fresh = await GuestClient.connect(address, name="fresh", reconnect=False)
    h = await fresh.open(GOOD_NAME)
    assert (await fresh.read(h, 0, 16)).data == GOOD_DATA[:16]
    await fresh.close()
    await good.close()
    assert (export / GOOD_NAME).read_bytes() == GOOD_DATA


@pytest.fixture
def outside_secret(tmp_path):
    secret = tmp_path / "outside" / "secret.txt"
    secret.parent.mkdir()
    secret.write_bytes(b"TOP-SECRET-OUTSIDE-THE-EXPORT")
    return secret


async def test_names_that_would_leave_the_export_are_refused(export, start_host, outside_secret):
    _, address = start_host(export, "--detector", "none")
    g = await GuestClient.connect(address, reconnect=False)
    for name, expected in ((b"..", errno.EINVAL), (b".", errno.EINVAL), (b"../outside", errno.EINVAL),
                           (b"a/../../x", errno.EINVAL), (b"y" * 256, errno.ENAMETOOLONG)):
        with pytest.raises(HostError) as info:
            await g.request(1, Lookup(name))
        assert info.value.errno == expected, name
    # A name with a NUL cannot even be encoded by a well-behaved client: send it raw.
    code, flags, payload = codec.encode_payload(FsRequest(999, 1, Lookup(b"abc")))
    raw = payload.replace(b"abc\x00", b"a\x00c\x00")
    sock = socket.socket(socket.AF_UNIX)
    sock.settimeout(10)
    sock.connect(address.partition(":")[2])
    sock.sendall(_hello_bytes() + _frame(code, flags, raw))
    replies = b""
    while chunk := sock.recv(65536):
        replies += chunk
    sock.close()
    assert b"TOP-SECRET" not in replies
    await g.close()


async def test_symlinks_never_lead_out_of_the_export(export, start_host, outside_secret):
    os.symlink(outside_secret, export / "link-to-secret")
    os.symlink(outside_secret.parent, export / "link-to-outside-dir")
    os.symlink("../outside/secret.txt", export / "relative-link")
    _, address = start_host(export, "--detector", "none")
    g = await GuestClient.connect(address, reconnect=False)
    for name in ("link-to-secret", "relative-link"):
        with pytest.raises(HostError) as info:
            await g.open(name)
        assert info.value.errno == errno.ELOOP
    # Through a symlinked directory: the symlink is a leaf, never a parent.
    with pytest.raises(HostError) as info:
        await g.open("link-to-outside-dir/secret.txt")
    assert info.value.errno in (errno.ENOTDIR, errno.ELOOP)
    # Swap a symlink in for a file the guest has already looked up: the guest
    # keeps reading the file it looked up, never the outside target.
    (export / "plain").write_bytes(b"plain-inside")
    h = await g.open("plain")
    os.rename(export / "plain", export / "plain.moved")
    os.symlink(outside_secret, export / "plain")
    data = (await g.read(h, 0, 64)).data
    assert data == b"plain-inside"
    nodeid = h.nodeid
    reopened = await g.request(nodeid, Open(os.O_RDONLY))
    reply = await g.request(nodeid, Read(reopened.body.fh, 0, 64))
    assert reply.body.data == b"plain-inside"
    await g.close()


async def test_ids_of_another_guest_are_refused(export, start_host):
    (export / "f").write_bytes(b"mine")
    _, address = start_host(export, "--detector", "none")
    a = await GuestClient.connect(address, name="a", reconnect=False)
    b = await GuestClient.connect(address, name="b", reconnect=False)
    ha = await a.open("f")
    with pytest.raises(HostError) as info:
        await b.request(ha.nodeid, Getattr())  # never looked up by b
    assert info.value.errno == errno.ESTALE
    hb = await b.open("f")
    with pytest.raises(HostError) as info:
        await b.request(hb.nodeid, Read(ha.fh + 1000, 0, 4))  # a handle b was never given
    assert info.value.errno == errno.EBADF
    await a.close()
    await b.close()
