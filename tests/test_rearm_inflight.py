"""No lease while a host write that began before the grant is still inside write(2)
(issue 11, item 7), and the bookkeeping of a refused first arm.

The writer that must not be overtaken is tests/stalled_writer.py: its source
buffer is userfaultfd memory, so its pwrite stays inside the file system's
write (past the pre-content hook, ext4's inode lock held, nothing copied)
until the test answers the fault.  It says `inside` when the fault arrives:
that is the readiness signal every ordering below waits for; nothing waits
for time to pass.  A third kind of in-flight write, one waiting for the inode
lock, is a plain writer queued behind a stalled one; it is seen waiting in
/proc/<pid>/wchan.

The export is a directory under tmp_path (ext4 here) that the daemon
bind-mounts over itself.  docs/kernel.md ("Re-arming while a host write is in
flight") has the design and the kernel facts these tests rely on.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time

import pytest

from host import bindmount
from host.leases import InodeState
from tests.conftest import ROOT, Child, wait_until

WAIT = 10.0
SIZE = 4096
STALLED = os.path.join(ROOT, "tests", "stalled_writer.py")

# A plain host-local writer: opens PATH for write, says "ready", and on a line
# pwrites DATA at offset 0 and prints CLOCK_MONOTONIC after pwrite returned.
WRITER = r"""
import os, sys, time
fd = os.open(sys.argv[1], os.O_WRONLY)
print("ready", flush=True)
sys.stdin.readline()
os.pwrite(fd, sys.argv[2].encode(), 0)
print(time.monotonic_ns(), flush=True)
sys.stdin.readline()
"""


def _skip_unless_fanotify(export) -> None:
    from host.fanotify_detector import FanotifyDetector

    ok, why = FanotifyDetector.usable(str(export))
    if not ok:
        pytest.skip(f"fanotify detector unavailable: {why}")


def _send(child: Child, line: str = "go") -> None:
    child.proc.stdin.write(line.encode() + b"\n")
    child.proc.stdin.flush()


def _stalled(path, how, *extra) -> Child:
    """A stalled writer on `path`, its fd open, not writing yet."""
    w = Child([sys.executable, STALLED, str(path), how, str(SIZE), "U", *extra], f"stalled-{how}")
    first = w.line().split()
    if first[0] == "refused":
        w.stop()
        pytest.skip(f"userfaultfd unavailable: {' '.join(first[1:])}")
    assert first[0] == "ready", first
    return w


def _writer(path, data) -> Child:
    w = Child([sys.executable, "-c", WRITER, str(path), data], "writer")
    assert w.line().strip() == "ready"
    return w


def _lease(guest, path, size=16) -> str:
    """Open `path` and read it twice: the second read is a hit, so `guest` holds a lease."""
    guest.do(op="open", path=path)
    first = guest.do(op="read", path=path, size=size)
    assert guest.do(op="read", path=path, size=size)["hit"] is True
    return first["data"]


def _next_invalidate(guest, timeout=WAIT) -> dict:
    for event in guest.events:
        if event["event"] == "invalidate":
            guest.events.remove(event)
            return event
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        assert left > 0, f"no INVALIDATE within {timeout}s; got {guest.events}"
        obj = json.loads(guest.line(left))
        assert "event" in obj, obj
        if obj["event"] == "invalidate":
            return obj
        guest.events.append(obj)


def _waits_for_inode_lock(pid: int) -> bool:
    """The writer sleeps in ext4_buffered_write_iter: the only sleep there before
    it copies anything is inode_lock() (the rwsem slow path is a scheduler
    function, so wchan names its caller)."""
    try:
        with open(f"/proc/{pid}/wchan") as f:
            return f.read().strip() == "ext4_buffered_write_iter"
    except OSError:
        return False


@pytest.mark.parametrize("how", ["buffered", "direct", "lock-wait"])
def test_no_lease_while_a_host_write_that_began_on_the_dirty_inode_is_inside_write(
        export, start_host, start_guest, how):
    """DIRTY -> flush -> re-arm attempt while a host write that began during the
    dirty period is still inside pwrite: no lease until that pwrite returned.

    * buffered: the write has taken the inode lock and copied nothing (cachestat
      sees no dirty page);
    * direct: an O_DIRECT write, which never leaves a dirty page;
    * lock-wait: a buffered write through the bind waiting for the inode lock,
      held by a stalled writer on another mount of the export (that one is
      invisible to fanotify by design: docs/kernel.md, section 5).

    Before the fix the dirty inode carried an ignore mark, the write raised no
    event, and the guest was granted a lease while it was in flight."""
    _skip_unless_fanotify(export)
    f = export / "f"
    with open(f, "wb") as out:  # allocated, written blocks: an O_DIRECT overwrite of them
        out.write(b"o" * SIZE)
        os.fsync(out.fileno())
    if how == "lock-wait":
        view = export.parent / "view"
        view.mkdir()
        bindmount.bind(export, view)  # another mount of the export: unmarked (detached by the fixture)
    # --clean-after: no idle flush during the test; the guest's FSYNC flushes
    # and re-arms (HostDaemon.flushed -> try_rearm) before it is answered.
    _, address = start_host(export, "--detector", "fanotify", "--clean-after", "600000")
    # The lock holder writes through the other mount, which no mark covers
    # (docs/kernel.md): opened after the daemon started, so not found by its
    # start-up scan either; invisible, as the test needs.
    early = _stalled(view / "f", "buffered") if how == "lock-wait" else None
    g = start_guest(address, "G")
    children = [c for c in (early,) if c is not None]
    try:
        assert _lease(g, "f") == "o" * 16
        # The first host write dirties it: recalled before its pwrite returns.
        a = _writer(f, "NEW!")
        children.append(a)
        _send(a)
        t_returned = int(a.line())
        assert _next_invalidate(g)["t_ack_ns"] < t_returned
        # Now DIRTY.  A second host write begins and stays inside pwrite.
        if how == "lock-wait":
            _send(early)
            assert early.line().strip() == "inside"  # holds the inode lock
            inflight = _writer(f, "CCCC")
            children.append(inflight)
            _send(inflight)
            wait_until(lambda: _waits_for_inode_lock(inflight.proc.pid), WAIT,
                       "the writer to wait for the inode lock")
            expect = "CCCC" + "U" * 12
        else:
            inflight = _stalled(f, how)
            children.append(inflight)
            _send(inflight)
            assert inflight.line().strip() == "inside"
            expect = "U" * 16
        # Flush and re-arm attempt while that write is in flight.  The page
        # cache is clean (what A dirtied is flushed; the stalled write has
        # copied nothing), so only the detector can refuse.
        g.do(op="fsync", path="f")
        for _ in range(2):
            r = g.do(op="read", path="f", size=16)
            assert r["hit"] is False, "a lease was granted while a host write was inside pwrite"
            assert r["data"] == "NEW!" + "o" * 12
        # Let it finish.
        stalled = early if how == "lock-wait" else inflight
        _send(stalled)
        assert stalled.line().startswith("returned")
        if how == "lock-wait":
            int(inflight.line())  # its pwrite returned
        # Flushed after the write returned: leased again, with its bytes.
        g.do(op="fsync", path="f")

        def hit():
            r = g.do(op="read", path="f", size=16)
            assert r["data"] == expect, r
            return r["hit"]
        wait_until(hit, WAIT, "a lease on f again")
    finally:
        for child in children:
            if child.proc.poll() is None:
                try:
                    _send(child, "end")
                    _send(child, "end")
                except OSError:
                    pass
            child.stop()


def test_no_first_lease_while_the_writer_of_an_inode_no_guest_knew_is_inside_write(
        export, start_host, start_guest):
    """A writer's first O_DIRECT pwrite on an inode no guest knows is allowed and
    the inode gets an ignore mark (cooled); its next pwrite, through the same fd,
    raises no event and stays inside pwrite.  A guest then looks the file up
    and reads it: no lease until that pwrite returned.  Before the fix the
    record of the first call counted (its /proc/<tid>/syscall line differs
    from the second call's, so it looked over) and O_DIRECT leaves cachestat
    clean, so the guest was leased the file in the middle of the write."""
    _skip_unless_fanotify(export)
    f = export / "f"
    with open(f, "wb") as out:
        out.write(b"o" * 2 * SIZE)
        os.fsync(out.fileno())
    _, address = start_host(export, "--detector", "fanotify", "--clean-after", "600000")
    g = start_guest(address, "G")
    w = _stalled(f, "direct", "first")
    try:
        _send(w)
        assert w.line().strip() == "inside"
        g.do(op="open", path="f")  # LOOKUP: the daemon knows the inode from now on
        for _ in range(3):
            r = g.do(op="read", path="f", size=16)
            assert r["hit"] is False, "a lease was granted while a host write was inside pwrite"
            assert r["data"] == "o" * 16
        _send(w)
        assert w.line().startswith("returned")

        def hit():
            r = g.do(op="read", path="f", size=16)
            assert r["data"] == "U" * 16, r
            return r["hit"]
        wait_until(hit, WAIT, "a lease on f")
    finally:
        if w.proc.poll() is None:
            _send(w, "end")
            _send(w, "end")
        w.stop()


async def test_a_refused_first_arm_keeps_the_inode_unseen_and_the_next_arm_checks_it_is_clean(
        export, tmp_path):
    """`_arm` of an inode that carried an ignore mark (it was written while no
    guest knew it) is refused while that write is still in flight.  The inode
    must stay "possibly written unseen", so that the arm after the write
    returned checks the page cache.  Before the fix the refused arm dropped it
    from the detector's set of marked inodes and the next arm skipped the check.

    The daemon runs in this process (its detector is the real one, on a real
    bind mount); the writer is a separate process, and this process touches
    the export only through the daemon's own fds while the mark is on."""
    _skip_unless_fanotify(export)
    from host.fanotify_detector import FanotifyDetector
    from host.inodes import ROOT_NODEID
    from host.server import HostConfig, HostDaemon

    f = export / "f"
    f.write_bytes(b"o" * SIZE)
    daemon = HostDaemon(HostConfig(str(export), clean_after_ms=600000), FanotifyDetector())
    await daemon.start(f"unix:{tmp_path / 'host.sock'}")
    writer = None
    try:
        writer = await asyncio.create_subprocess_exec(
            sys.executable, STALLED, str(f), "buffered", str(SIZE), "U", cwd="/",
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)

        async def line() -> str:
            return (await asyncio.wait_for(writer.stdout.readline(), WAIT)).decode().strip()

        async def send(text: str) -> None:
            writer.stdin.write(text.encode() + b"\n")
            await writer.stdin.drain()

        first = await line()
        if first.startswith("refused"):
            pytest.skip(f"userfaultfd unavailable: {first}")
        assert first.startswith("ready"), first
        await send("go")
        # Its event (an inode no guest knows) was allowed and the inode got an
        # ignore mark; the write is now inside pwrite.
        assert await line() == "inside"
        nodeid, _ = daemon.fs.lookup(1, ROOT_NODEID, b"f")  # a guest looks it up now
        checks: list[bool] = []
        page_cache_clean = daemon._page_cache_clean

        def spy(n: int) -> bool:
            checks.append(page_cache_clean(n))
            return checks[-1]
        daemon._page_cache_clean = spy

        assert daemon.detector.may_have_missed_writes(nodeid)
        assert daemon.leases.grant(nodeid, 1) is None  # a read: not armed yet
        daemon._arm(nodeid)
        assert daemon.leases.grant(nodeid, 1) is None, "armed while the write is in flight"
        assert daemon.detector.may_have_missed_writes(nodeid), \
            "the refused arm forgot that the inode may have been written unseen"
        await send("release")
        assert (await line()).startswith("returned")
        # Let it exit: a thread between its pwrite and its next call may still be
        # on a CPU, which the detector (rightly) counts as maybe still writing.
        await send("exit")
        await writer.wait()
        daemon._arm(nodeid)
        assert checks, "the arm after the write returned did not check the page cache"
        # Its result decides: W's bytes are dirty in the page cache unless
        # writeback got there first; dirty means flush first, as after a write.
        grant = daemon.leases.grant(nodeid, 1)
        if checks[-1]:
            assert grant is not None
        else:
            assert grant is None and daemon.leases.state_of(nodeid) is InodeState.DIRTY
    finally:
        if writer is not None and writer.returncode is None:
            writer.kill()
            await writer.wait()
        await daemon.close()
