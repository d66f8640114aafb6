"""The fault peers of `cleanlease chaos` (workload/chaos_peers.py), each against a real host,
and the chaos report's bookkeeping (workload/chaos.py).

Each peer test forces its fault once and checks both what the host promised and
that the peer's own checks see it: a peer that could not see a broken promise
would make `make chaos` pass for nothing.  Orderings are waited for on the
peers' own words (HOLDING, READY, INSIDE) or on exits, never on time passing.
"""

from __future__ import annotations

import asyncio
import json
import os
import select
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

from tests.conftest import ROOT
from workload import stamp as stamps
from workload.checker import check
from workload.oplog import ReadRecord, WriteRecord, read_logs

TERM_MS, ACK_MS = 1000, 300
BOUND_S = ACK_MS / 1000 + TERM_MS / 1000 * 1.01 + 0.05
BLOCKS = 4


def _stamped_file(path, file_id=0, blocks=BLOCKS) -> None:
    with open(path, "wb") as f:
        f.write(b"".join(stamps.make_block(stamps.Stamp.initial(file_id, b)) for b in range(blocks)))
        os.fsync(f.fileno())


class Peer:
    """One peer process; `line()` waits for its next stdout line (a peer's own word)."""

    def __init__(self, tmp_path, name, *argv, stdin=False):
        self.log = str(tmp_path / f"{name}.log")
        self.stats_path = str(tmp_path / f"{name}.json")
        open(self.log, "w").close()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "workload.chaos_peers", *argv, "--actor", name,
             "--log", self.log, "--stats", self.stats_path],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL, text=True, bufsize=1)

    def line(self, timeout=30.0) -> str:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        assert ready, f"no line within {timeout} s"
        line = self.proc.stdout.readline()
        assert line, f"exited: {self.proc.wait()} {self.proc.stderr.read()[-2000:]}"
        return line.strip()

    def tell(self, line: str) -> None:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def stats(self, timeout=60.0) -> dict:
        assert self.proc.wait(timeout) == 0, self.proc.stderr.read()[-2000:]
        with open(self.stats_path) as f:
            return json.load(f)


def test_silent_holders_stall_a_writer_once_and_learn_their_fence_from_a_heartbeat(
        export, start_host, tmp_path):
    """Three sessions heartbeat and never ACK: the writer waits once, within ack timeout
    + term (+ margin), not three times; none is renewed while it owes the ACK; each
    learns its fence from a heartbeat; nothing they could still serve was overwritten
    while their leases were live."""
    _stamped_file(export / "f.dat")
    _, address = start_host(export, "--ack-timeout", str(ACK_MS), "--lease-term", str(TERM_MS),
                            "--detector", "none")
    holders = Peer(tmp_path, "sh", "silent-holders", address, "--count", "3", "--for", "1.0",
                   "--files", "f.dat:0:4", "--bound-ms", str(BOUND_S * 1000), "--signal")
    assert holders.line() == "READY"
    assert holders.line() == "HOLDING"
    writer = Peer(tmp_path, "iw", "inflight-writes", address, "--file", "f.dat:0:4",
                  "--writes", "1", "--writer-id", "7", stdin=True)
    assert writer.line() == "READY"
    writer.tell("GO")
    w = writer.stats()
    h = holders.stats()
    (start, end), = w["modifications"]
    stall = (end - start) / 1e9
    assert ACK_MS / 1000 <= stall <= BOUND_S, stall
    assert h["owed_sessions"] >= 3 and h["fences_learned"] == h["owed_sessions"], h
    assert h["renewed_while_owed"] == 0 and h["never_fenced"] == 0 and h["fenced_unowed"] == 0, h
    assert h["withheld_heartbeats"] >= 1, h  # a heartbeat while owing: not renewed
    assert max(h["fence_learned_ms"]) <= (BOUND_S + TERM_MS / 3000 + 0.2) * 1000, h
    assert h["last_instant_reads"] >= 3 * BLOCKS, h
    result = check(read_logs([holders.log, writer.log]))
    assert result.reads > 0 and result.ok, result.examples


