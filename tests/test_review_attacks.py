"""Review attacks on issue 11's changes: interleavings the fault-path tests do not force.

Same style as tests/test_fault_paths.py: real host processes (or, where the
window is one event-loop iteration wide, an in-process daemon whose lease
table is hooked so that the racing request arrives exactly there), raw
frame-by-frame guests, the relay; no sleep decides an ordering.
"""

from __future__ import annotations

import asyncio
import errno
import os
import signal
import time

import pytest

from guest.client import GuestClient, HostError
from protocol.fuse import FATTR_MODE, FATTR_SIZE
from protocol.messages import (
    FsRequest,
    Getattr,
    Invalidate,
    Lookup,
    Read,
    Rename,
    Setattr,
    Unlink,
    Write,
)
from raw_guest import ROOT, RawGuest, until
from relay import Relay

ACK_MS, TERM_MS = 200, 1000
TERM = TERM_MS / 1000
BOUND = ACK_MS / 1000 + TERM * 1.01 + 0.05  # host/leases.py: stall_bound_s


def _host(start_host, export, *extra, address=None):
    return start_host(export, "--detector", "none", "--ack-timeout", str(ACK_MS),
                      "--lease-term", str(TERM_MS), *extra, address=address)



def _is_stopped(pid: int) -> bool:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] in ("T", "t")


# --- promise 2: a lost connection is a silent holder until its term ends -------------------


async def test_a_holder_lost_just_as_the_recall_is_decided_is_still_waited_for(
        export, start_host):
    """W's WRITE and H's EOF reach the host in one epoll batch, W's first.  W's
    step decides the Recall (which empties the holders) and hands it to a new
    task; H's connection_lost runs before that task's first step, finds that H
    `holds_any` nothing any more, and forgets it instead of keeping it as a
    departed holder.  The recall task then finds H neither connected nor
    departed and waits for nobody: the write lands while H (a mount's kernel)
    may serve the old pages for the rest of its term."""
    (export / "f").write_bytes(b"old!" * 16)
    host, address = _host(start_host, export)
    holder = await RawGuest.connect(address, "holder")
    writer = await RawGuest.connect(address, "writer")
    h_node, h_fh = await holder.open("f")
    read = holder.send(h_node, Read(h_fh, 0, 64))
    assert (await holder.reply(read)).lease.granted
    renewed_from = holder.sent_at[read]  # the holder may serve until renewed_from + term
    w_node, w_fh = await writer.open("f", os.O_RDWR)
    pid = host.proc.pid
    os.kill(pid, signal.SIGSTOP)
    try:
        await until(lambda: _is_stopped(pid), "the host to stop")
        write = writer.send(w_node, Write(w_fh, 0, b"NEW!"))  # queued first ...
        holder.close()
        await holder.lost  # ... then the holder's EOF (its socket is closed now)
    finally:
        os.kill(pid, signal.SIGCONT)
    assert (await writer.reply(write)).error == 0
    landed = time.monotonic()
    # Before the departed holder's term is over, the write must not land.
    assert landed >= renewed_from + TERM, f"landed {landed - renewed_from:.3f}s after renewal"


# --- promise 3: the stall bound, whatever the number of holders ----------------------------


async def test_a_rename_between_two_directories_waits_at_most_one_term(export, start_host):
    """RENAME enters namespace_change(old dir) and then namespace_change(new dir):
    two recalls one after the other.  A silent holder of the old directory
    holds the rename one term; meanwhile a holder of the new directory that owes
    nothing yet keeps heartbeating (and is renewed), so when the second recall
    finally reaches it and it does not ACK either, the rename waits a second
    term."""
    (export / "a").mkdir()
    (export / "b").mkdir()
    (export / "a" / "name").write_bytes(b"n")
    _, address = _host(start_host, export)
    silent_a = await RawGuest.connect(address, "silent-a")
    entry_a = await silent_a.call(ROOT, Lookup(b"a"))
    assert entry_a.lease.granted  # a holder of directory a; it never heartbeats or ACKs
    wedged_b = await GuestClient.connect(address, name="wedged-b", reconnect=False)
    stuck = asyncio.get_running_loop().create_future()
    wedged_b.on_invalidate = lambda event: stuck  # heartbeats on its own, never ACKs
    await wedged_b.stat("b")  # a holder of directory b
    renamer = await RawGuest.connect(address, "renamer")
    a_node = (await renamer.call(ROOT, Lookup(b"a"))).body.nodeid
    b_node = (await renamer.call(ROOT, Lookup(b"b"))).body.nodeid
    t0 = time.monotonic()
    reply = await renamer.call(a_node, Rename(b_node, b"name", b"name"), timeout=30)
    stall = time.monotonic() - t0
    stuck.set_result(None)
    await wedged_b.close()
    assert reply.error == 0
    assert (export / "b" / "name").exists()
    assert stall <= BOUND + 0.3, f"rename stalled {stall:.3f}s, bound {BOUND:.3f}s"


