"""The failure paths of issue 11, each interleaving forced against a real host process.

The peers are `RawGuest`s (frame by frame: they ACK and heartbeat only when
told) and library `GuestClient`s; every ordering comes from the protocol
itself (a request sent before another on one stream is handled first), from a
hook, or from a peer that has not answered yet, never from a sleep.  Each test
names the item it holds and failed on the code before its fix (the note on
issue 11 says how that was checked).
"""

from __future__ import annotations

import asyncio
import errno
import os
import time

import pytest

from guest.client import GuestClient, HostError
from protocol.messages import LEASE_NOT_RENEWED, InvalEntry, Invalidate, Read, Rename, Write
from raw_guest import ROOT, RawGuest, until
from relay import Relay


ACK_MS, TERM_MS = 200, 1000
TERM = TERM_MS / 1000
# host/leases.py: the host fences at the term stretched by 1 %, plus 50 ms.
BOUND = ACK_MS / 1000 + TERM * 1.01 + 0.05


def _host(start_host, export, *extra):
    return start_host(export, "--detector", "none", "--ack-timeout", str(ACK_MS),
                      "--lease-term", str(TERM_MS), *extra)



async def _eventually_granted(guest: RawGuest, nodeid: int, fh: int, timeout=10.0) -> None:
    """Read until a reply grants a lease: the inode is CLEAN again (state only polling sees)."""
    deadline = time.monotonic() + timeout
    while not (await guest.read(nodeid, fh)).lease.granted:
        assert time.monotonic() < deadline, "the inode never became CLEAN again"
        await asyncio.sleep(0.02)


# --- item 1: a modification that fails after its recall -------------------------------


async def test_a_write_failing_after_its_recall_publishes_the_generation_and_cleans_up(
        export, start_host):
    (export / "f").write_bytes(b"old!" * 1024)
    _, address = _host(start_host, export)
    holder = await RawGuest.connect(address, "holder")
    writer = await RawGuest.connect(address, "writer")
    h_node, h_fh = await holder.lease("f")
    w_node, w_fh = await writer.open("f", os.O_RDWR)
    failing = writer.send(w_node, Write(w_fh, 1 << 50, b"x"))  # EFBIG, after the recall
    recall = await holder.next_invalidation()
    assert isinstance(recall, Invalidate) and recall.ino == h_node
    holder.ack(recall.seq)
    reply = await writer.reply(failing)
    assert reply.error == -errno.EFBIG
    # The error still publishes the new generation, so the writer drops a grant of
    # an older one still on its way (before the fix: 24 zero bytes).
    assert reply.lease.ino == w_node and reply.lease.generation == recall.generation
    assert not reply.lease.granted
    # ... and the inode is flushed and leased again (before: DIRTY for ever).
    await _eventually_granted(holder, h_node, h_fh)


async def test_a_library_writer_whose_write_fails_drops_its_own_pipelined_grant(
        export, start_host):
    """The writer's READ, sent just before its failing WRITE on the same stream,
    comes back with a grant of the old generation; the error reply's trailer makes
    the client drop it, so it never serves old bytes as hits after others write."""
    (export / "f").write_bytes(b"old!" * 1024)
    _, address = _host(start_host, export)
    writer = await GuestClient.connect(address, name="writer", reconnect=False)
    other = await GuestClient.connect(address, name="other", reconnect=False)
    handle = await writer.open("f", os.O_RDWR)
    read, write = await asyncio.gather(writer.read(handle, 0, 4096),
                                       writer.write(handle, 1 << 50, b"x"),
                                       return_exceptions=True)
    assert read.data.startswith(b"old!") and isinstance(write, HostError)
    assert write.errno == errno.EFBIG
    h = await other.open("f", os.O_RDWR)
    await other.write(h, 0, b"NEW!")
    again = await writer.read(handle, 0, 4)
    assert again.data == b"NEW!" and not again.hit
    await writer.close()
    await other.close()


# --- item 2: a fenced guest keeps serving its other inodes -----------------------------


async def test_a_fenced_session_learns_it_from_its_heartbeat(export, start_host):
    (export / "x").write_bytes(b"x" * 64)
    _, address = _host(start_host, export)
    silent = await RawGuest.connect(address, "silent")
    writer = await RawGuest.connect(address, "writer")
    x_node, x_fh = await silent.lease("x")
    w_node, w_fh = await writer.open("x", os.O_RDWR)
    write = writer.send(w_node, Write(w_fh, 0, b"X"))
    await silent.next_invalidation()  # ... and never ACKed
    # While the ACK is owed, nothing renews its term: not a heartbeat, not a reply.
    assert (await silent.heartbeat()).error == -errno.EAGAIN
    assert (await silent.read(x_node, x_fh)).lease.flags & LEASE_NOT_RENEWED
    assert (await writer.reply(write)).error == 0  # it was fenced
    assert (await silent.heartbeat()).error == -errno.EKEYEXPIRED