def test_last_instant_reads_catch_a_write_that_lands_while_a_lease_is_live(tmp_path):
    """The instrument itself: a silent holder's last-instant read of the version it
    held is stale against a write that completed before its term ended."""
    held = ReadRecord("sh1", 0, 0, 0, 0, 2_000, 2_000, True, 1, None)
    landed_early = WriteRecord("g0", 0, 0, 1, 1, 1_000, 1_500, True, "guest")
    landed_late = WriteRecord("g0", 0, 0, 1, 1, 1_000, 2_500, True, "guest")
    assert check([held, landed_early]).stale_reads == 1
    assert check([held, landed_late]).stale_reads == 0


def test_a_failing_write_publishes_its_generation_and_the_file_leads_back_to_clean(
        export, start_host, tmp_path):
    """The peer's write at 2**50 fails with EFBIG after recalling our copy; the error
    reply carries the generation our INVALIDATE had, and a later read is leased again."""
    from protocol.messages import Read
    from workload.chaos_peers import RawSession

    _stamped_file(export / "f.dat")
    _, address = start_host(export, "--ack-timeout", str(ACK_MS), "--lease-term", str(TERM_MS),
                            "--detector", "none")

    async def run():
        holder = await RawSession.open(address, "holder", None, auto_ack=True)
        nodeid, fh = await holder.open_file("f.dat", os.O_RDONLY)
        first = await holder.call(nodeid, Read(fh, 0, BLOCKS * stamps.BLOCK_SIZE))
        assert first.lease.granted
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "workload.chaos_peers", "failing-write", address,
            "--file", "f.dat:0:4", "--actor", "fw", "--log", str(tmp_path / "fw.log"),
            "--stats", str(tmp_path / "fw.json"), cwd=ROOT, stdout=subprocess.DEVNULL)
        assert await asyncio.wait_for(proc.wait(), 60) == 0
        holder.close()
        return first.lease.generation, holder.received

    granted, received = asyncio.run(run())
    st = json.load(open(tmp_path / "fw.json"))
    assert st["done"] and st["efbig"] and st["errno"] == 27, st
    assert st["generation_published"] and st["clean_again"], st
    invalidations = [m for _, m in received]
    assert len(invalidations) == 1 and invalidations[0].generation == st["generation"] > granted
    assert os.path.getsize(export / "f.dat") == BLOCKS * stamps.BLOCK_SIZE


def test_namespace_churn_never_lets_a_reader_resolve_a_name_to_its_old_file(
        export, start_host, tmp_path):
    """Concurrent renames over one name (and creates and unlinks beside it) in the root
    and in a sub-directory, while a reader that caches entries under the directories'
    leases opens the name again and again: every read returns a version no completed
    rename had replaced, and the final names hold the last renames' versions."""
    _, address = start_host(export, "--ack-timeout", str(ACK_MS), "--lease-term", str(TERM_MS),
                            "--detector", "none")
    common = ["--for", "1.5", "--dirs", ".,churn.d", "--file-ids", "100,101", "--side", "s.dat"]
    churn = Peer(tmp_path, "nc", "namespace-churn", address, *common, "--writer-id", "9")
    assert churn.line() == "READY"  # churn.d exists now
    reader = Peer(tmp_path, "nr", "name-reader", address, *common)
    c, r = churn.stats(), reader.stats()
    assert c["renames"] > 20 and not c["uncertain"], c
    assert r["reads"] > 20 and r["entry_hits"] > 0, r  # it did cache entries
    finals = []
    for path, file_id in (("s.dat", 100), ("churn.d/s.dat", 101)):
        s = stamps.parse_block((export / path).read_bytes())
        finals.append(ReadRecord("final", file_id, 0, s.writer, s.seq, 1 << 62, 1 << 62, False,
                                 0, None))
    result = check(read_logs([churn.log, reader.log]) + finals)
    assert result.ok and result.stale_reads == 0, result.examples


