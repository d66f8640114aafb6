"""Host-local opens for write held until guests dropped their copies: kernel read leases.

The open-lease policy (NFSv4 read delegation, SMB oplock) lets a guest cache
a file while nobody has it open for write.  For writers on the host the
daemon takes a real Linux read lease (`fcntl(F_SETLEASE, F_RDLCK)`,
host/kernel_lease.py) on every file before it grants a guest lease on it:

* `arm(nodeid)` takes the kernel lease.  It fails (EAGAIN) while any fd has
  the file open for write (a host process, a guest's write handle in the
  daemon, a writable shared mapping): then no guest lease is granted, which
  is exactly open-lease's rule.
* An `open(O_WRONLY|O_RDWR)` or `truncate()` anywhere on the host, through
  any mount or namespace, breaks the lease: the kernel holds the opener
  and tells us with a real-time signal (read from a signalfd).  The daemon
  recalls every guest holder (INVALIDATE, ACKs or fencing,
  `HostDaemon.host_local_modify`) and only then releases the kernel lease,
  so the opener's open() returns after the guests' copies are gone.
* The lease is taken again once nobody has the file open for write: a
  timer retries F_SETLEASE (every `--clean-after` ms, backing off to 1 s),
  and any guest read of an unarmed file tries too.
* The daemon opening the file for write itself (a guest's open for write,
  truncate, create over an existing file) first drops the kernel lease
  (`HostDaemon.open_for_write` calls `disarm`): breaking its own lease
  would hold the daemon for lease-break-time.

If the recall takes longer than /proc/sys/fs/lease-break-time (45 s by
default), the kernel lets the opener go anyway; keep --ack-timeout plus
--lease-term below it.

The lease signal must be blocked in every thread: `host/main.py` calls
`kernel_lease.block_lease_signals()` before anything starts a thread.

Names (create, unlink, rename) and attributes (chmod, utime) break no lease:
inotify watches alongside report them after the fact.
"""

from __future__ import annotations

import asyncio
import logging
import os
import stat as stat_module

from inotify_simple import flags

from host import kernel_lease
from host.detectors import Detector
from host.inotify_detector import DIR_MASK, InotifyDetector
from host.kernel_lease import LeaseBreakWatcher, LeaseUnavailable, ReadLease
from protocol.messages import Detector as DetectorKind

log = logging.getLogger("cleanlease.kernel_lease")

MAX_RETRY_S = 1.0


class _NamesAndAttributes(InotifyDetector):
    """inotify for what a kernel lease does not see: names in leased directories,
    attribute changes of leased files (IN_MODIFY needs an open for write,
    which the lease sees first)."""

    def watch(self, nodeid: int, is_dir: bool) -> None:
        if nodeid in self._watched or self._inotify is None:
            return
        fd = self._daemon.fs.inodes.host_fd(nodeid)
        try:
            wd = self._inotify.add_watch(f"/proc/self/fd/{fd}", DIR_MASK if is_dir else flags.ATTRIB)
        except OSError as exc:
            log.warning("cannot watch node %d: %s", nodeid, exc)
            return
        self._node_of_wd[wd] = nodeid
        self._wd_of_node[nodeid] = wd
        self._watched.add(nodeid)


