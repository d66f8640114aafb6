"""Host-local writers, and the pre-content detector's kernel side, simulated.

The daemon's side is real: a host-local write reaches it through the entry
point the fanotify detector calls (`HostDaemon.host_local_modify`), and the
daemon arms and disarms through the `Detector` interface.  What is
simulated is the kernel and the detector's bookkeeping, with the decisions
of host/fanotify_detector.py (`_dispatch`, `arm`):

* every host-local write raises a pre-content event (the mount mark);
* on an inode no guest knows, or a DIRTY one (under range granularity: dirty
  from the write's page or the end of file on), the write is let through at
  once and recorded as in flight (an unknown inode is "possibly written
  unseen" until its next successful arm), except, for an inode no guest
  knows, during a restarted daemon's grace (host/boot.py): it is held until
  the grace is over;
* on any other, the event waits for `host_local_modify` (the recall), in
  the daemon's node, and only then lets the write through;
* a write let through may stay "inside write(2)" for a seeded while before
  its bytes land (a write in progress across a re-arm); `arm()` refuses
  while any write let through on that inode has not landed.

The writer's bytes land with a real pwrite(2) on the export's file.
"""

from __future__ import annotations

import asyncio
import os

from host.detectors import Detector
from host.host_write_span import dirty_enough, event_span
from protocol.messages import Detector as DetectorKind


class SimPreContentDetector(Detector):
    kind = DetectorKind.FANOTIFY
    needs_arming = True

    def __init__(self) -> None:
        super().__init__()
        self.daemon = None
        self.in_flight: dict[tuple[int, int], int] = {}
        self.unseen: set[tuple[int, int]] = set()
        self.refused_arms = 0
        self.held_for_restart = 0
        self.stopped: asyncio.Future | None = None

    async def start(self, daemon) -> None:
        self.daemon = daemon
        self.stopped = asyncio.get_running_loop().create_future()

    def died(self) -> None:
        """The daemon died: the kernel lets every pending event through."""
        if self.stopped is not None and not self.stopped.done():
            self.stopped.set_result(None)

    def _key(self, nodeid: int) -> tuple[int, int]:
        return self.daemon.fs.inode_key(nodeid)

    def arm(self, nodeid: int) -> bool:
        try:
            key = self._key(nodeid)
        except OSError:
            return False
        if self.in_flight.get(key):
            self.refused_arms += 1
            return False
        self.unseen.discard(key)
        return True

    def may_have_missed_writes(self, nodeid: int) -> bool:
        try:
            return self._key(nodeid) in self.unseen
        except OSError:
            return True

    async def event(self, key: tuple[int, int], host_node, offset: int = 0, count: int = 0,
                    size: int = 0) -> bool:
        """A write on inode `key` raised its pre-content event: return when the
        detector lets it through (the write is then in flight: `landed`).
        True if the kernel let it through because the daemon died meanwhile.
        [offset, offset+count) is the event's range (a positioned write, so
        under range granularity only its span is recalled, as the real
        detector does: host/host_write_span.py), `size` the file's size."""
        self.events += 1
        daemon = self.daemon
        nodeid = daemon.fs.inodes.lookup_key(*key)
        if nodeid is None and daemon.restart_grace_left() > 0:
            # As the real detector: the predecessor's guests may cache it, so it
            # is held until the grace ends, and in flight from now on (its
            # thread is inside write(2), which the real detector's arm sees).
            self.held_for_restart += 1
            self.in_flight[key] = self.in_flight.get(key, 0) + 1
            await asyncio.wait([host_node.spawn(daemon._after_restart_grace()), self.stopped],
                               return_when=asyncio.FIRST_COMPLETED)
            return self.stopped.done()
        if nodeid is None:
            self.unseen.add(key)
        elif not daemon.leases.dirty_covers(nodeid, dirty_enough(offset, size)):
            span = event_span(offset, count, True) if daemon.leases.ranged(nodeid) else None
            recall = host_node.spawn(daemon.host_local_modify(nodeid, span))
            await asyncio.wait([recall, self.stopped], return_when=asyncio.FIRST_COMPLETED)
            if not recall.done():
                self.in_flight[key] = self.in_flight.get(key, 0) + 1
                return True
        self.in_flight[key] = self.in_flight.get(key, 0) + 1
        return False

    def landed(self, key: tuple[int, int]) -> None:
        count = self.in_flight.get(key, 0) - 1
        if count > 0:
            self.in_flight[key] = count
        else:
            self.in_flight.pop(key, None)


async def host_local_write(detector: SimPreContentDetector, host_node, path: str, offset: int,
                           data: bytes, in_write_s: float) -> tuple[int, bool]:
    """One host-local pwrite(2) of `data` at `offset` in `path`, held by the
    detector as the kernel would; `in_write_s` is how long it stays inside
    write(2), let through but not landed.  Returns the bytes written, and
    whether the kernel let it through only because the daemon died."""
    fd = os.open(path, os.O_WRONLY)
    try:
        st = os.fstat(fd)
        key = (st.st_dev, st.st_ino)
        released = await detector.event(key, host_node, offset, len(data), st.st_size)
        try:
            if in_write_s > 0:
                await asyncio.sleep(in_write_s)
            return os.pwrite(fd, data, offset), released
        finally:
            detector.landed(key)
    finally:
        os.close(fd)