@pytest.mark.parametrize("mode", ["direct", "buffered"])
def test_a_host_write_held_inside_write_gets_no_lease_granted_meanwhile(
        export, start_host, tmp_path, mode):
    """A host-local write (O_DIRECT, or buffered) stalled inside write(2): our copy was
    recalled before it got there, no read is leased while it is inside, and the stamped
    block it wrote is in the file afterwards."""
    from host.fanotify_detector import FanotifyDetector
    from protocol.messages import Read
    from workload.chaos_peers import RawSession

    ok, why = FanotifyDetector.usable(str(export))
    if not ok:
        pytest.skip(f"fanotify detector unavailable: {why}")
    _stamped_file(export / "f.dat")
    _, address = start_host(export, "--ack-timeout", str(ACK_MS), "--lease-term", str(TERM_MS),
                            "--detector", "fanotify")

    async def run():
        holder = await RawSession.open(address, "holder", None, auto_ack=True)
        nodeid, fh = await holder.open_file("f.dat", os.O_RDONLY)
        assert (await holder.call(nodeid, Read(fh, 0, 4096))).lease.granted
        writer = Peer(tmp_path, "hw", "host-write", str(export), "--mode", mode, "--writes", "1",
                      "--hold", "--files", "f.dat:0:4", "--writer-id", "11", stdin=True)
        loop = asyncio.get_running_loop()
        assert await loop.run_in_executor(None, writer.line) == "READY"
        said = await loop.run_in_executor(None, writer.line)
        if said != "INSIDE":
            pytest.skip(f"the writer could not stall inside write(2): {said}")
        assert holder.invalidations == 1  # recalled before the write got inside
        grants = []
        for _ in range(20):  # the write stays inside while we read: none may be granted
            grants.append((await holder.call(nodeid, Read(fh, 0, 4096))).lease.granted)
            await asyncio.sleep(0.01)
        writer.tell("RELEASE")
        st = await loop.run_in_executor(None, writer.stats)
        holder.close()
        return grants, st

    grants, st = asyncio.run(run())
    assert not any(grants), grants
    assert st["writes"] == 1 and st["stalled"] == 1 and st["uffd"] == "ok", st
    (file_id, block, seq, opened, pwrite, end), = st["detail"]
    s = stamps.parse_block((export / "f.dat").read_bytes()[block * 4096:(block + 1) * 4096])
    assert (s.file_id, s.block, s.writer, s.seq) == (0, block, 11, seq)


# --- the report's bookkeeping ----------------------------------------------------------------


def _injector(tmp_path, detector="fanotify", seed=1):
    from workload.chaos import _Injector

    sim = SimpleNamespace(run_dir=str(tmp_path), detector=detector)
    injector = _Injector(sim, seed, duration=30.0, mean_gap_s=0.3)
    injector.plan()
    return injector


def test_the_schedule_gives_every_class_once_in_every_block_of_faults(tmp_path):
    from workload.chaos import FAULTS

    injector = _injector(tmp_path)
    kinds = [k for _, k in injector.schedule]
    assert len(kinds) >= 2 * len(FAULTS)
    for i in range(0, len(kinds) - len(FAULTS) + 1, len(FAULTS)):
        assert sorted(kinds[i:i + len(FAULTS)]) == sorted(FAULTS)


def test_without_fanotify_the_host_local_classes_are_skipped_and_said_so(tmp_path):
    from workload.chaos import HOST_LOCAL_FAULTS

    injector = _injector(tmp_path, detector="inotify")
    kinds = {k for _, k in injector.schedule}
    assert not kinds & set(HOST_LOCAL_FAULTS)
    assert set(injector.skipped) == set(HOST_LOCAL_FAULTS)


def test_only_host_writes_opened_before_the_serving_daemon_came_up_are_not_held():
    from workload.chaos import _held_check, _unheld_host_writes

    peer = SimpleNamespace(name="hw3")
    stats = {"kind": "host-write", "writer": 5002,
             "detail": [[0, 0, 1, 100, 110, 500],      # opened before the restart's end
                        [0, 0, 2, 700, 710, 800]]}     # opened after it: held
    restarts = [(200, 400)]  # killed, ready
    unheld = _unheld_host_writes([(peer, stats)], restarts)
    assert unheld == {(0, 0, 5002, 1)}
    writes = [WriteRecord("hw3", 0, 0, 5002, 1, 100, 500, None, "host-local"),
              WriteRecord("hw3", 0, 0, 5002, 2, 700, 800, None, "host-local")]
    early = ReadRecord("sh1", 0, 0, 0, 0, 600, 600, True, 1, None)  # stale after seq 1 only
    late = ReadRecord("sh1", 0, 0, 5002, 1, 900, 900, True, 2, None)  # stale after seq 2
    assert check(writes + [early, late]).stale_reads == 2
    assert _held_check(writes + [early, late], unheld).stale_reads == 1


