"""Range granularity against a real daemon: hand-made interleavings of reads
and writes on overlapping and adjacent page ranges, guest writers and
host-local ones (fanotify), in separate processes.

Ordering is forced by the protocol itself, never by sleeps: a writer's reply
(a guest WRITE's, or a host pwrite(2) returning) comes only after every
holder the recall went to has ACKed, and the raw sessions ACK each
invalidation as it arrives, recording it first.  So when a write returns,
every invalidation it caused is in `received`.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import pytest

from protocol.messages import Getattr, Granularity, Invalidate, Read, Write
from workload.chaos_peers import RawSession

P = 4096
PAGES = 8


def _file(path) -> None:
    path.write_bytes(b"".join(bytes([65 + i]) * P for i in range(PAGES)))


def _invalidations(session: RawSession) -> list[tuple[int, int]]:
    """The (offset, length) of every INVALIDATE `session` received, and forget them."""
    seen = [(m.offset, m.length) for _, m in session.received if isinstance(m, Invalidate)]
    session.received.clear()
    return seen


async def _sessions(address):
    w = await RawSession.open(address, "w", None, auto_ack=True)
    r = await RawSession.open(address, "r", None, auto_ack=True)
    nodeid, fh = await w.open_file("f.dat", os.O_RDWR)
    r_node, r_fh = await r.open_file("f.dat", os.O_RDONLY)
    return w, r, nodeid, fh, r_node, r_fh


async def _granted(session, nodeid, fh, page, pages=1) -> bool:
    reply = await session.call(nodeid, Read(fh, page * P, pages * P))
    assert reply.error == 0
    return reply.lease.granted


def test_guest_writes_recall_only_their_range_from_its_holders(export, start_host):
    _file(export / "f.dat")
    _, address = start_host(export, "--detector", "none", "--clean-after", "100000")

    async def run():
        w, r, nodeid, fh, r_node, r_fh = await _sessions(address)
        assert r.hello.granularity is Granularity.RANGE
        assert await _granted(r, r_node, r_fh, 0) and await _granted(r, r_node, r_fh, 4)
        # The first write into page 4: only that page is recalled from the reader.
        reply = await w.call(nodeid, Write(fh, 4 * P + 8, b"x" * 16))
        assert reply.error == 0 and reply.lease.first_dirty
        assert _invalidations(r) == [(4 * P, P)]
        assert await _granted(r, r_node, r_fh, 0)  # the head stays leased
        assert not await _granted(r, r_node, r_fh, 4)  # dirty
        assert not await _granted(r, r_node, r_fh, 3, 2)  # overlaps the dirty page
        assert await _granted(r, r_node, r_fh, 5)  # adjacent and clean
        # Adjacent page 5, which the reader holds: recalled on its own.
        assert (await w.call(nodeid, Write(fh, 5 * P, b"y" * 16))).lease.first_dirty
        assert _invalidations(r) == [(5 * P, P)]
        # Into a page that is dirty already: nothing is sent.
        reply = await w.call(nodeid, Write(fh, 4 * P, b"z" * (2 * P)))
        assert reply.error == 0 and not reply.lease.first_dirty
        assert _invalidations(r) == []
        # A page the reader does not hold: it is not bothered.
        assert (await w.call(nodeid, Write(fh, 2 * P, b"q"))).lease.first_dirty
        assert _invalidations(r) == []
        # An append at a page boundary changes from there on: the full last page
        # the reader holds is unchanged, and it is not recalled.
        assert await _granted(r, r_node, r_fh, 7)
        assert (await w.call(nodeid, Write(fh, PAGES * P, b"t" * 10))).lease.first_dirty
        assert _invalidations(r) == []
        assert await _granted(r, r_node, r_fh, 7)
        assert await _granted(r, r_node, r_fh, 0)
        assert not await _granted(r, r_node, r_fh, PAGES)
        # The attributes are not granted while any page is dirty.
        assert not (await r.call(r_node, Getattr())).lease.granted
        # The bytes are the new ones.
        data = (await r.call(r_node, Read(r_fh, 4 * P, P))).body.data
        assert data == b"z" * P

    asyncio.run(run())


def test_an_append_recalls_the_holder_of_the_last_page_and_of_the_attributes(
        export, start_host):
    (export / "f.dat").write_bytes(b"a" * (2 * P + 100))  # page 2 is short
    _, address = start_host(export, "--detector", "none", "--clean-after", "100000")

    async def run():
        w, r, nodeid, fh, r_node, r_fh = await _sessions(address)
        assert await _granted(r, r_node, r_fh, 0) and await _granted(r, r_node, r_fh, 2)
        g = await RawSession.open(address, "g", None, auto_ack=True)
        g_node, _ = await g.open_file("f.dat", os.O_RDONLY)
        assert (await g.call(g_node, Getattr())).lease.granted
        assert (await w.call(nodeid, Write(fh, 2 * P + 100, b"t" * 10))).lease.first_dirty
        assert _invalidations(r) == [(2 * P, 0)]  # from the old last page on
        assert _invalidations(g) == [(2 * P, 0)]  # it held the attributes (size, mtime)
        assert await _granted(r, r_node, r_fh, 0, 2)

    asyncio.run(run())


def test_inode_granularity_recalls_everything(export, start_host):
    _file(export / "f.dat")
    _, address = start_host(export, "--detector", "none", "--clean-after", "100000",
                            "--granularity", "inode")

    async def run():
        w, r, nodeid, fh, r_node, r_fh = await _sessions(address)
        assert r.hello.granularity is Granularity.INODE
        assert await _granted(r, r_node, r_fh, 0)
        assert (await w.call(nodeid, Write(fh, 4 * P, b"x"))).lease.first_dirty
        assert _invalidations(r) == [(0, 0)]
        assert not await _granted(r, r_node, r_fh, 0)

    asyncio.run(run())


# --- host-local writers (fanotify pre-content events) ------------------------------

WRITER = r"""
import os, sys
mode, path, offset = sys.argv[1], sys.argv[2], int(sys.argv[3])
if mode == "append":
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    os.write(fd, b"appended")
else:
    fd = os.open(path, os.O_WRONLY)
    os.pwrite(fd, b"host", offset)