async def test_a_guest_wedged_on_one_invalidation_stops_serving_its_other_files(
        export, start_host):
    """One slow ACK on X, then another guest rewrites Y: the fenced guest must not
    read old Y as hits (before the fix: hits for as long as it heartbeated)."""
    (export / "x").write_bytes(b"x" * 64)
    (export / "y").write_bytes(b"old-y" * 8)
    _, address = _host(start_host, export)
    wedged = await GuestClient.connect(address, name="wedged", reconnect=False)
    stuck = asyncio.get_running_loop().create_future()
    wedged.on_invalidate = lambda event: stuck  # the ACK waits for ever
    writer = await GuestClient.connect(address, name="writer", reconnect=False)
    hx, hy = await wedged.open("x"), await wedged.open("y")
    await wedged.read(hx, 0, 64)
    await wedged.read(hy, 0, 40)
    assert (await wedged.read(hy, 0, 40)).hit
    wx = await writer.open("x", os.O_RDWR)
    t0 = time.monotonic()
    await writer.write(wx, 0, b"X")  # returns once the wedged guest is fenced
    assert time.monotonic() - t0 <= BOUND + 0.3
    wy = await writer.open("y", os.O_RDWR)
    await writer.write(wy, 0, b"NEW-Y")
    try:
        result = await wedged.read(hy, 0, 40)
    except (HostError, ConnectionError):
        pass  # fenced: an error is allowed, stale bytes are not
    else:
        assert result.data.startswith(b"NEW-Y") and not result.hit, result
    stuck.set_result(None)
    await writer.close()
    await wedged.close()


# --- item 3: a name re-cached during its own recall ------------------------------------


async def test_a_lookup_answered_during_a_rename_recall_is_not_cached(export, start_host):
    (export / "name").write_bytes(b"a")
    _, address = _host(start_host, export, "--ack-timeout", "5000", "--lease-term", "10000")
    slow = await RawGuest.connect(address, "slow")
    assert (await slow.getattr(ROOT)).lease.granted  # a holder of the directory
    library = await GuestClient.connect(address, name="library", reconnect=False)
    await library.lease_root()
    acked = asyncio.Event()
    library.on_invalidate = lambda event: acked.set()
    await library.stat("name")
    renamer = await RawGuest.connect(address, "renamer")
    rename = renamer.send(ROOT, Rename(ROOT, b"name", b"moved"))
    first = await slow.next_invalidation()
    assert isinstance(first, InvalEntry) and first.name == b"name"
    await asyncio.wait_for(acked.wait(), 10)  # the library guest purged "name" and ACKed
    # The recall still waits for `slow`: "name" is still there, and found.
    assert (await library.stat("name")).size == 1
    slow.ack(first.seq)
    second = await slow.next_invalidation()
    slow.ack(second.seq)
    assert (await renamer.reply(rename)).error == 0
    with pytest.raises(HostError) as gone:
        await library.stat("name")  # before the fix: the cached old entry, for ever
    assert gone.value.errno == errno.ENOENT
    await library.close()


# --- item 9: the stall does not grow with the number of silent holders ------------------


async def test_many_holders_that_heartbeat_but_never_ack_hold_a_write_one_term(
        export, start_host):
    (export / "f").write_bytes(b"f" * 64)
    _, address = _host(start_host, export)
    holders = [await RawGuest.connect(address, f"silent{i}") for i in range(12)]
    for guest in holders:
        await guest.lease("f")

    async def heartbeat_until(done: asyncio.Event, guest: RawGuest):
        while not done.is_set():
            await guest.heartbeat()
            await asyncio.sleep(0.05)  # a busy guest; no ordering depends on it

    writer = await RawGuest.connect(address, "writer")
    node, fh = await writer.open("f", os.O_RDWR)
    done = asyncio.Event()
    beating = [asyncio.ensure_future(heartbeat_until(done, g)) for g in holders]
    t0 = time.monotonic()
    reply = await writer.call(node, Write(fh, 0, b"F"), timeout=120)
    stall = time.monotonic() - t0
    done.set()
    await asyncio.gather(*beating, return_exceptions=True)
    assert reply.error == 0
    # Before the fix: one fence after another, each pushed back by the heartbeats.
    assert stall <= BOUND + 0.3, stall


# --- item 11: the fencing instant leaves a margin for clocks -----------------------------


async def test_a_silent_holder_is_fenced_only_after_its_term_plus_the_clock_margin(
        export, start_host):
    (export / "f").write_bytes(b"f" * 64)
    _, address = _host(start_host, export)
    silent = await RawGuest.connect(address, "silent")
    node, fh = await silent.open("f")
    unique = silent.send(node, Read(fh, 0, 64))
    assert (await silent.reply(unique)).lease.granted
    renewed_from = silent.sent_at[unique]  # the guest counts its term from here
    writer = await RawGuest.connect(address, "writer")
    w_node, w_fh = await writer.open("f", os.O_RDWR)
    await writer.call(w_node, Write(w_fh, 0, b"F"))
    landed = time.monotonic()
    # The guest may serve until renewed_from + term on its own clock; a clock 1 %
    # slow serves a little longer.  Before the fix the host fenced at exactly
    # its own receipt + term.
    assert landed >= renewed_from + TERM * 1.01 + 0.05