def test_a_torn_block_counts_only_where_no_host_local_write_overlapped_it():
    from workload.checker import corrupt_reads

    host = WriteRecord("hw2", 0, 1, 5001, 1, 100, 200, None, "host-local")
    guest = WriteRecord("g0", 0, 2, 1, 1, 100, 200, True, "guest")
    torn_by_host = ReadRecord("g1", 0, 1, -1, -1, 150, 160, False, 1, "checksum")
    torn_alone = ReadRecord("g1", 0, 2, -1, -1, 150, 160, False, 2, "checksum")
    assert corrupt_reads([host, guest, torn_by_host, torn_alone], [host, guest]) == (1, 1)


def test_the_report_lists_every_broken_promise():
    from workload.chaos import ChaosReport

    assert ChaosReport(1, 1.0, stall_bound_ms=1360).broken() == []
    r = ChaosReport(1, 1.0, stall_bound_ms=1360, worst_write_stall_ms=1400,
                    worst_write_stall_what="g0", renewed_while_owed=1, failing_writes=2,
                    failing_efbig=2, failing_published=2, failing_clean_again=1)
    broken = r.broken()
    assert any("1400 ms" in b for b in broken) and any("renewals" in b for b in broken)
    assert any("CLEAN again" in b for b in broken) and len(broken) == 3


# --- what `make chaos` found (issue 11): forced once each, failing until fixed --------------


@pytest.mark.parametrize("mode", ["direct", "buffered"])
def test_a_host_write_inside_write2_across_a_daemon_restart_is_not_leased_over(
        export, start_host, tmp_path, mode):
    """Found by `make chaos` (restart-host-write-in-flight, a documented gap
    until now): a host write that got past the old daemon's event, still inside
    write(2) when a new daemon starts, raised no event the new daemon saw, so
    its first read was leased and the write then landed under that lease.  The
    new daemon now scans for such threads right after marking the export
    (`FanotifyDetector._seed_in_flight`), and arms the file only once they are
    done."""
    from host.fanotify_detector import FanotifyDetector
    from protocol.messages import Read
    from workload.chaos_peers import RawSession

    ok, why = FanotifyDetector.usable(str(export))
    if not ok:
        pytest.skip(f"fanotify detector unavailable: {why}")
    _stamped_file(export / "f.dat")
    args = ("--ack-timeout", str(ACK_MS), "--lease-term", str(TERM_MS), "--detector", "fanotify")
    host, address = start_host(export, *args)
    writer = Peer(tmp_path, "hw", "host-write", str(export), "--mode", mode, "--writes", "1",
                  "--hold", "--files", "f.dat:0:4", "--writer-id", "11", stdin=True)
    try:
        assert writer.line() == "READY"
        said = writer.line()
        if said != "INSIDE":
            pytest.skip(f"the writer could not stall inside write(2): {said}")
        host.proc.kill()
        host.proc.wait(10)
        start_host(export, *args, address=address)

        async def reads(count: int) -> list[bool]:
            reader = await RawSession.open(address, "reader", None, auto_ack=True)
            nodeid, fh = await reader.open_file("f.dat", os.O_RDONLY)
            granted = [(await reader.call(nodeid, Read(fh, 0, 4096))).lease.granted
                       for _ in range(count)]
            reader.close()
            return granted

        inside = asyncio.run(reads(3))  # the write is still inside write(2)
    finally:
        writer.tell("RELEASE")
        writer.stats()
    assert inside == [False, False, False]
    after = asyncio.run(reads(2))  # it has landed: leased again (the first read arms)
    assert after[-1] is True, after


