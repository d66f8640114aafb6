"""Hostile input against a running daemon: it answers with errnos or closes that
connection, never crashes, never reaches outside the export, and keeps serving
everyone else."""

from __future__ import annotations

import asyncio
import errno
import os
import socket

import pytest

from guest.client import GuestClient, HostError
from protocol import codec
from workload import fuzz
from protocol.messages import FsRequest, Getattr, Lookup, Open, Read

GOOD_NAME = "the-good-guests-file-with-a-long-name.dat"
GOOD_DATA = bytes(range(256)) * 16


def _hello_bytes() -> bytes:
    return fuzz.hello_bytes()


def _frame(request: int, flags: int, payload: bytes) -> bytes:
    return fuzz.frame(request, flags, payload)


async def test_ten_thousand_malformed_frames_while_a_good_guest_reads(export, start_host):
    (export / GOOD_NAME).write_bytes(GOOD_DATA)
    host, address = start_host(export, "--detector", "none")
    good = await GuestClient.connect(address, name="good", reconnect=False)
    handle = await good.open(GOOD_NAME)
    # The fuzzer runs in a thread, so that the good guest keeps reading (and
    # answering invalidations) while the frames arrive.
    fuzzing = asyncio.ensure_future(asyncio.to_thread(
        fuzz.fuzz, address, 10_000, 2024, (os.fsencode(GOOD_NAME),)))
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


# --- issue 13: what a peer can make the daemon write, and not answer ------------------------


async def test_a_hello_name_cannot_forge_a_log_line(export, start_host):
    """Issue 13, item 6: the HELLO name was logged raw, so a peer could write a line
    of its choosing into the daemon's log.  Failed before: the forged line stood on
    a line of its own."""
    from raw_guest import RawGuest

    host, address = start_host(export, "--detector", "none")
    forged = "host INFO guest admin connected as 1"
    peer = await RawGuest.connect(address, "x\n" + forged + "\x1b[2J")
    peer.close()
    await peer.lost
    host.stop()
    log = host.proc.stderr.read().decode(errors="replace")
    assert "x\\n" + forged + "\\x1b[2J" in log, log
    assert forged not in log.splitlines(), log


async def test_failing_forgets_get_no_reply_and_one_log_line(export, start_host):
    """Issue 13, item 4: a FORGET of a node id the guest does not hold made the
    daemon try to reply to a request that has none: an error line and a
    traceback per frame.  Now: no reply, one log line, a counter, and the
    guest is still served.  Failed before: a traceback per FORGET."""
    from protocol.messages import Forget, FsRequest
    from raw_guest import ROOT, RawGuest

    (export / "f").write_bytes(b"f")
    host, address = start_host(export, "--detector", "none")
    peer = await RawGuest.connect(address, "forgetful")
    for unique in range(1000, 1200):
        peer.transport.write(peer.conn.send(FsRequest(unique, 4242, Forget(1))))
    node, fh = await peer.open("f")  # served after all of them, on the same stream
    assert (await peer.read(node, fh)).body.data == b"f"
    peer.close()
    await peer.lost
    host.stop()
    log = host.proc.stderr.read().decode(errors="replace")
    assert log.count("FORGET failed") == 1, log
    assert "Traceback" not in log and "never retrieved" not in log, log