print("done", flush=True)
"""


def _host_write(mode: str, path, offset: int = 0) -> None:
    """One host-local write in its own process; returns once its system call has
    (after the daemon answered its pre-content event: after the recall)."""
    out = subprocess.run([sys.executable, "-c", WRITER, mode, str(path), str(offset)],
                         capture_output=True, text=True, timeout=30)
    assert out.stdout.strip() == "done", out.stderr


def test_host_local_writes_recall_the_range_their_event_carries(export, start_host):
    from host.fanotify_detector import FanotifyDetector
    ok, why = FanotifyDetector.usable(str(export))
    if not ok:
        pytest.skip(f"fanotify detector unavailable: {why}")
    _file(export / "f.dat")
    _, address = start_host(export, "--detector", "fanotify", "--clean-after", "100000")

    async def run():
        r = await RawSession.open(address, "r", None, auto_ack=True)
        assert r.hello.granularity is Granularity.RANGE
        r_node, r_fh = await r.open_file("f.dat", os.O_RDONLY)
        # The first read arms the inode (granted from the next one on).
        await _granted(r, r_node, r_fh, 0)
        assert await _granted(r, r_node, r_fh, 0) and await _granted(r, r_node, r_fh, 4)
        loop = asyncio.get_running_loop()
        # A positioned write: its event's range is exact.
        await loop.run_in_executor(None, _host_write, "pwrite", export / "f.dat", 4 * P + 1)
        assert _invalidations(r) == [(4 * P, P)]
        assert await _granted(r, r_node, r_fh, 0)
        assert not await _granted(r, r_node, r_fh, 4)
        # Into the dirty page again: answered at once, nothing sent.
        await loop.run_in_executor(None, _host_write, "pwrite", export / "f.dat", 4 * P + 9)
        assert _invalidations(r) == []
        # Adjacent page 5 is clean: recalled (the reader holds it after this read).
        assert await _granted(r, r_node, r_fh, 5)
        await loop.run_in_executor(None, _host_write, "pwrite", export / "f.dat", 5 * P)
        assert _invalidations(r) == [(5 * P, P)]
        # O_APPEND: the event names the fd's position, not the end of file
        # where the bytes land, so everything from that page on is recalled.
        assert await _granted(r, r_node, r_fh, 0)
        await loop.run_in_executor(None, _host_write, "append", export / "f.dat")
        assert _invalidations(r) == [(0, 0)]
        data = (await r.call(r_node, Read(r_fh, PAGES * P, P))).body.data
        assert data == b"appended"

    asyncio.run(run())