# --- item 8: retried writes --------------------------------------------------------------


async def test_a_write_retried_after_its_reply_was_lost_is_not_carried_out_twice(
        export, start_host, tmp_path):
    (export / "f").write_bytes(b"0" * 8)
    _, address = _host(start_host, export)
    relay = Relay(str(tmp_path / "relay.sock"), address.removeprefix("unix:"))
    via_relay = await relay.start()
    a = await GuestClient.connect(via_relay, name="A")
    b = await GuestClient.connect(address, name="B", reconnect=False)
    ha, hb = await a.open("f", os.O_RDWR), await b.open("f", os.O_RDWR)
    relay.hold_replies = True
    writing = asyncio.ensure_future(a.write(ha, 0, b"AAAA"))
    await until(lambda: (export / "f").read_bytes() == b"AAAA0000", "A's write landing")
    relay.admit.clear()  # A's reconnection waits until B has written
    relay.hold_replies = False
    relay.cut()  # A's reply is lost with its connection
    await b.write(hb, 0, b"BBBB")
    relay.admit.set()
    assert (await writing).size == 4  # the first attempt's reply, from the reply cache
    assert a.sessions == 2
    assert (export / "f").read_bytes() == b"BBBB0000"  # before the fix: AAAA0000
    await a.close()
    await b.close()
    await relay.close()


async def test_a_handle_reopened_after_a_reconnect_onto_a_replaced_file_is_stale(
        export, start_host, tmp_path):
    (export / "f").write_bytes(b"original")
    _, address = _host(start_host, export)
    relay = Relay(str(tmp_path / "relay.sock"), address.removeprefix("unix:"))
    a = await GuestClient.connect(await relay.start(), name="A")
    handle = await a.open("f")
    assert (await a.read(handle, 0, 8)).data == b"original"
    relay.admit.clear()
    lost = a.session.closed
    relay.cut()
    await lost  # A knows its session is gone; its reconnection waits for `admit`
    (export / "new").write_bytes(b"imposter")
    os.replace(export / "new", export / "f")  # an editor's save, while A is away
    relay.admit.set()
    with pytest.raises(HostError) as stale:
        await a.read(handle, 0, 8)  # before the fix: "imposter", from another file
    assert stale.value.errno == errno.ESTALE
    await a.close()
    await relay.close()


# --- item 12: a namespace change recalls the directory's own attributes ------------------


async def test_a_namespace_change_recalls_the_directorys_attributes(export, start_host):
    (export / "d").mkdir()
    _, address = _host(start_host, export)
    reader = await GuestClient.connect(address, name="reader", reconnect=False)
    maker = await GuestClient.connect(address, name="maker", reconnect=False)
    await reader.lease_root()
    before = await reader.stat("d")
    assert (await reader.stat("d")) == before and reader.cache.stats.attr_hits >= 1
    await maker.mkdir("d/sub")
    after = await reader.stat("d")  # before the fix: the cached nlink 2, for ever
    assert after.nlink == before.nlink + 1
    await reader.close()
    await maker.close()


# --- item 10: a flush racing a close ------------------------------------------------------


async def test_an_idle_flush_racing_the_inodes_last_close_syncs_that_file(export, monkeypatch):
    """The flush runs fdatasync in a worker thread; the inode's last reference
    goes (its writable fd is closed) while it waits there, and another file takes
    the fd number.  The flush must still sync *this* file (before the fix: EBADF,
    or the other file synced under this inode's name)."""
    import threading

    from host.server import HostConfig, HostDaemon

    (export / "f").write_bytes(b"f")
    daemon = HostDaemon(HostConfig(str(export)))
    nodeid, _ = daemon.fs.lookup(7, ROOT, b"f")
    daemon.fs.writable_fd(nodeid)
    in_thread, go_on = threading.Event(), threading.Event()
    synced: list[str] = []
    real_fdatasync = os.fdatasync

    def hooked(fd: int) -> None:
        in_thread.set()
        assert go_on.wait(10)
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fdatasync(fd)

    monkeypatch.setattr(os, "fdatasync", hooked)
    flush = asyncio.ensure_future(daemon._idle_flush(nodeid))
    assert await asyncio.to_thread(in_thread.wait, 10)
    daemon.fs.forget(7, nodeid, 1)  # the last reference: the writable fd is closed
    other = os.open(export / "g", os.O_RDWR | os.O_CREAT)  # and its number taken again
    try:
        go_on.set()
        await flush
    finally:
        os.close(other)
        daemon.fs.close()
    assert synced == [str(export / "f")]