# --- promises 1/2: nothing may be granted between a recall's end and its modification --------


@pytest.mark.parametrize("case", [
    "clean-lease: SETATTR of a directory",
    "open-lease: truncate by node id",
    "clean-lease: truncate, a guest FSYNC completing meanwhile",
    "open-lease: OPEN for write (holds)",
])
async def test_no_lease_is_granted_between_a_recalls_end_and_its_modification(
        export, tmp_path, case):
    """`_recall_for` runs the recall as its own task, and that task calls
    `recall_finished`: RECALLING -> CLEAN at once for a directory and for any
    inode under open-lease, RECALLING -> DIRTY (with nothing landed, so a
    finished flush may re-arm it) for a file under clean-lease.  The writer
    resumes two loop iterations later (the task's done callback, then shield's
    outer future).  A request of another guest whose bytes the loop reads in
    the iteration of the recall's last step is served in between: it is
    granted a lease on the old attributes or data, and the modification then
    lands with that guest a holder nobody recalls.  The hook feeds that
    request exactly there, as `data_received` would in that iteration.  Before
    d452e96 `recall_finished` ran in the writer's own step, and these pass.
    An OPEN for write under open-lease holds: its decision counted the writer,
    and no lease is granted while a writer is counted."""
    from host.server import HostConfig, HostDaemon
    from protocol.messages import Open, Policy

    open_lease = case.startswith("open-lease")
    is_dir = "directory" in case
    if is_dir:
        (export / "d").mkdir()
        os.chmod(export / "d", 0o755)
    else:
        (export / "f").write_bytes(b"old!" * 16)
        fd = os.open(export / "f", os.O_RDONLY)
        os.fsync(fd)  # no dirty pages: a re-arm's cachestat check passes
        os.close(fd)
    daemon = HostDaemon(HostConfig(str(export),
                                   policy=Policy.OPEN_LEASE if open_lease else Policy.CLEAN_LEASE,
                                   ack_timeout_ms=ACK_MS, lease_term_ms=TERM_MS))
    address = await daemon.start(f"unix:{tmp_path / 'inproc.sock'}")
    try:
        reader = await RawGuest.connect(address, "reader")
        writer = await RawGuest.connect(address, "writer")
        if is_dir:
            node = (await reader.call(ROOT, Lookup(b"d"))).body.nodeid
            assert (await reader.getattr(node)).lease.granted
            racing_op = Getattr()
            change = Setattr(FATTR_MODE, mode=0o700)
        else:
            node, fh = await reader.lease("f")
            racing_op = Read(fh, 0, 64)
            change = Open(os.O_RDWR) if "OPEN" in case else Setattr(FATTR_SIZE, size=0)
        assert (await writer.call(ROOT, Lookup(b"d" if is_dir else b"f"))).body.nodeid == node
        session = daemon.sessions[reader.hello.guest_id]
        racing: list[asyncio.Future] = []
        real_finished = daemon.leases.recall_finished

        def recall_finished(ino):
            real_finished(ino)
            if ino == node and not racing:
                if "FSYNC" in case:
                    # A guest FSYNC of f begun before the recall completes now
                    # (files.fsync: the mark taken before its thread, `flushed` after).
                    daemon.flushed(node, 0)
                unique = reader._next
                reader._next += 1
                racing.append(asyncio.get_running_loop().create_future())
                reader._replies[unique] = racing[0]
                daemon.feed(session, reader.conn.send(FsRequest(unique, node, racing_op)))

        daemon.leases.recall_finished = recall_finished
        modifying = writer.send(node, change)
        recall = await reader.next_invalidation()
        assert isinstance(recall, Invalidate) and recall.ino == node
        reader.ack(recall.seq)
        assert (await writer.reply(modifying)).error == 0
        raced = await asyncio.wait_for(racing[0], 10)
        assert raced.error == 0
        # Answered once the modification has landed, a grant is right, on the new data.
        if raced.lease.granted:
            if is_dir:
                assert raced.body.attr.mode & 0o777 == 0o700, raced.body
            elif "OPEN" not in case:
                assert raced.body.data == b"", raced.body
        assert not raced.lease.granted or daemon.leases.holders_of(node) >= {
            reader.hello.guest_id}, (
            f"granted {raced.lease} with {raced.body} although the modification of generation "
            f"{recall.generation} had not landed; the host counts the reader as a holder "
            f"of the modified inode: {daemon.leases.holders_of(node)}, state "
            f"{daemon.leases.state_of(node).value}")
    finally:
        await daemon.close()
        daemon.fs.close()