class KernelLeaseDetector(Detector):
    kind = DetectorKind.KERNEL_LEASE
    needs_arming = True

    def __init__(self) -> None:
        super().__init__()
        self._daemon = None
        self._watcher: LeaseBreakWatcher | None = None
        self._inotify = _NamesAndAttributes()
        self._leases: dict[int, ReadLease] = {}  # nodeid -> kernel lease
        self._node_of_fd: dict[int, int] = {}
        self._breaking: set[int] = set()
        self._retry: dict[int, asyncio.TimerHandle] = {}
        self._tasks: set[asyncio.Task] = set()
        self.counters = dict(leases_taken=0, refused=0, breaks=0, spurious=0)

    @property
    def label(self) -> str:
        return "kernel-lease"

    @staticmethod
    def usable(export: str) -> tuple[bool, str]:
        """Probe F_SETLEASE next to the export (in its parent when that is the
        same file system, so no probe file ever shows up in the export)."""
        parent = os.path.dirname(os.path.realpath(export))
        probe_dir = export
        try:
            if os.stat(parent).st_dev == os.stat(export).st_dev and os.access(parent, os.W_OK):
                probe_dir = parent
        except OSError:
            pass
        return kernel_lease.available(probe_dir)

    # --- life cycle -----------------------------------------------------------------

    async def start(self, daemon) -> None:
        self._daemon = daemon
        self._watcher = LeaseBreakWatcher()  # raises if a thread does not block the signal
        asyncio.get_running_loop().add_reader(self._watcher.fileno(), self._on_breaks)
        await self._inotify.start(daemon)

    async def stop(self) -> None:
        watcher, self._watcher = self._watcher, None
        for handle in self._retry.values():
            handle.cancel()
        self._retry.clear()
        if watcher is not None:
            asyncio.get_running_loop().remove_reader(watcher.fileno())
        for nodeid in list(self._leases):  # every opener held by a break goes ahead
            self._release(nodeid)
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if watcher is not None:
            watcher.close()
        await self._inotify.stop()

    # --- the daemon's calls -----------------------------------------------------------

    def watch(self, nodeid: int, is_dir: bool) -> None:
        self._inotify.watch(nodeid, is_dir)

    def forget(self, nodeid: int) -> None:
        self._inotify.forget(nodeid)

    def arm(self, nodeid: int) -> bool:
        """Take a kernel read lease on `nodeid`; False while it is open for write."""
        if self._watcher is None:
            return False
        lease = self._leases.get(nodeid)
        if lease is not None:
            return lease.held and nodeid not in self._breaking
        try:
            fd = self._daemon.fs.inodes.host_fd(nodeid)
            if not stat_module.S_ISREG(os.stat(fd).st_mode):
                return True  # a directory or symlink has nothing to open for write
            lease = self._watcher.lease(fd)
        except LeaseUnavailable:
            self.counters["refused"] += 1
            return False
        except OSError as exc:
            log.warning("cannot take a kernel lease on node %d: %s", nodeid, exc)
            return False
        self.counters["leases_taken"] += 1
        self._leases[nodeid] = lease
        self._node_of_fd[lease.fd] = nodeid
        self._inotify.arm(nodeid)  # absorb attribute events from before the lease
        return True

    def disarm(self, nodeid: int) -> None:
        """Release the kernel lease (an opener held by its break goes ahead); no
        guest lease on `nodeid` until it is taken again."""
        self._release(nodeid)
        self._daemon.leases.set_armed(nodeid, False)

    def stats(self) -> dict:
        return {"events": self.events, **self.counters, "held": len(self._leases),
                "inotify_events": self._inotify.events,
                "inotify_watched": self._inotify.watched}

    # --- breaks ------------------------------------------------------------------------

    def _on_breaks(self) -> None:
        if self._watcher is None:
            return
        for fd in self._watcher.read_breaks():
            nodeid = self._node_of_fd.get(fd)
            if nodeid is None or nodeid in self._breaking:
                continue
            lease = self._leases.get(nodeid)
            try:
                breaking = lease is not None and lease.breaking()
            except OSError:
                breaking = True
            if not breaking:
                self.counters["spurious"] += 1  # a late signal for an fd number reused since
                continue
            self.events += 1
            self.counters["breaks"] += 1
            self._breaking.add(nodeid)
            task = asyncio.ensure_future(self._break(nodeid))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _break(self, nodeid: int) -> None:
        """Someone opens `nodeid` for write: recall the guests, then let the open go on."""
        try:
            await self._daemon.host_local_modify(nodeid)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("recall of node %d failed; releasing the kernel lease", nodeid)
        finally:
            self._breaking.discard(nodeid)
            self.disarm(nodeid)
            if self._watcher is not None:
                self._schedule_retry(nodeid)

    def _release(self, nodeid: int) -> None:
        lease = self._leases.pop(nodeid, None)
        if lease is None:
            return
        self._node_of_fd.pop(lease.fd, None)
        if self._watcher is not None:
            self._watcher.discard(lease)
        try:
            lease.close()
        except OSError as exc:
            log.error("cannot release the kernel lease of node %d: %s", nodeid, exc)

    # --- taking the lease again ----------------------------------------------------------

    def _schedule_retry(self, nodeid: int, delay: float | None = None) -> None:
        if nodeid in self._retry:
            return
        if delay is None:
            delay = max(self._daemon.config.clean_after_ms, 5) / 1000.0
        self._retry[nodeid] = asyncio.get_running_loop().call_later(
            delay, self._retry_arm, nodeid, delay)

    def _retry_arm(self, nodeid: int, delay: float) -> None:
        self._retry.pop(nodeid, None)
        if self._watcher is None or not self._daemon.leases.wants_arming(nodeid):
            return  # armed meanwhile, or a guest has it open for write (reads will retry)
        try:
            self._daemon.fs.inodes.host_fd(nodeid)
        except OSError:
            return  # no guest knows it any more
        if self.arm(nodeid):
            self._daemon.leases.set_armed(nodeid, True)
        else:
            self._schedule_retry(nodeid, min(delay * 2, MAX_RETRY_S))
