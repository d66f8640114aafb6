"""The fanotify detector's side of the control gate (host/control/holds.py).

A host-local modification of a file an administrator holds or journals is
held in its pre-content event until the gate lets it go, recorded in the
journal, and only then answered (`FanotifyDetector._gated_allow`,
`_recall_then_allow`).  A hold's drain waits until every thread the
detector let write the file before the hold is out of its system call.
"""

from __future__ import annotations

import asyncio
import logging
import time

from host import fanotify
from host.control.holds import LANDING_TIMEOUT_S
from host.control.host_writes import host_change

log = logging.getLogger("cleanlease.control")

POLL_S = 0.0005  # how often a released or draining writer's system call is looked at
DRAIN_TIMEOUT_S = 10.0
SETTLE_S = 0.05


def _write_calls(tid: int) -> int | None:
    """The write-like system calls thread `tid` has finished (`syscw` of
    /proc/<tid>/task/<tid>/io: the thread's own); None if it is gone or that cannot be read."""
    try:
        with open(f"/proc/{tid}/task/{tid}/io", encoding="ascii") as f:
            for line in f:
                if line.startswith("syscw:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


class DetectorControl:
    """What the control interface needs of a FanotifyDetector."""

    can_hold_host_writers = True
    gives_ranges = True

    def __init__(self, detector) -> None:
        self._detector = detector
        self.drained = 0
        self._scan_on_drain: set = set()  # keys whose ignore mark came off: look at /proc once

    @property
    def _daemon(self):
        return self._detector._daemon

    def attach(self) -> None:
        """Called once the detector runs: holds wait for its writers too."""
        self._daemon.holds.drains.append(self.drain)

    def watches(self, key) -> bool:
        d = self._daemon
        return bool((d.holds and key in d.holds) or (d.journal and key in d.journal))

    def watch_file(self, fd: int, key) -> None:
        """An administrator holds or journals `key` (open as `fd`): it must raise
        events, so its ignore mark (an inode no guest knows) comes off."""
        det = self._detector
        if det._group is not None and key in det._marked:
            det._group.arm(fd)
            det._marked.discard(key)  # stays in _unseen: it may have been written unseen
            self._scan_on_drain.add(key)

    def blind_spots(self, key) -> list[str]:
        """Writers of `key` this detector cannot hold (and cannot journal)."""
        if key in self._detector._unmarked_writers:
            return ["a process had this file open for writing before the daemon placed its "
                    "mark: its writes through that fd are neither held nor journaled"]
        return []

    async def admit(self, event, key, access: fanotify.Access) -> None:
        """Hold `event` (a modification of `key`) while the gate says so, then
        record it in the journal; the caller answers it."""
        d = self._daemon
        if d.restart_grace_left() > 0:
            await d._after_restart_grace()
        access, line = await self._settled(event, access)
        if not access.may_modify:
            return  # a read after all: it never waits
        change = host_change(event.pid, event.fd, access, event.offset, event.count, line)
        if access is fanotify.Access.MMAP_WRITE:
            d.journal.taint(key, "a shared writable mapping was made: its stores raise no event")
        if self.blind_spots(key):
            d.journal.taint(key, self.blind_spots(key)[0])

        async def landed() -> None:
            await self._landed(event, key)

        if d.holds.must_wait(key, change):
            # Recorded now, not once answered: while it waits the inode must not
            # be re-armed (its flush may finish meanwhile), since its write lands
            # when it is let go, and `arm()` waits for recorded writers.
            self._detector._record(key, event.pid)
        await d.holds.admit(key, change, landed)
        if change.data:
            d.journal.record(key, change.start, change.end)

    @staticmethod
    async def _settled(event, access: fanotify.Access) -> tuple[fanotify.Access, str | None]:
        """The access and the `/proc/<tid>/syscall` line of a thread blocked on
        `event`.  Such a thread shows "running" for a moment whenever any event
        of the group is answered (they all sleep on one wait queue and are all
        woken), or before it first sleeps: look again, for up to SETTLE_S, so
        that a read is not held and a write is journaled by its range, not as
        the whole file.  (access, None) if it never settled."""
        deadline = time.monotonic() + SETTLE_S
        while True:
            line = fanotify.syscall_line(event.pid)
            if line is not None and not line.startswith("running"):
                settled = access
                if settled is fanotify.Access.UNKNOWN:
                    settled = fanotify.classify(event.pid, event.fd)
                if settled is not fanotify.Access.UNKNOWN or line.split()[0] == "-1":
                    return settled, line
            if line is None or time.monotonic() > deadline:
                return access, None
            await asyncio.sleep(POLL_S)

    async def _landed(self, event, key) -> None:
        """Once `event` is answered and its thread past the system call it
        was held in (bounded by LANDING_TIMEOUT_S).  Called while `event` is
        still unanswered (the releaser calls it right as it lets it go)."""
        det = self._detector
        tid = event.pid
        writes = _write_calls(tid)
        deadline = time.monotonic() + LANDING_TIMEOUT_S
        while det._unanswered.get(event.fd) is event and time.monotonic() < deadline:
            await asyncio.sleep(POLL_S)
        while not self._past(tid, key, writes) and time.monotonic() < deadline:
            await asyncio.sleep(POLL_S)

    def _past(self, tid: int, key, writes: int | None) -> bool:
        """Is thread `tid` past the modification of `key` it was in when it
        had made `writes` write-like calls?  Yes once it has finished another
        (each write, pwrite, writev, copy_file_range bumps the thread's
        `syscw` in /proc/<tid>/io when it returns: a CPU-bound writer shows
        "running" in /proc/<tid>/syscall, which cannot be told from a write
        still going on), once it is in no write-like call on `key`, once it
        is blocked on another event of ours, or once it is gone."""
        now = _write_calls(tid)
        if now is None or (writes is not None and now != writes):
            return True
        return not fanotify.writing_to(tid, *key) or self._blocked_by_us(tid)

    async def drain(self, key) -> int:
        """Wait until every thread let write `key` before now is past that
        write (`_past`; bounded by DRAIN_TIMEOUT_S); return how many were in
        one.  Threads blocked on an event of ours are not in a write: skipped."""
        det = self._detector
        tids = [t for t in det._in_flight.get(key, {}) if not self._blocked_by_us(t)]
        if key in self._scan_on_drain:
            # It carried an ignore mark: threads may be writing it unrecorded.
            self._scan_on_drain.discard(key)
            tids += [tid for tid, _, k in fanotify.modifying_threads(key[0])
                     if k == key and tid not in tids and not self._blocked_by_us(tid)]
        writes = {tid: _write_calls(tid) for tid in tids}
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        waited = 0
        for tid in tids:
            if self._past(tid, key, writes[tid]):
                continue
            waited += 1
            while not self._past(tid, key, writes[tid]):
                if time.monotonic() > deadline:
                    log.warning("a host writer (thread %d) of %s is still inside its system "
                                "call after %.0f s; the hold goes on without it", tid, key,
                                DRAIN_TIMEOUT_S)
                    break
                await asyncio.sleep(POLL_S)
        self.drained += waited
        return waited

    def _blocked_by_us(self, tid: int) -> bool:
        return any(e.pid == tid for e in self._detector._unanswered.values())