# --- promise 4 and the retry: a first attempt whose session was lost meanwhile ---------------


async def test_a_write_whose_session_is_lost_while_it_waits_on_a_recall_is_not_failed_ebadf(
        export, start_host, tmp_path):
    """The write waits on a holder's ACK; its connection drops; the host closes
    the writer's handles at once (`session_lost`), so when the recall ends the
    first attempt fails with EBADF, and the retry on the new session is
    answered from the reply cache with that EBADF: the application's write on a
    valid, re-opened handle fails with EBADF and nothing was written."""
    (export / "f").write_bytes(b"0" * 8)
    _, address = _host(start_host, export, "--ack-timeout", "5000", "--lease-term", "10000")
    holder = await RawGuest.connect(address, "holder")
    await holder.lease("f")
    relay = Relay(str(tmp_path / "relay.sock"), address.removeprefix("unix:"))
    writer = await GuestClient.connect(await relay.start(), name="W")
    handle = await writer.open("f", os.O_RDWR)
    writing = asyncio.ensure_future(writer.write(handle, 0, b"AAAA"))
    recall = await holder.next_invalidation()  # the first attempt waits on this recall
    relay.cut()  # the writer's connection is lost while it waits
    await until(lambda: writer.sessions == 2 and writer.connected, "the writer to reconnect")
    holder.ack(recall.seq)
    try:
        result = await writing
    except HostError as exc:
        pytest.fail(f"the retried write failed with {errno.errorcode[exc.errno]}; "
                    f"file holds {(export / 'f').read_bytes()!r}")
    assert result.size == 4 and (export / "f").read_bytes() == b"AAAA0000"
    await writer.close()
    await relay.close()


# --- promise 4: the reply cache forgets clients ----------------------------------------------


async def test_a_retried_write_is_carried_out_once_even_after_other_clients_churn(
        export, start_host, tmp_path):
    """The reply cache keeps at most 4 * max_sessions = 256 clients, least recently
    used first out.  Between a lost reply and its retry, 256 other client ids
    (reconnecting peers, each sending one UNLINK of a name that does not exist)
    push the writer's entry out, and the retry is carried out a second time, on
    top of another guest's later write."""
    (export / "f").write_bytes(b"0" * 8)
    _, address = _host(start_host, export)
    relay = Relay(str(tmp_path / "relay.sock"), address.removeprefix("unix:"))
    a = await GuestClient.connect(await relay.start(), name="A")
    b = await GuestClient.connect(address, name="B", reconnect=False)
    ha, hb = await a.open("f", os.O_RDWR), await b.open("f", os.O_RDWR)
    relay.hold_replies = True
    writing = asyncio.ensure_future(a.write(ha, 0, b"AAAA"))
    await until(lambda: (export / "f").read_bytes() == b"AAAA0000", "A's write landing")
    relay.admit.clear()
    relay.hold_replies = False
    relay.cut()
    await b.write(hb, 0, b"BBBB")
    for i in range(256):
        peer = await RawGuest.connect(address, f"churn{i}")
        assert (await peer.call(ROOT, Unlink(b"no-such-name"))).error == -errno.ENOENT
        peer.close()
        await peer.lost
    relay.admit.set()
    await writing
    assert (export / "f").read_bytes() == b"BBBB0000", "A's write was carried out twice"
    await a.close()
    await b.close()
    await relay.close()


# --- the re-opened handle's identity check -------------------------------------------------