def test_a_restarted_host_waits_out_the_terms_its_previous_boot_granted(export, start_host):
    """Found by `make chaos` (restart-guest-write-in-flight), a strict xfail until
    host/boot.py: a restarted host let a write land at once, inside a lease its
    predecessor had granted (a mount's kernel keeps its pages after the kill)."""
    from protocol.messages import Read, Write
    from workload.chaos_peers import RawSession

    _stamped_file(export / "f.dat")
    args = ("--ack-timeout", str(ACK_MS), "--lease-term", str(TERM_MS), "--detector", "none")
    host, address = start_host(export, *args)

    async def hold():
        holder = await RawSession.open(address, "holder", None)
        nodeid, fh = await holder.open_file("f.dat", os.O_RDONLY)
        assert (await holder.call(nodeid, Read(fh, 0, 4096))).lease.granted
        await holder.heartbeat()
        holder.close()
        return holder.expiry_ns()  # where its term ends, by its own clock

    async def write():
        writer = await RawSession.open(address, "writer", None, auto_ack=True)
        nodeid, fh = await writer.open_file("f.dat", os.O_RDWR)
        reply = await writer.call(nodeid, Write(fh, 0, stamps.make_block(
            stamps.Stamp(0, 0, 7, 1, 0))))
        assert reply.error == 0, reply
        return time.monotonic_ns()

    term_end = asyncio.run(hold())
    host.proc.kill()
    host.proc.wait(10)
    start_host(export, *args, address=address)
    landed = asyncio.run(write())
    assert landed >= term_end, f"landed {(term_end - landed) / 1e6:.0f} ms inside the old lease"


def _writer_inside_write(tmp_path, export) -> "Peer":
    """A host-local writer stopped inside write(2) on f.dat: it holds the inode's
    lock (ext4_buffered_write_iter) until told RELEASE; nothing written yet."""
    writer = Peer(tmp_path, "hw", "host-write", str(export), "--mode", "buffered", "--writes",
                  "1", "--hold", "--files", "f.dat:0:4", "--writer-id", "11", stdin=True)
    assert writer.line() == "READY"
    try:
        said = writer.line(timeout=10.0)
    except AssertionError:  # a stall the userfaultfd handler never saw (about 1 run in 6 here)
        said = f"no INSIDE in 10 s; its kernel stack: {_kernel_stack(writer.proc.pid)}"
    if said != "INSIDE":
        writer.tell("RELEASE")
        writer.proc.kill()
        pytest.skip(f"the writer could not stall inside write(2): {said}")
    return writer


