"""Host-local writes seen after the fact, with inotify (via inotify_simple).

Every inode the daemon leases gets a watch: IN_MODIFY and IN_ATTRIB on
regular files, and on directories the name events (create, delete, both
halves of a rename).  The watch is added through `/proc/self/fd/N` of the
daemon's O_PATH fd, so it is on the inode the guest holds, whatever its path
is now.

What inotify can and cannot promise (docs/kernel.md): the event is queued
while the writer's syscall runs, so it arrives *after* the write has landed.
Between the write and the ACKs of the recall it causes, a guest can still
serve the old bytes: that window is what `simulate` reports as stale reads
under this detector.  Stores through a shared mapping are not reported.

Events for an inode that is not CLEAN are ignored: nobody holds a lease on
it, and the cachestat check before re-arming catches what they dirtied.
That also absorbs the events of the daemon's own writes, which are drained
before every re-arm.  An event queue overflow recalls every lease.
"""

from __future__ import annotations

import asyncio
import logging
import os

import inotify_simple
from inotify_simple import flags

from host.detectors import Detector
from protocol.messages import Detector as DetectorKind

log = logging.getLogger("cleanlease.inotify")

FILE_MASK = flags.MODIFY | flags.ATTRIB
# No IN_ATTRIB here: on a directory it also reports children's attribute
# changes, by name, which would look like namespace changes.
DIR_MASK = flags.CREATE | flags.DELETE | flags.MOVED_FROM | flags.MOVED_TO


class InotifyDetector(Detector):
    kind = DetectorKind.INOTIFY
    needs_arming = False

    def __init__(self) -> None:
        super().__init__()
        self._inotify: inotify_simple.INotify | None = None
        self._daemon = None
        self._node_of_wd: dict[int, int] = {}
        self._wd_of_node: dict[int, int] = {}
        self._watched: set[int] = set()

    async def start(self, daemon) -> None:
        self._daemon = daemon
        self._inotify = inotify_simple.INotify(nonblocking=True)
        asyncio.get_running_loop().add_reader(self._inotify.fileno(), self.drain)

    async def stop(self) -> None:
        if self._inotify is not None:
            asyncio.get_running_loop().remove_reader(self._inotify.fileno())
            self._inotify.close()
            self._inotify = None

    def watch(self, nodeid: int, is_dir: bool) -> None:
        """Called when `nodeid` is first leased: report its changes from now on."""
        if nodeid in self._watched or self._inotify is None:
            return
        fd = self._daemon.fs.inodes.host_fd(nodeid)
        try:
            wd = self._inotify.add_watch(f"/proc/self/fd/{fd}", DIR_MASK if is_dir else FILE_MASK)
        except OSError as exc:
            log.warning("cannot watch node %d: %s", nodeid, exc)
            return
        self._node_of_wd[wd] = nodeid
        self._wd_of_node[nodeid] = wd
        self._watched.add(nodeid)

    def forget(self, nodeid: int) -> None:
        """Remove `nodeid`'s watch: the watched set shrinks as node ids go."""
        if nodeid not in self._watched or self._inotify is None:
            return
        self._watched.discard(nodeid)
        wd = self._wd_of_node.pop(nodeid, None)
        if wd is not None and self._node_of_wd.get(wd) == nodeid:
            del self._node_of_wd[wd]
            try:
                self._inotify.rm_watch(wd)
            except OSError:
                pass  # gone already (the inode was deleted): IN_IGNORED follows

    @property
    def watched(self) -> int:
        return len(self._watched)

    def stats(self) -> dict:
        return {"events": self.events, "watched": len(self._watched)}

    def arm(self, nodeid: int) -> None:
        # Events queued so far (the daemon's own writes among them) belong to
        # the dirty period that is ending; absorb them before the check.
        self.drain()

    def drain(self) -> None:
        """Read every queued event and hand each to the daemon."""
        if self._inotify is None:
            return
        for event in self._inotify.read(timeout=0):
            self.events += 1
            if event.mask & flags.Q_OVERFLOW:
                log.warning("inotify queue overflow: recalling every lease")
                self._daemon.host_local_overflow()
                continue
            if event.mask & flags.IGNORED:
                nodeid = self._node_of_wd.pop(event.wd, None)
                self._watched.discard(nodeid)
                if self._wd_of_node.get(nodeid) == event.wd:
                    del self._wd_of_node[nodeid]
                continue
            nodeid = self._node_of_wd.get(event.wd)
            if nodeid is None:
                continue
            if event.name:
                self._daemon.host_local_namespace_change(nodeid, os.fsencode(event.name))
            else:
                self._daemon.host_local_modification(nodeid)