async def test_a_handle_reopened_onto_a_recreated_file_with_a_reused_inode_number_is_stale(
        export, start_host, tmp_path):
    """`_reopen_files` compares st_ino only.  ext4 hands a freed inode number to
    the next file created (`rm f; echo > f`, git checkout), so a file deleted
    and created again while the guest is away passes the check, and the old
    handle reads another file."""
    (export / "f").write_bytes(b"original")
    _, address = _host(start_host, export)
    relay = Relay(str(tmp_path / "relay.sock"), address.removeprefix("unix:"))
    a = await GuestClient.connect(await relay.start(), name="A")
    handle = await a.open("f", os.O_RDWR)
    await a.write(handle, 0, b"original")  # its own write ends its lease: nothing keeps the inode
    old_ino = (export / "f").stat().st_ino
    relay.admit.clear()
    lost = a.session.closed
    relay.cut()
    await lost
    # The host forgets A's node ids (it held no lease) and closes its fds on f;
    # until then the unlinked inode stays allocated and its number is not reused.
    deadline = time.monotonic() + 10
    while True:
        os.unlink(export / "f")
        (export / "f").write_bytes(b"imposter")
        if (export / "f").stat().st_ino == old_ino:
            break
        if time.monotonic() > deadline:
            pytest.skip("this file system did not reuse the inode number")
        await asyncio.sleep(0.01)  # waiting for the host to let go of the old inode
    relay.admit.set()
    try:
        data = (await a.read(handle, 0, 8)).data
    except HostError as exc:
        assert exc.errno == errno.ESTALE
    else:
        pytest.fail(f"read {data!r} through the handle opened on the deleted file")
    finally:
        await a.close()
        await relay.close()


# --- promise 2: no reply renews a guest that owes an ACK ------------------------------------


async def test_an_enosys_reply_to_a_guest_that_owes_an_ack_does_not_renew_it(export, start_host):
    """`HostDaemon.feed` answers an opcode it does not know with a bare
    FsReply(-ENOSYS), which bypasses `_serve_request` and so `Session.renews`:
    its lease trailer lacks LEASE_NOT_RENEWED, and a guest that applies the
    protocol's rule (a reply without the flag renews, counted from when it sent
    the request) extends its term while the host's fencing instant stands
    still.  (The library client and the mount never send such an opcode; a
    guest of a later protocol revision would.)"""
    from protocol.messages import LEASE_NOT_RENEWED

    (export / "f").write_bytes(b"f" * 64)
    _, address = _host(start_host, export)
    holder = await RawGuest.connect(address, "holder")
    writer = await RawGuest.connect(address, "writer")
    await holder.lease("f")
    w_node, w_fh = await writer.open("f", os.O_RDWR)
    writer.send(w_node, Write(w_fh, 0, b"F"))
    await holder.next_invalidation()  # owed, and never ACKed
    unique = holder._next
    holder._next += 1
    holder._replies[unique] = future = asyncio.get_running_loop().create_future()
    frame = bytearray(holder.conn.send(FsRequest(unique, ROOT, Getattr())))
    frame[16:20] = (9999).to_bytes(4, "little")  # fuse_in_header.opcode: one the host lacks
    holder.transport.write(bytes(frame))
    reply = await asyncio.wait_for(future, 10)
    assert reply.error == -errno.ENOSYS
    assert reply.lease.flags & LEASE_NOT_RENEWED, reply.lease


# --- what held: regression tests --------------------------------------------------------


async def test_renewal_stays_withheld_while_any_of_two_acks_is_owed_and_a_late_ack_revives_nothing(
        export, start_host):
    """Two recalls of different inodes owed by one guest: ACKing one does not let
    its replies renew while the other is still owed; once it is fenced, a late
    ACK changes nothing (its heartbeats and requests still say EKEYEXPIRED)."""
    for name in ("x", "y", "z"):
        (export / name).write_bytes(name.encode() * 64)
    _, address = _host(start_host, export)
    holder = await RawGuest.connect(address, "holder")
    writer = await RawGuest.connect(address, "writer")
    for name in ("x", "y", "z"):
        await holder.lease(name)
    handles = {name: await writer.open(name, os.O_RDWR) for name in ("x", "y", "z")}

    def write(name):
        node, fh = handles[name]
        return writer.send(node, Write(fh, 0, b"W"))

    wx = write("x")
    rx = await holder.next_invalidation()
    wy = write("y")
    ry = await holder.next_invalidation()
    holder.ack(rx.seq)
    assert (await writer.reply(wx)).error == 0  # the host has the first ACK
    assert (await holder.heartbeat()).error == -errno.EAGAIN  # the second is still owed
    holder.ack(ry.seq)
    assert (await writer.reply(wy)).error == 0
    assert (await holder.heartbeat()).error == 0
    wz = write("z")
    rz = await holder.next_invalidation()  # never ACKed in time
    assert (await writer.reply(wz)).error == 0  # fenced
    holder.ack(rz.seq)  # late
    assert (await holder.heartbeat()).error == -errno.EKEYEXPIRED
    assert (await holder.getattr(ROOT)).error == -errno.EKEYEXPIRED