def _kernel_stack(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stack") as f:
            return " < ".join(line.split()[1] for line in f.read().splitlines()[:6])
    except OSError as exc:
        return f"unreadable ({exc.strerror})"


async def _writer_of_a_dirty_file(address: str):
    """(writer session, another session, nodeid, fh) with f.dat open for write
    and DIRTY (written once; run the host with a long --clean-after): the next
    WRITE has no recall to wait for, so the daemon reaches its pwrite in the
    step that received it."""
    from protocol.messages import Write
    from workload.chaos_peers import RawSession

    w = await RawSession.open(address, "w", None, auto_ack=True)
    r = await RawSession.open(address, "r", None, auto_ack=True)
    nodeid, fh = await w.open_file("f.dat", os.O_RDWR)
    assert (await w.call(nodeid, Write(fh, 8192, b"F" * 16))).error == 0
    return w, r, nodeid, fh


def test_a_guest_write_waiting_for_an_inode_lock_does_not_stop_the_daemon(
        export, start_host, tmp_path):
    """Found by make chaos (host-buffered-long).  Before the fix the daemon's
    pwrite ran on its event loop: a guest WRITE to a file whose inode lock a
    host-local writer holds stopped the whole daemon (D state), no guest
    answered, for as long as the host writer was inside write(2)."""
    from protocol.messages import Getattr, Write
    from workload.chaos_peers import RawSession

    _stamped_file(export / "f.dat")
    _, address = start_host(export, "--detector", "none", "--clean-after", "100000")

    async def run():
        w, r, nodeid, fh = await _writer_of_a_dirty_file(address)
        writer = _writer_inside_write(tmp_path, export)
        try:
            blocked = asyncio.ensure_future(w.call(nodeid, Write(fh, 4096, b"G" * 16)))
            await asyncio.sleep(0)  # one turn of the loop: that task sends its WRITE now
            reply = await asyncio.wait_for(r.call(1, Getattr()), 2.0)
            return reply.error, blocked.done()
        except asyncio.TimeoutError:
            return "no reply to another guest within 2 s", blocked.done()
        finally:
            writer.tell("RELEASE")
            writer.stats()
            await asyncio.wait_for(blocked, 30)

    assert asyncio.run(run()) == (0, False)


def test_no_lease_is_granted_while_a_guest_write_is_still_inside_its_system_call(
        export, start_host, tmp_path):
    """A guest WRITE blocked on the inode lock (its pwrite on a worker thread) is
    a modification in flight: an FSYNC that completes meanwhile must not make
    the inode CLEAN again, or a reader would be granted the bytes the WRITE is
    about to replace, and nobody would recall it.  Before the fix the daemon
    stopped altogether (the FSYNC was never answered); with the write off the
    loop but no in-flight count, the READ after the FSYNC was granted."""
    from protocol.messages import Fsync, Read, Write
    from workload.chaos_peers import RawSession

    _stamped_file(export / "f.dat")
    _, address = start_host(export, "--detector", "none", "--clean-after", "100000")

    async def run():
        w, r, nodeid, fh = await _writer_of_a_dirty_file(address)
        holder = _writer_inside_write(tmp_path, export)
        try:
            # Into the page the first write dirtied (range granularity: only it
            # is dirty, and a read of it is what the write is about to change).
            blocked = asyncio.ensure_future(w.call(nodeid, Write(fh, 8192 + 32, b"G" * 16)))
            await asyncio.sleep(0)  # one turn of the loop: that task sends its WRITE now
            synced = await asyncio.wait_for(w.call(nodeid, Fsync(fh)), 5.0)
            assert synced.error == 0 and not blocked.done()
            r_node, r_fh = await r.open_file("f.dat", os.O_RDONLY)
            read = await r.call(r_node, Read(r_fh, 8192, 4096))
            granted_while_in_flight = read.lease.granted
        finally:
            holder.tell("RELEASE")
            holder.stats()
        assert (await asyncio.wait_for(blocked, 30)).error == 0
        return granted_while_in_flight

    assert asyncio.run(run()) is False


def test_a_reader_released_while_a_guest_write_is_in_flight_is_recalled_before_its_reply(
        export, start_host, tmp_path):
    """Found by `cleanlease chaos-mount` (seed 2, a mapping read old bytes 0.6 ms
    after a write returned).  A mount-like reader of a file whose guest WRITE is
    in flight (its pwrite waits for the inode lock) is held; when it comes to
    owe the ACK of another recall it is answered at once, with the bytes from
    before the write.  The write must then recall it before it is answered;
    before the fix nothing did."""
    from protocol import wire
    from protocol.messages import Read, Write
    from raw_guest import RawGuest

    _stamped_file(export / "f.dat")
    (export / "y").write_bytes(b"y" * 64)
    _, address = start_host(export, "--detector", "none", "--clean-after", "100000")
    mount_like = wire.SUPPORTED_FEATURES | wire.FEATURE_CACHES_UNLEASED

    async def run():
        mount = await RawGuest.connect(address, "mount", features=mount_like)
        f_node, m_fh = await mount.open("f.dat")  # CLEAN: a lease, no taint
        y_node, _ = await mount.lease("y")
        w = await RawGuest.connect(address, "w")
        _, w_fh = await w.open("f.dat", os.O_RDWR)
        wy_node, wy_fh = await w.open("y", os.O_RDWR)
        first = w.send(f_node, Write(w_fh, 8192, b"F" * 16))
        mount.ack((await mount.next_invalidation()).seq)
        assert (await w.reply(first)).error == 0  # DIRTY now, and nobody tainted
        holder = _writer_inside_write(tmp_path, export)
        try:
            # No recall to wait for: the daemon is in its pwrite (waiting for
            # the inode lock) by the time it answers what w sent next.
            write = w.send(f_node, Write(w_fh, 0, b"G" * 16))
            await w.getattr(f_node)
            read = mount.send(f_node, Read(m_fh, 0, 16))
            await mount.getattr(y_node)  # the READ was taken in: held now
            assert not mount._replies[read].done()
            write_y = w.send(wy_node, Write(wy_fh, 0, b"Y"))
            inval_y = await mount.next_invalidation()
            got = await mount.reply(read)  # released: it owes an ACK now
            mount.ack(inval_y.seq)
            assert (await w.reply(write_y)).error == 0
        finally:
            holder.tell("RELEASE")
            holder.stats()
        again = await mount.next_invalidation()
        assert again.ino == f_node, again
        assert not w._replies[write].done(), "the writer was answered before the reader's purge"
        mount.ack(again.seq)
        assert (await w.reply(write)).error == 0
        return got.body.data

    assert asyncio.run(run()) != b"G" * 16  # it did read the old bytes
