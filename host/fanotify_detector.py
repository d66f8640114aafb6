"""Host-local writes held before they land: fanotify pre-content events (clean-lease).

Setup (`start`), in this order:

1. `ExportFS` already holds the export's root O_PATH fd (the daemon built it
   before starting the detector).  Every file the daemon touches is reached
   relative to that fd, i.e. through the mount *underneath* the bind below,
   which carries no mark: the daemon's own reads, writes, fdatasyncs never
   wait for the daemon.
2. The export is bind-mounted over itself, private (host/bindmount.py).
   Every path-based open of `export/...` made from now on resolves into the
   bind, which is on top.
3. One fanotify group (FAN_CLASS_PRE_CONTENT, FAN_REPORT_TID) marks that
   mount, and only that mount, with FAN_PRE_ACCESS (host/fanotify.py refuses
   anything that is not a private bind of a sub-directory).

Arming: the mount mark makes every inode "armed".  The daemon arms an inode
before it grants a lease on it (`try_rearm` calls `arm` before its cachestat
check) and "disarms" it once it is dirty (`HostDaemon._modify` calls `disarm`
after the recall).  Disarming does NOT put an ignore mark on the inode: a
DIRTY inode keeps raising events, which are answered at once, so that every
thread that begins a modification of it is known when the daemon re-arms it
(docs/kernel.md, "Re-arming while a host write is in flight").  The only
ignore marks are on inodes no guest knows ("cooled", below); arming removes
the mark.

Each event (the accessing thread is blocked until we answer):

* any access to a DIRTY inode (fstat of the event fd ->
  `InodeStore.lookup_key` -> the lease table) is allowed at once, read or
  write alike (nothing is leased), and its thread is recorded (below);
* a read (read/pread/readv/mmap of a private or read-only mapping: from
  `/proc/<tid>/syscall`) is allowed at once;
* a modification of an inode no guest knows is allowed at once, its thread
  is recorded, and the inode gets an ignore mark so it costs nothing more
  until a guest leases it (arming removes it); but during a restarted
  daemon's grace (host/boot.py), when the predecessor's guests may still
  cache it, it is held until the grace is over, and gets no ignore mark;
* any other modification (or an access that cannot be classified) runs
  `HostDaemon.host_local_modify` in its own task: INVALIDATE to every
  holder, wait for the ACKs (or fence a silent holder once its term has
  run out), and only then FAN_ALLOW.  A slow recall holds only its own
  writer: reads and other files are answered meanwhile.

Every event is answered on every path: an exception in the handling allows
it (and is logged); `stop()` allows everything pending before it closes the
group; and if the daemon dies, the kernel allows what was pending when the
group fd goes away.

What cannot be seen before it lands (docs/kernel.md, section 5): writes
through an fd opened before the mark, or through another mount of the same
directory; `open(O_TRUNC)`; stores through a shared mapping after its
`mmap()`; namespace changes (create, unlink, rename: there is no pre-content
event for names).  inotify watches run alongside, on every leased inode,
and recall after the fact what the mark did not hold back: names in leased
directories, IN_MODIFY (O_TRUNC, writes through other mounts) and IN_ATTRIB
(chmod, utime, link count) on leased files.

Clean again: a write the detector let through may still be on its way into
the page cache when the daemon flushes and checks `cachestat`, or may not
reach the page cache at all (O_DIRECT), or may still wait for the inode lock.
So the detector remembers each thread it let modify the inode, or touch it
while DIRTY (one record per thread, with its process), and `arm()` reports
the inode not ready while any of them is inside a system call that may be
modifying it (`/proc/<tid>/syscall` shows a write-like call on an fd that is
this inode, or the thread is running and cannot be told) or its process
still maps the inode shared.  Because a DIRTY inode carries no ignore mark,
every thread that began a write on it raised an event and is among those
records: no lease is granted while a host write that began before the grant
is still inside its system call.

An inode that carried an ignore mark (cooled) may have been written unseen:
`may_have_missed_writes` says so until an `arm()` of it succeeds, so a
refused arm does not lose it and the daemon's next arm still checks that the
file is clean.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import logging
import os
import resource
import time
from contextlib import contextmanager
from dataclasses import dataclass

from host import bindmount, fanotify
from host.detectors import Detector
from host.fanotify import Access, PreContentEvent, PreContentGroup, classify, writing_to
from host.control.detector_side import DetectorControl
from host.host_write_span import dirty_enough, event_span, positioned_write
from host.inotify_detector import InotifyDetector
from host.leases import InodeState
from host.limits import DETECTOR_EVENT_FDS, ThrottledLog
from protocol.messages import Detector as DetectorKind

log = logging.getLogger("cleanlease.fanotify")

MAX_CONCURRENT_RECALLS = 64  # writers held at once while their recalls run; reads never wait
UNMARKED_RECHECK_S = 0.1  # how often a file open for writing from before the mark is checked
MAX_COOLED = 16384  # ignore marks put on inodes no guest knows (each pins an inode in memory)


@dataclass
class _InFlight:
    """A thread the detector let modify an inode (or touch a DIRTY one): until it is
    known not to be writing to it, nor its process to map it shared, the inode
    must not be leased."""

    tid: int
    tgid: int

    def over(self, key: tuple[int, int]) -> bool:
        """What the thread does now decides, not which call raised the event: a
        thread that got past our event can only still be modifying the inode
        from inside a system call on it (or through a shared mapping), and
        every later call it made raised an event that was recorded here, or,
        under an ignore mark (an inode no guest knew), raised none at all."""
        return not writing_to(self.tid, *key) and not _maps_shared(self.tgid, key)


def _maps_shared(tgid: int, key: tuple[int, int]) -> bool:
    """Does process `tgid` still map inode `key` shared (stores would reach the file)?"""
    dev, ino = key
    try:
        with open(f"/proc/{tgid}/maps", encoding="ascii", errors="replace") as f:
            for line in f:
                fields = line.split(None, 5)
                if len(fields) < 5 or fields[4] != str(ino) or "s" not in fields[1]:
                    continue
                major, _, minor = fields[3].partition(":")
                if (int(major, 16), int(minor, 16)) == (os.major(dev), os.minor(dev)):
                    return True
    except (OSError, ValueError):
        return False
    return False


def _tgid_of(tid: int) -> int:
    try:
        with open(f"/proc/{tid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Tgid:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return tid


def _open_group_on_a_high_fd() -> PreContentGroup:
    """A pre-content group whose fd number is above every other fd of the daemon.

    Why: a writer held on our event keeps a reference on every fsnotify group
    with a mark in its way, our inotify group's watch on the same file
    included; releasing that inotify group waits for the writer, and the
    writer waits for our answer, which comes when our group is released.  A
    daemon killed with SIGKILL releases its fds from the highest number down
    (the exit path queues each release on a LIFO list), so our group, on the
    highest number, goes first and lets the writers go; then the inotify
    group can go.  (Measured: with the group on a lower fd the killed daemon
    never exits and the writer stays blocked; tests/test_host_local.py.)
    """
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    group = PreContentGroup.open()
    try:
        high = fcntl.fcntl(group.fileno(), fcntl.F_DUPFD_CLOEXEC, max(soft - 8, group.fileno()))
    except OSError as exc:
        log.warning("cannot move the fanotify group to a high fd (%s); a SIGKILLed daemon "
                    "may then hang while a writer waits", exc)
        return group
    group.close()
    return PreContentGroup(high)


class FanotifyDetector(Detector):
    kind = DetectorKind.FANOTIFY
    needs_arming = True

    def __init__(self) -> None:
        super().__init__()
        self._daemon = None
        self._group: PreContentGroup | None = None
        self._mount: str | None = None
        self._inotify = InotifyDetector()
        self._unanswered: dict[int, PreContentEvent] = {}  # event fd -> event
        self._tasks: set[asyncio.Task] = set()
        self._slots: asyncio.Semaphore | None = None
        # inode -> tid -> record: the threads that got past an event on it
        self._in_flight: dict[tuple[int, int], dict[int, _InFlight]] = {}
        # file -> processes that had it open for writing before our mark (start)
        self._unmarked_writers: dict[tuple[int, int], set[int]] = {}
        self._unmarked_checked: dict[tuple[int, int], float] = {}  # key -> last check
        self._marked: set[tuple[int, int]] = set()  # inodes carrying our ignore mark (cooled)
        self._unseen: set[tuple[int, int]] = set()  # carried one since their last good arm()
        self._cooled = 0  # ignore marks put, ever
        self._prune_at = 1024
        # A failure that repeats per event (a bug) is logged once per 10 s: logged
        # every time, it could fill a stderr nobody drains and stop the daemon.
        self._throttled = ThrottledLog(log)
        self.counters = dict(reads=0, modifications=0, unknown_inode=0, dirty=0, recalls=0,
                             held_for_restart=0, mmap_writes=0, errors=0, not_quiescent=0,
                             seeded_in_flight=0, unmarked_writable_files=0, no_fd=0,
                             reading_paused=0)
        self._reading_paused = False
        self._no_fd_logged_at = -1e9
        self.control = DetectorControl(self)

    # --- can it run here? ---------------------------------------------------------

    @staticmethod
    def usable(export: str) -> tuple[bool, str]:
        """(True, "ok") when pre-content events can hold writers of `export`, else (False, why)."""
        export = os.path.realpath(export)
        if export in fanotify._SYSTEM_DIRS:
            return False, f"{export} is a system directory; its mount is never marked"
        ok, why = fanotify.available(export)
        if not ok:
            return False, why
        ok, why = bindmount.available()
        if not ok:
            return False, f"bind mounts: {why}"
        try:
            where = bindmount.find_mount(export)
        except OSError as exc:
            return False, f"cannot find the mount of {export}: {exc.strerror}"
        if where.mount_point == export and where.root == "/":
            return False, (f"{export} is the root of a whole {where.fstype} file system; the mark "
                           "is put only on a bind mount of a sub-directory")
        if where.shared:
            return False, (f"the mount holding {export} ({where.mount_point}) is shared: a bind "
                           "would propagate to its peers; run the daemon in its own mount "
                           "namespace (unshare -m --propagation private)")
        return True, "ok"

    # --- life cycle -----------------------------------------------------------------

    async def start(self, daemon) -> None:
        self._daemon = daemon
        export = daemon.fs.root_path  # its root fd was opened before the bind below
        where = bindmount.find_mount(export)
        if where.mount_point == export:
            log.warning("%s is already a mount point (%s, root %s): a bind left by a daemon "
                        "that was killed? It stays underneath; umount it when no daemon runs",
                        export, where.fstype, where.root)
        group = _open_group_on_a_high_fd()
        try:
            bindmount.bind_over_itself(export)
            self._mount = export
            group.mark_mount(export)
            await self._inotify.start(daemon)
        except BaseException:
            group.close()
            if self._mount is not None:
                bindmount.unmount(self._mount)
                self._mount = None
            raise
        self._group = group
        self._seed_in_flight(os.stat(export).st_dev)
        self._slots = asyncio.Semaphore(MAX_CONCURRENT_RECALLS)
        self.control.attach()
        asyncio.get_running_loop().add_reader(group.fileno(), self._on_readable)
        log.info("fanotify: %s bound over itself (private) and marked; the daemon's own I/O "
                 "goes through the mount underneath", export)

    async def stop(self) -> None:
        group, self._group = self._group, None
        if group is not None:
            asyncio.get_running_loop().remove_reader(group.fileno())
            # Every writer still held goes ahead before the group is closed.
            for event in list(self._unanswered.values()):
                self._answer(event, group)
            for task in list(self._tasks):
                task.cancel()
            if self._tasks:
                await asyncio.gather(*self._tasks, return_exceptions=True)
            group.close()  # the kernel allows anything read after this point
        await self._inotify.stop()
        if self._mount is not None:
            try:
                bindmount.unmount(self._mount)
            except OSError as exc:
                log.error("cannot unmount the bind of %s: %s", self._mount, exc)
            self._mount = None

    # --- the daemon's calls -----------------------------------------------------------

    def watch(self, nodeid: int, is_dir: bool) -> None:
        self._inotify.watch(nodeid, is_dir)

    def forget(self, nodeid: int) -> None:
        self._inotify.forget(nodeid)

    def arm(self, nodeid: int) -> bool:
        """Remove the ignore mark of `nodeid`, if it has one; True when no
        modification let through may still be on its way (then, and only then,
        it stops counting as possibly written unseen)."""
        if self._group is None:
            return False
        try:
            key = self._daemon.fs.inode_key(nodeid)
            self._group.arm(self._daemon.fs.inodes.host_fd(nodeid))
        except OSError as exc:
            (log.debug if exc.errno == errno.ESTALE else log.warning)(
                "cannot arm node %d: %s", nodeid, exc)
            return False
        self._marked.discard(key)
        # After arming: inotify events of the dirty period (the daemon's own
        # writes among them) are absorbed now, not taken for new changes.
        self._inotify.arm(nodeid)
        if not self._quiescent(key):
            # Not armed in the lease table: it stays "possibly written unseen"
            # if it was, so the next arm still checks the file is clean.
            self.counters["not_quiescent"] += 1
            return False
        self._unseen.discard(key)
        return True

    def disarm(self, nodeid: int) -> None:
        """Nothing to do in the kernel: a dirty inode keeps raising events, each
        answered at once (`_dispatch`), so that `arm()` knows every thread that
        began a modification of it while it was dirty.  An ignore mark would
        hide them: a write that started under it and is still inside write(2)
        (O_DIRECT, or waiting for the inode lock) would be invisible to both
        the quiescence check and cachestat."""

    def may_have_missed_writes(self, nodeid: int) -> bool:
        """Only an inode that carried an ignore mark (cooled, while no guest knew
        it) can have been written unseen through the marked mount: every other
        write since the mark was placed raised an event, and arm() waits until
        it has landed."""
        try:
            return self._daemon.fs.inode_key(nodeid) in self._unseen
        except OSError:
            return True

    def stats(self) -> dict:
        return {"events": self.events, **self.counters, "inotify_events": self._inotify.events,
                "inotify_watched": self._inotify.watched,
                "disarmed_inodes": len(self._marked), "cooled_inodes": self._cooled,
                "in_flight": sum(len(v) for v in self._in_flight.values())}

    # --- events --------------------------------------------------------------------------

    def _on_readable(self) -> None:
        group = self._group
        if group is None:
            return
        # Each event read holds an fd until it is answered: read only as many as
        # the reserve kept for them holds (host/limits.py, DETECTOR_EVENT_FDS), so
        # the kernel never lacks an fd for one (it would deny it: EPERM for the
        # host process).  The rest wait in the kernel's queue, their threads
        # blocked, until answers free room (`_answer`).
        room = DETECTOR_EVENT_FDS - len(self._unanswered)
        if room <= 0:
            self._pause_reading()
            return
        try:
            events = group.read_events(max_events=room)
        except RuntimeError:
            log.exception("fanotify: unreadable event buffer; rebuilding the group")
            self._rebuild()
            return
        except OSError as exc:
            # The kernel could not open an fd for an event and denied it: the
            # descriptor budget failed (something outside it took the reserve).
            self.counters["no_fd"] += 1
            now = time.monotonic()
            if now - self._no_fd_logged_at >= 10.0:
                self._no_fd_logged_at = now
                log.error("fanotify: no descriptor for an event (%s): the kernel denied it "
                          "(EPERM for the host process); %d such so far", exc.strerror,
                          self.counters["no_fd"])
            self._pause_reading(retry_in=0.05)
            return
        for event in events:
            self.events += 1
            if event.fd < 0:
                if event.overflow:
                    log.warning("fanotify queue overflow: recalling every lease")
                    self._daemon.host_local_overflow()
                continue
            self._unanswered[event.fd] = event
            try:
                self._dispatch(event)
            except Exception:
                self.counters["errors"] += 1
                self._throttled.exception("event", "fanotify: handling an event failed; allowing it")
                self._answer(event)

    def _dispatch(self, event: PreContentEvent) -> None:
        st = os.fstat(event.fd)
        key = (st.st_dev, st.st_ino)
        nodeid = self._daemon.fs.inodes.lookup_key(*key)
        dirty = nodeid is not None and self._daemon.leases.dirty_covers(
            nodeid, dirty_enough(event.offset, st.st_size))
        if self.control.watches(key):
            # Held or journaled by an administrator (host/control/): every
            # modification passes the control gate before it is answered.
            access = classify(event.pid, event.fd)
            if not access.may_modify:
                self.counters["reads"] += 1
                self._answer(event)
            elif dirty or nodeid is None:
                self.counters["modifications"] += 1
                self._spawn(self._gated_allow(event, key, access))
            else:
                self.counters["modifications"] += 1
                span = None
                if self._daemon.leases.ranged(nodeid):
                    span = event_span(event.offset, event.count,
                                      access is Access.MODIFY and positioned_write(event.pid))
                self._spawn(self._recall_then_allow(event, nodeid, key, span, access))
            return
        if dirty:
            # Nothing is leased (under range granularity: nothing from the
            # event's page, or the end of file, to the end, which is all any
            # access there can change): allow it at once, read or write, without asking
            # /proc what it is (that costs more than the rest of the event), and
            # remember the thread: no re-arm while it may still be in a write on
            # the inode or its process maps it shared.
            self.counters["dirty"] += 1
            self._record(key, event.pid)
            self._answer(event)
            return
        # During a restarted daemon's grace (host/boot.py) an inode no guest of
        # this daemon knows may still be cached by its predecessor's guests:
        # no ignore mark on it then (writes under one would raise no event).
        in_grace = self._daemon.restart_grace_left() > 0
        access = classify(event.pid, event.fd)
        if not access.may_modify:
            self.counters["reads"] += 1
            if nodeid is None and not in_grace:
                self._cool(event.fd, key)
            self._answer(event)
            return
        self.counters["modifications"] += 1
        if access is Access.MMAP_WRITE:
            self.counters["mmap_writes"] += 1
        if nodeid is None:
            # Nobody can hold a lease on an inode no guest knows.  Should a guest
            # look it up later, arming removes the ignore mark, and the record
            # keeps it unleased while this thread writes to it (its later writes
            # raise no event under the mark).
            self.counters["unknown_inode"] += 1
            self._record(key, event.pid)
            if in_grace:
                # ... and held until the predecessor's leases have surely run out,
                # as the daemon holds the modifications that come through it.
                self.counters["held_for_restart"] += 1
                self._spawn(self._allow_after_restart_grace(event))
                return
            self._cool(event.fd, key)
            self._answer(event)
            return
        span = None
        if self._daemon.leases.ranged(nodeid):
            span = event_span(event.offset, event.count,
                              access is Access.MODIFY and positioned_write(event.pid))
        self._spawn(self._recall_then_allow(event, nodeid, key, span))

    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _allow_after_restart_grace(self, event: PreContentEvent) -> None:
        try:
            await self._daemon._after_restart_grace()
        finally:
            self._answer(event)

    async def _recall_then_allow(self, event: PreContentEvent, nodeid: int,
                                 key: tuple[int, int], span=None,
                                 access: Access | None = None) -> None:
        with self._allowed_on_exit(event, key, "recall",
                                   "fanotify: recall of node %d failed; allowing the write", nodeid):
            async with self._slots:
                self.counters["recalls"] += 1
                await self._daemon.host_local_modify(nodeid, span)
            # An administrator may have frozen the file while the recall ran.
            if self.control.watches(key):
                await self.control.admit(event, key, access or classify(event.pid, event.fd))
                await self._recall_if_clean(key)

    async def _gated_allow(self, event: PreContentEvent, key: tuple[int, int],
                           access: Access) -> None:
        """A modification of a file an administrator holds or journals, that
        needs no recall: through the control gate, then allowed (on every
        path: an error or a cancellation allows it too)."""
        with self._allowed_on_exit(event, key, "gate",
                                   "fanotify: the control gate failed; allowing the write"):
            await self.control.admit(event, key, access)
            await self._recall_if_clean(key)

    @contextmanager
    def _allowed_on_exit(self, event: PreContentEvent, key: tuple[int, int], kind: str,
                         message: str, *args):
        """`with self._allowed_on_exit(event, key, ...):` whatever the body does
        (returns, raises, is cancelled), `event` is recorded and allowed on exit:
        every permission event is answered on every path.  A failure of the body
        is counted and logged (`kind`, `message`, once per 10 s), not raised; a
        cancellation is raised again after the answer."""
        try:
            yield
        except asyncio.CancelledError:
            raise
        except Exception:
            self.counters["errors"] += 1
            self._throttled.exception(kind, message, *args)
        finally:
            self._record(key, event.pid)
            self._answer(event)

    async def _recall_if_clean(self, key: tuple[int, int]) -> None:
        """A write that waited in the control gate: if a guest came to know the
        inode meanwhile and it is CLEAN (leased), recall before it lands."""
        nodeid = self._daemon.fs.inodes.lookup_key(*key)
        if nodeid is not None and self._daemon.leases.state_of(nodeid) is InodeState.CLEAN:
            async with self._slots:
                self.counters["recalls"] += 1
                await self._daemon.host_local_modify(nodeid)

    def _seed_in_flight(self, dev: int) -> None:
        """Right after marking: record every thread already inside a write to a
        file of the export's file system.  It got past no event of ours (it
        began before this daemon, under a predecessor or none), so without a
        record no arm() would wait for it and a lease could be granted under a
        write still to land (a daemon restarted while a host write was in
        write(2)).  Marked first, then scanned: a write that begins after the
        scan raises an event."""
        # Files processes had open for writing before the mark: those fds are on
        # the mount underneath (or a predecessor's bind), so their writes raise
        # no event of ours.  Such a file is not armed while one is still open.
        self._unmarked_writers = fanotify.writers_by_file(dev)
        self.counters["unmarked_writable_files"] = len(self._unmarked_writers)
        seeded = 0
        for tid, tgid, key in fanotify.modifying_threads(dev):
            flights = self._in_flight.setdefault(key, {})
            if tid not in flights:
                flights[tid] = _InFlight(tid, tgid)
                seeded += 1
        self.counters["seeded_in_flight"] = seeded
        if seeded:
            log.info("fanotify: %d thread(s) were already writing to files of the export's "
                     "file system; those files are leased once they are done", seeded)

    def _record(self, key: tuple[int, int], tid: int) -> None:
        """Remember that thread `tid` got past an event on `key` (once per thread)."""
        flights = self._in_flight.setdefault(key, {})
        if tid not in flights:
            flights[tid] = _InFlight(tid, _tgid_of(tid))

    def _pause_reading(self, retry_in: float | None = None) -> None:
        """Stop reading events until `_answer` frees room (or `retry_in` s pass)."""
        if self._reading_paused or self._group is None:
            return
        self._reading_paused = True
        self.counters["reading_paused"] += 1
        loop = asyncio.get_running_loop()
        loop.remove_reader(self._group.fileno())
        if retry_in is not None:
            loop.call_later(retry_in, self._resume_reading)

    def _resume_reading(self) -> None:
        if not self._reading_paused or self._group is None:
            return
        self._reading_paused = False
        asyncio.get_running_loop().add_reader(self._group.fileno(), self._on_readable)

    def _answer(self, event: PreContentEvent, group: PreContentGroup | None = None) -> None:
        """Allow `event` once; later calls for the same event do nothing (its fd
        number may already belong to a newer event)."""
        if self._unanswered.get(event.fd) is not event:
            return
        del self._unanswered[event.fd]
        if self._reading_paused and len(self._unanswered) < DETECTOR_EVENT_FDS // 2:
            self._resume_reading()
        group = group or self._group
        if group is None:
            return  # closed: the kernel allowed it
        try:
            group.respond(event)
        except OSError as exc:
            log.error("fanotify: answering an event failed: %s", exc)

    def _cool(self, event_fd: int, key: tuple[int, int]) -> None:
        """An inode no guest knows: stop paying an event per access (ignore mark)."""
        if key in self._marked or len(self._marked) >= MAX_COOLED or self.control.watches(key):
            return
        try:
            self._group.disarm(event_fd)
        except OSError as exc:
            log.debug("cannot put an ignore mark: %s", exc)
            return
        self._marked.add(key)
        self._unseen.add(key)
        self._cooled += 1

    def _quiescent(self, key: tuple[int, int]) -> bool:
        """No modification let through on `key` may still be on its way, and no
        process holds it open for writing through an fd we cannot see."""
        if self._in_flight.get(key) and not self._prune(key):
            return False
        if (tgids := self._unmarked_writers.get(key)) is not None:
            now = time.monotonic()
            if now < self._unmarked_checked.get(key, 0.0) + UNMARKED_RECHECK_S:
                return False  # each check reads the fds of those processes: not on every READ
            self._unmarked_checked[key] = now
            tgids -= {t for t in tgids if not fanotify.has_open_for_write(t, key)}
            if tgids:
                return False
            del self._unmarked_writers[key]
            self._unmarked_checked.pop(key, None)
        if len(self._in_flight) > self._prune_at:  # records of inodes nobody re-arms
            for other in list(self._in_flight):
                # A marked inode's records count when its mark comes off (arm).
                if other not in self._marked:
                    self._prune(other)
            self._prune_at = max(1024, 2 * len(self._in_flight))
        return True

    def _prune(self, key: tuple[int, int]) -> bool:
        """Drop the records of `key` that are over; True if none is left."""
        flights = self._in_flight.get(key, {})
        for tid, flight in list(flights.items()):
            if flight.over(key):
                del flights[tid]
        if flights:
            return False
        self._in_flight.pop(key, None)
        return True

    def _rebuild(self) -> None:
        """The event stream cannot be parsed: close the group (the kernel allows
        every pending event), mark the mount with a fresh one, recall every lease."""
        old, self._group = self._group, None
        loop = asyncio.get_running_loop()
        loop.remove_reader(old.fileno())
        self._unanswered.clear()
        old.close()  # its ignore marks go with it: every inode is armed again
        self._marked.clear()  # (those in _unseen stay there: they may have been written unseen)
        group = _open_group_on_a_high_fd()
        group.mark_mount(self._mount)
        self._group = group
        self._reading_paused = False
        loop.add_reader(group.fileno(), self._on_readable)
        self._daemon.host_local_overflow()