async def test_a_rename_between_two_directories_that_fails_leaves_both_leasable_and_cacheable(
        export, start_host):
    """Both nested namespace_change exits run when the body raises (ENOENT):
    each directory can be leased again and its LOOKUPs are cacheable again."""
    (export / "a").mkdir()
    (export / "b").mkdir()
    (export / "a" / "present").write_bytes(b"p")
    _, address = _host(start_host, export)
    holder = await RawGuest.connect(address, "holder")
    a = await holder.call(ROOT, Lookup(b"a"))
    b = await holder.call(ROOT, Lookup(b"b"))
    assert a.lease.granted and b.lease.granted
    renamer = await RawGuest.connect(address, "renamer")
    a_node = (await renamer.call(ROOT, Lookup(b"a"))).body.nodeid
    b_node = (await renamer.call(ROOT, Lookup(b"b"))).body.nodeid
    rename = renamer.send(a_node, Rename(b_node, b"missing", b"missing"))
    for _ in range(2):  # INVAL_ENTRY of a, then of b
        holder.ack((await holder.next_invalidation()).seq)
    assert (await renamer.reply(rename)).error == -errno.ENOENT
    assert (await holder.getattr(a_node)).lease.granted
    assert (await holder.getattr(b_node)).lease.granted
    entry = await holder.call(a_node, Lookup(b"present"))
    assert entry.error == 0 and entry.body.entry_valid > 0


async def test_a_write_refused_to_a_fenced_session_is_carried_out_by_its_retry_once(
        export, start_host):
    """The first attempt is refused (EKEYEXPIRED) before anything is recorded in
    the reply cache; the retry on the new session is carried out, once (an
    O_APPEND handle would show a second landing)."""
    (export / "y").write_bytes(b"y" * 64)
    (export / "log").write_bytes(b"")
    _, address = _host(start_host, export)
    wedged = await GuestClient.connect(address, name="wedged", heartbeat=False)
    stuck = asyncio.get_running_loop().create_future()
    wedged.on_invalidate = lambda event: stuck
    hy = await wedged.open("y")
    await wedged.read(hy, 0, 64)
    log = await wedged.open("log", os.O_WRONLY | os.O_APPEND)
    other = await GuestClient.connect(address, name="other", reconnect=False)
    await other.write(await other.open("y", os.O_RDWR), 0, b"Y")  # returns once wedged is fenced
    assert (await wedged.write(log, 0, b"once\n")).size == 5
    assert wedged.sessions == 2
    assert (export / "log").read_bytes() == b"once\n"
    stuck.set_result(None)
    await wedged.close()
    await other.close()


async def test_a_stale_handle_can_be_closed(export, start_host, tmp_path):
    """A handle `_reopen_files` marked stale keeps the old session's fh; closing
    it sends RELEASE(old fh) on the new session, which answers EBADF, and
    `close_file` raises it: the application cannot close the handle it was
    told to re-open."""
    (export / "f").write_bytes(b"original")
    _, address = _host(start_host, export)
    relay = Relay(str(tmp_path / "relay.sock"), address.removeprefix("unix:"))
    a = await GuestClient.connect(await relay.start(), name="A")
    handle = await a.open("f")
    relay.admit.clear()
    lost = a.session.closed
    relay.cut()
    await lost
    (export / "new").write_bytes(b"imposter")
    os.replace(export / "new", export / "f")
    relay.admit.set()
    with pytest.raises(HostError) as stale:
        await a.read(handle, 0, 8)
    assert stale.value.errno == errno.ESTALE
    await a.close_file(handle)  # must not raise
    await a.close()
    await relay.close()


async def test_a_holder_whose_connection_drops_while_it_owes_an_ack_is_waited_for_until_its_term(
        export, start_host):
    """A lost connection is not an ACK, also when the invalidation was already
    sent: the write waits until the holder's frozen term has run out."""
    (export / "f").write_bytes(b"f" * 64)
    _, address = _host(start_host, export)
    holder = await RawGuest.connect(address, "holder")
    writer = await RawGuest.connect(address, "writer")
    node, fh = await holder.open("f")
    read = holder.send(node, Read(fh, 0, 64))
    assert (await holder.reply(read)).lease.granted
    w_node, w_fh = await writer.open("f", os.O_RDWR)
    write = writer.send(w_node, Write(w_fh, 0, b"F"))
    await holder.next_invalidation()
    holder.close()
    assert (await writer.reply(write)).error == 0
    assert time.monotonic() >= holder.sent_at[read] + TERM


async def test_a_departed_session_is_waited_for_even_after_its_client_reconnected(
        export, start_host, tmp_path):
    """The same client back on a new session does not end its old session's
    term: a mount's kernel may still hold the old pages."""
    (export / "f").write_bytes(b"f" * 64)
    _, address = _host(start_host, export)
    relay = Relay(str(tmp_path / "relay.sock"), address.removeprefix("unix:"))
    a = await GuestClient.connect(await relay.start(), name="A", heartbeat=False)
    handle = await a.open("f")
    before_read = time.monotonic()
    await a.read(handle, 0, 64)
    assert (await a.read(handle, 0, 64)).hit
    relay.cut()
    await until(lambda: a.sessions == 2 and a.connected, "A to reconnect")
    writer = await GuestClient.connect(address, name="W", reconnect=False)
    await writer.write(await writer.open("f", os.O_RDWR), 0, b"F")
    assert time.monotonic() >= before_read + TERM
    await writer.close()
    await a.close()
    await relay.close()


# --- memory ---------------------------------------------------------------------------------


async def test_the_lease_table_does_not_grow_with_forgotten_inodes(export, tmp_path):
    """Every LOOKUP after the inode was forgotten issues a new node id (they are
    never reused), and `LeaseTable.forget_inode` is never called: the table
    keeps one InodeLeases per node id ever leased, and `holds_any` /
    `drop_holder` (run on every lost connection) walk all of them."""
    from host.server import HostConfig, HostDaemon
    from protocol.messages import Forget

    (export / "f").write_bytes(b"f")
    daemon = HostDaemon(HostConfig(str(export)))
    address = await daemon.start(f"unix:{tmp_path / 'inproc.sock'}")
    try:
        guest = await RawGuest.connect(address, "cycler")
        for _ in range(500):
            entry = await guest.call(ROOT, Lookup(b"f"))
            assert entry.lease.granted
            guest.transport.write(guest.conn.send(
                FsRequest(guest._next, entry.body.nodeid, Forget(1))))
            guest._next += 1
        await guest.getattr(ROOT)  # the FORGETs before it have been handled
        assert len(daemon.leases._inodes) < 50, len(daemon.leases._inodes)
    finally:
        await daemon.close()
        daemon.fs.close()


async def test_a_write_whose_reply_was_lost_across_a_host_restart_is_not_repeated(
        export, start_host, tmp_path):
    """No reply cache survives a restart: the retry must raise OutcomeUnknown, not
    land again on top of a later write."""
    from guest.client import OutcomeUnknown

    (export / "f").write_bytes(b"0" * 8)
    host, address = _host(start_host, export)
    relay = Relay(str(tmp_path / "relay.sock"), address.removeprefix("unix:"))
    a = await GuestClient.connect(await relay.start(), name="A")
    ha = await a.open("f", os.O_RDWR)
    relay.hold_replies = True
    writing = asyncio.ensure_future(a.write(ha, 0, b"AAAA"))
    await until(lambda: (export / "f").read_bytes() == b"AAAA0000", "A's write landing")
    relay.admit.clear()
    relay.hold_replies = False
    relay.cut()
    host.proc.kill()
    host.proc.wait(10)
    _host(start_host, export, address=address)
    (export / "f").write_bytes(b"BBBB0000")  # a later write, while A is away
    relay.admit.set()
    with pytest.raises(OutcomeUnknown):
        await writing
    assert (export / "f").read_bytes() == b"BBBB0000"
    await a.close()
    await relay.close()
