"""A guest that mounts: the real kernel page cache is the guest cache.

`cleanlease guest --connect ADDR --mount MNT` mounts a FUSE file system at
MNT through /dev/fuse and forwards every kernel request, with the same
opcode and node id, to the host daemon through `GuestClient.request`.  The
kernel caches pages, attributes and dentries; this module decides, from the
lease each reply carries, what the kernel may keep, and turns the host's
INVALIDATE / INVAL_ENTRY into FUSE_NOTIFY_INVAL_INODE / _ENTRY before the
ACK goes back.  docs/mount.md gives the design and the proof that no read
returns stale data; the rules, in short:

  R1  Requests are read and answered on the asyncio thread; notifications
      are written on notifier threads, which answer nothing.  A notification
      may sleep on a page locked for a READ we have not answered yet; that
      READ is answered by the asyncio thread meanwhile, so nothing waits on
      itself (KERNEL-NOTES: never invalidate a page whose READ you have not
      answered from the same thread).
  R2  The ACK of an INVALIDATE is written only once the kernel has dropped
      the pages and attributes (the notification write returned).  The
      asyncio thread does not wait for it: the ACK is held back
      (`on_invalidate` returns a future; the client ACKs when it completes
      successfully: never for a notification that failed or was cancelled).
  R3  Lease policies: a file opens with FOPEN_KEEP_CACHE only if its OPEN
      reply carries a grant the guest accepts; otherwise FOPEN_DIRECT_IO.
      Every open for write is DIRECT_IO (the host never grants to it), so no
      request ever holds page locks while it waits on the host.
  R4  Lease policies: attributes are valid in the kernel only under a lease
      (attr_valid = the lease's remaining term, 0 without a grant), and the
      connection runs with FUSE_AUTO_INVAL_DATA, so every read(2) of a
      cached file whose inode is not leased first sends GETATTR.  That
      GETATTR waits for the READs already in flight, drops the pages
      that unleased READ replies put into the page cache ("tainted"), and
      only then answers.  A reply that would make attributes valid drops
      tainted pages first.
  R5  Own modifications (WRITE, SETATTR, CREATE, open for write) drop the
      kernel's cached pages of the inode before the reply goes back.
  R6  The kernel drops a GETATTR reply if the inode's attr_version moved
      while it waited (any INVAL_INODE, or another reply taken first), and a
      read then stops at the old i_size.  So before answering a read's
      GETATTR (one with a file handle) whose size is above every size the
      kernel may hold, the guest grows i_size with FUSE_NOTIFY_STORE of the
      file's last byte (`_repair_size`; docs/mount.md, "The size a read sees").
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import errno
import json
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass, field

from guest.client import GuestClient, HostError, SessionLost
from guest.fuse_device import (
    FUSE_ASYNC_READ,
    FUSE_AUTO_INVAL_DATA,
    FUSE_BIG_WRITES,
    FUSE_GETATTR_FH,
    FUSE_MAX_PAGES,
    FUSE_PARALLEL_DIROPS,
    WATCHDOG_FIRED,
    BatchForgetIn,
    FuseDevice,
    ForgetOne,
    StatfsOut,
    Watchdog,
    parse_request,
)
from protocol import fuse, wire
from protocol.fuse import (
    FATTR_ATIME,
    FATTR_ATIME_NOW,
    FATTR_MTIME,
    FATTR_MTIME_NOW,
    FOPEN_DIRECT_IO,
    FOPEN_KEEP_CACHE,
    Opcode,
)
from protocol.messages import (
    Create,
    Flush,
    Fsync,
    Getattr,
    InvalEntry,
    Invalidate,
    LeaseGrant,
    Lookup,
    Mkdir,
    Open,
    Policy,
    Read,
    Readdir,
    Release,
    Rename,
    Rmdir,
    Setattr,
    Unlink,
    Write,
)

log = logging.getLogger("cleanlease.mount")

PAGE = 4096
NOTIFIER_THREADS = 4
# What the kernel may ask for in one READ/WRITE: bounded by the frame size.
MAX_PAGES_LIMIT = 256
# The watchdog fires this much before the term's end (the smaller of the two),
# so that its purge is over before the host's clock margin runs out too
# (host/leases.py, term_end: at least 50 ms and 1% of the term after it).
WATCHDOG_GUARD_S = 0.1
WATCHDOG_GUARD_SHARE = 0.1
TERM_PUBLISH_S = 0.02  # how often the term's end is published to the watchdog


class MountClient(GuestClient):
    """The client of a mount.  Its `on_invalidate` returns a future, so that the
    ACK waits until the kernel has dropped its copy (R2), without blocking the
    thread that must answer the READs the kernel may be waiting on (R1).

    Node ids belong to one session, and the kernel keeps using the ones it
    has, so a mount cannot carry over to a new session: connect with
    reconnect=False and unmount when the session ends.

    The kernel's page cache takes every READ reply, leased or not (R4 drops
    an unleased one again, but not at once): so it tells the host so
    (FEATURE_CACHES_UNLEASED), and the host recalls it before the next
    modification of an inode it read without a lease.
    """

    extra_features = wire.FEATURE_CACHES_UNLEASED


@dataclass
class MountStats:
    """Counters of one mounted guest (written as JSON to --stats)."""

    requests: int = 0
    read_requests: int = 0  # READs received (counted on arrival; kernel_reads once answered)
    kernel_reads: int = 0  # READ requests: every one is a kernel page-cache miss or a direct read
    kernel_read_bytes: int = 0
    cached_reads: int = 0  # READs on KEEP_CACHE handles (page-cache misses)
    cached_read_bytes: int = 0
    direct_reads: int = 0  # READs on DIRECT_IO handles (no page cache)
    direct_read_bytes: int = 0
    kernel_writes: int = 0
    kernel_write_bytes: int = 0
    opens_cached: int = 0
    opens_direct: int = 0
    lookups: int = 0
    getattrs: int = 0
    invalidations: int = 0  # INVALIDATE from the host
    inval_entries: int = 0  # INVAL_ENTRY from the host
    notify_inval_inode: int = 0  # FUSE_NOTIFY_INVAL_INODE written
    notify_inval_entry: int = 0
    notify_errors: int = 0  # failed, cancelled, or refused by the kernel
    notify_nothing_cached: int = 0  # answered ENOENT: the kernel holds no such inode or name
    notify_max_ns: int = 0  # longest a notification write took
    acks_held: int = 0  # invalidations whose ACK waits for the kernel's answer
    acks_withheld: int = 0  # ... and got none: the notification failed or was cancelled
    unleased_cached_replies: int = 0  # READ replies on KEEP_CACHE handles without a grant
    purges: int = 0  # page drops the guest started itself (R4, R5)
    size_repairs: int = 0  # FUSE_NOTIFY_STOREs that grew the kernel's i_size ("The size a read sees")
    enosys: dict[str, int] = field(default_factory=dict)
    errors: int = 0

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def hit_rate(app_read_bytes: int, stats: dict | MountStats) -> float:
    """Hit rate of a mounted guest: the share of what the application read that
    the kernel did not have to fetch from the guest (pages, not calls)."""
    if isinstance(stats, MountStats):
        stats = stats.as_dict()
    if app_read_bytes <= 0:
        return 0.0
    fetched = stats["kernel_read_bytes"]
    return max(0.0, 1.0 - fetched / app_read_bytes)


class _Inode:
    """What the guest knows about the kernel's copy of one inode."""

    __slots__ = ("reads", "tainted", "taint_seq", "fill_seq", "may_have_pages",
                 "purge_scheduled")

    def __init__(self):
        self.reads: set[asyncio.Future] = set()  # READs not yet answered to the kernel
        self.tainted = False  # unleased data may be in the page cache
        self.taint_seq = 0
        self.fill_seq = 0
        self.may_have_pages = False
        self.purge_scheduled = False


class NotificationFailed(Exception):
    """A notification did not reach the kernel, or the kernel refused it."""

    def __init__(self, err: int):
        super().__init__(f"notification failed: {os.strerror(err)}")
        self.errno = err


class _Reply(Exception):
    """Raised by a handler to answer with an errno."""

    def __init__(self, err: int):
        self.err = err


class GuestMount:
    """Serves one FUSE mount from one connected MountClient."""

    def __init__(self, client: MountClient, mountpoint: str, *, stats_path: str | None = None,
                 read_delay: float = 0.0, hold_purges: bool = False):
        self.client = client
        self.read_delay = read_delay  # fault injection: hold every READ reply this long
        # Fault injection: never drop an unleased READ reply's pages right after
        # it (R4's scheduled purge), so that the next GETATTR must drop them.
        self.hold_purges = hold_purges
        self.cache = client.cache
        self.policy: Policy = client.policy
        self.leases = self.cache.uses_leases
        self.mountpoint = os.path.realpath(mountpoint)
        self.stats_path = stats_path
        frame = client.hello.max_frame
        fit = max(1, min(MAX_PAGES_LIMIT, (frame - 2 * PAGE) // PAGE))
        self.max_pages = 1 << (fit.bit_length() - 1)  # a power of two: aligned READs
        self.max_io = self.max_pages * PAGE
        self.dev = FuseDevice(self.max_io)
        self.notifier = concurrent.futures.ThreadPoolExecutor(
            NOTIFIER_THREADS, thread_name_prefix="fuse-notify")
        self.stats = MountStats()
        self.connection: int | None = None  # fusectl number, once mounted
        self.handles: dict[int, bool] = {}  # fh -> opened with KEEP_CACHE
        self.inodes: dict[int, _Inode] = {}
        # Regular files: a lower bound of the kernel's i_size (docs/mount.md,
        # "The size a read sees"), over every size the kernel may have taken,
        # and the sizes of attribute replies fetched from the host and not yet
        # sent to the kernel (it may take them too).
        self.size_floor: dict[int, int] = {}
        self._sizes_pending: dict[int, list[int]] = {}
        self.loop = asyncio.get_running_loop()
        self.initialized = self.loop.create_future()
        self.finished = asyncio.Event()  # set when the kernel connection is gone
        self.stop_requested = asyncio.Event()
        self.stop_reason = ""
        self._tasks: set[asyncio.Task] = set()
        self._stats_task: asyncio.Task | None = None
        self._reading = False
        # The watchdog (lease policies; docs/mount.md, "When the term runs out"):
        # node ids whose data may be in the page cache, as it was told of them,
        # and the kernel's lookup count of each (a FORGET to 0: nothing cached).
        self.watchdog: Watchdog | None = None
        self._watchdog_task: asyncio.Task | None = None
        self._announced: set[int] = set()
        self._lookups: dict[int, int] = {}
        self._term_started = False
        self._stopping = False
        self._asked_fire = False
        self.term_ran_out = False  # the watchdog fired on its own: the mount is void
        client.on_invalidate = self._on_invalidate
        self._session_watch = asyncio.ensure_future(self._watch_session(client.session))

    # --- lifecycle ---------------------------------------------------------------

    async def start(self, timeout: float = 10.0) -> None:
        """Mount, and return once the kernel's INIT has been answered (and, under
        the lease policies, the watchdog is watching)."""
        self.dev.mount(self.mountpoint)
        self.connection = self.dev.connection_id()
        self.loop.add_reader(self.dev.fd, self._readable)
        self._reading = True
        try:
            if self.leases:
                await self._start_watchdog(timeout)
            await asyncio.wait_for(asyncio.shield(self.initialized), timeout)
        except BaseException:
            await self.stop()
            raise
        if self.stats_path:
            self._stats_task = asyncio.ensure_future(self._write_stats_loop())

    async def _start_watchdog(self, timeout: float) -> None:
        if self.connection is None:
            raise OSError(errno.ENODEV, f"{self.mountpoint}: no FUSE connection number")
        term = self.cache.lease_term_s
        guard_ns = int(min(WATCHDOG_GUARD_S, WATCHDOG_GUARD_SHARE * term) * 1e9)
        self.watchdog = Watchdog(self.dev.fd, self.connection, self.mountpoint, guard_ns)
        ready = self.loop.create_future()

        def readable():
            self.loop.remove_reader(self.watchdog.ready_fd)
            if not ready.done():
                ready.set_result(os.read(self.watchdog.ready_fd, 1))

        self.loop.add_reader(self.watchdog.ready_fd, readable)
        if await asyncio.wait_for(ready, timeout) != b"R":
            raise OSError(errno.ECHILD, "the mount's watchdog did not start")
        self._publish_term()
        self._watchdog_task = asyncio.ensure_future(self._watch_the_watchdog())

    def _publish_term(self) -> None:
        """Tell the watchdog until when this guest's leases last (monotonic ns)."""
        until = self.cache.renewed_until
        if until > 0:
            self._term_started = True
            self.watchdog.publish(int(until * 1e9))
        elif self._term_started and not self._asked_fire:
            self.watchdog.publish(1)  # cleared (fenced): over already
            self._asked_fire = self.watchdog.fire()

    async def _watch_the_watchdog(self) -> None:
        """Publish the term every few ms; stop the mount if the watchdog exits."""
        exited = asyncio.Event()
        self.loop.add_reader(self.watchdog.pidfd, exited.set)
        interval = min(TERM_PUBLISH_S, self.cache.lease_term_s / 50)
        try:
            while not exited.is_set():
                self._publish_term()
                try:
                    await asyncio.wait_for(exited.wait(), interval)
                except asyncio.TimeoutError:
                    pass
        finally:
            self.loop.remove_reader(self.watchdog.pidfd)
        status = self.watchdog.proc.wait()
        if not self._stopping:
            if status == WATCHDOG_FIRED:
                self.request_stop("the lease term ran out: the watchdog aborted and purged "
                                  "the mount")
            else:
                log.error("the watchdog of %s exited (%s): stopping the mount", self.mountpoint,
                          status)
                self.request_stop(f"the watchdog exited ({status})")

    def _announce(self, nodeid: int) -> None:
        """Data of `nodeid` may enter the page cache: the watchdog must purge it."""
        if self.watchdog is not None and nodeid not in self._announced:
            self._announced.add(nodeid)
            self.watchdog.add(nodeid)

    def _forgotten(self, nodeid: int, nlookup: int) -> None:
        count = self._lookups.get(nodeid)
        if count is None:
            return
        count -= nlookup
        if count > 0:
            self._lookups[nodeid] = count
            return
        # The kernel evicted the inode (fuse_evict_inode sends the FORGET): no pages.
        del self._lookups[nodeid]
        if nodeid in self._announced:
            self._announced.discard(nodeid)
            self.watchdog.remove(nodeid)

    def request_stop(self, reason: str) -> None:
        if not self.stop_reason:
            self.stop_reason = reason
        self.stop_requested.set()

    async def stop(self, timeout: float = 3.0) -> None:
        """Unmount (MNT_DETACH), finish what is in flight, close /dev/fuse.

        Once no file is open on the mount any more the kernel ends the
        connection (read gives ENODEV), and the pages go with the file system.
        Files still open (or mapped) keep it, and with it their pages; then the
        connection is aborted and every inode purged, so that they cannot serve
        old bytes once this guest's term has run out (by the watchdog, which
        can abort from a private mount namespace; without one, by the guest)."""
        self._stopping = True
        try:
            self.dev.umount()
        except OSError as exc:
            log.warning("umount %s: %s", self.mountpoint, exc)
        purge_here = False
        try:
            await asyncio.wait_for(self.finished.wait(), timeout)
        except asyncio.TimeoutError:
            if self.watchdog is not None and self.watchdog.alive() and self.watchdog.fire():
                self._asked_fire = True
                log.warning("%s still busy after unmount; the watchdog aborts and purges it",
                            self.mountpoint)
                await self.loop.run_in_executor(None, self._wait_watchdog, timeout)
            else:
                aborted = self.dev.abort(self.connection)
                purge_here = bool(self._announced)
                log.warning("%s still busy after unmount; %s", self.mountpoint,
                            "connection aborted" if aborted else "closing /dev/fuse")
        for task in list(self._tasks):
            task.cancel()  # each answers its request with EINTR: no page stays locked
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout)
        if self._reading:
            self.loop.remove_reader(self.dev.fd)
            self._reading = False
        await asyncio.get_running_loop().run_in_executor(
            None, lambda: self.notifier.shutdown(wait=True, cancel_futures=True))
        if purge_here:  # no READ is unanswered any more: nothing can block these
            await self.loop.run_in_executor(None, self._purge_all_here)
        if self._watchdog_task is not None:
            self._watchdog_task.cancel()
            await asyncio.gather(self._watchdog_task, return_exceptions=True)
        if self.watchdog is not None:
            self.watchdog.close(quit=True)
            if self.watchdog.proc.poll() == WATCHDOG_FIRED and not self._asked_fire:
                self.term_ran_out = True
        self.dev.close()
        if self._stats_task is not None:
            self._stats_task.cancel()
        self._session_watch.cancel()
        self.write_stats()
        self.finished.set()

    def _wait_watchdog(self, timeout: float) -> None:
        try:
            self.watchdog.proc.wait(timeout)
        except Exception:  # subprocess.TimeoutExpired
            log.error("the watchdog of %s did not finish", self.mountpoint)

    def _purge_all_here(self) -> None:
        """Without a watchdog: drop every inode that may have pages, ourselves."""
        for nodeid in list(self._announced):
            self.dev.notify_inval_inode(nodeid, 0, 0)

    def write_stats(self) -> None:
        if not self.stats_path:
            return
        tmp = self.stats_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.stats_dict(), f)
        os.replace(tmp, self.stats_path)

    def stats_dict(self) -> dict:
        d = self.stats.as_dict()
        d["policy"] = self.policy.label
        d["mountpoint"] = self.mountpoint
        d["guest_id"] = self.client.hello.guest_id
        d["acks_sent"] = self.client.acks_sent
        d["watchdog_nodeids"] = len(self._announced)  # what its purge would drop
        d["t_ns"] = time.monotonic_ns()  # when this snapshot was taken
        return d

    async def _write_stats_loop(self) -> None:
        """Rewrite the stats file every 20 ms (atomically), so that a reader can
        wait for a snapshot taken after something it did (`t_ns`)."""
        while True:
            try:
                self.write_stats()
            except OSError as exc:
                log.warning("cannot write stats: %s", exc)
            await asyncio.sleep(0.02)

    async def _watch_session(self, session) -> None:
        await asyncio.shield(session.closed)
        self.request_stop("the connection to the host was lost")

    # --- requests in ---------------------------------------------------------------

    def _readable(self) -> None:
        for _ in range(64):  # a bounded batch, so that replies interleave with reading
            try:
                buf = self.dev.read_request()
            except OSError as exc:
                if exc.errno != errno.ENODEV:
                    log.error("reading /dev/fuse: %s", exc)
                self.loop.remove_reader(self.dev.fd)
                self._reading = False
                self.finished.set()
                self.request_stop("the kernel ended the FUSE connection")
                return
            if buf is None:
                return
            self._dispatch(buf)

    def _dispatch(self, buf: bytes) -> None:
        try:
            header, body = parse_request(buf)
        except Exception as exc:  # a kernel that sends garbage: nothing sane to answer
            log.error("malformed request from the kernel: %s", exc)
            return
        self.stats.requests += 1
        opcode = header.opcode
        local = _LOCAL.get(opcode)
        if local is not None:
            local(self, header, body)
            return
        handler = _FORWARDED.get(opcode)
        if handler is None:
            try:
                name = Opcode(opcode).name
            except ValueError:
                name = str(opcode)
            self.stats.enosys[name] = self.stats.enosys.get(name, 0) + 1
            self.dev.reply(header.unique, -errno.ENOSYS)
            return
        # One task per request; tasks start in arrival order and each sends its
        # request before its first await.  FORGETs go out at once (above): a
        # FORGET only takes back lookups the kernel has counted, so the host's
        # counts come out the same in either order.
        task = asyncio.ensure_future(self._serve(handler, header, body))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, handler, header, body) -> None:
        unique = header.unique
        try:
            reply = await handler(self, header, body)
        except _Reply as r:
            self.dev.reply(unique, -r.err)
            return
        except HostError as exc:
            self.dev.reply(unique, -(exc.errno or errno.EIO))
            if exc.errno == errno.EKEYEXPIRED:
                self.request_stop("this guest was fenced by the host")
            return
        except (SessionLost, ConnectionError):
            self.dev.reply(unique, -errno.ENOTCONN)
            return
        except TimeoutError:
            self.dev.reply(unique, -errno.ETIMEDOUT)
            return
        except asyncio.CancelledError:
            self.dev.reply(unique, -errno.EINTR)
            raise
        except Exception:
            self.stats.errors += 1
            log.exception("%s failed", Opcode(header.opcode).name)
            self.dev.reply(unique, -errno.EIO)
            return
        if reply is not None:
            self.dev.reply(unique, 0, reply)

    # --- notifications (R1, R2) -------------------------------------------------------

    def _notify(self, kind: str, fn, *args) -> asyncio.Future:
        """Run one notification write on a notifier thread; the future gives
        (errno, ns taken).  Once the mount has stopped (the notifier is shut
        down, /dev/fuse closed) it fails at once: nothing can reach the kernel."""

        def run():
            started = time.monotonic_ns()
            err = fn(*args)
            return err, time.monotonic_ns() - started

        def done(f: asyncio.Future) -> None:
            if f.cancelled() or f.exception() is not None:
                self.stats.notify_errors += 1
                return
            err, took = f.result()
            self.stats.notify_max_ns = max(self.stats.notify_max_ns, took)
            if kind == "inode":
                self.stats.notify_inval_inode += 1
            elif kind == "entry":
                self.stats.notify_inval_entry += 1
            if err == errno.ENOENT:
                self.stats.notify_nothing_cached += 1
            elif err:
                self.stats.notify_errors += 1
                log.warning("notify %s%r: %s", kind, args, os.strerror(err))

        try:
            future = asyncio.wrap_future(self.notifier.submit(run), loop=self.loop)
        except RuntimeError:  # the notifier is shut down: the mount has stopped
            future = self.loop.create_future()
            future.set_exception(NotificationFailed(errno.ESHUTDOWN))
        future.add_done_callback(done)
        return future

    def _on_invalidate(self, event) -> asyncio.Future | None:
        """Tell the kernel to drop its copy.  The client ACKs when the returned
        future completes, and only if it succeeds (R2): the notification was
        written and the kernel answered 0, or ENOENT (it holds no such inode or
        name, so nothing is cached: fuse_reverse_inval_inode/_entry).  A
        notification that was cancelled or failed (the mount stopping, /dev/fuse
        closed) fails the future: no ACK, and the host treats this guest as
        silent until its term has run out."""
        if isinstance(event, Invalidate):
            self.stats.invalidations += 1
        elif isinstance(event, InvalEntry):
            self.stats.inval_entries += 1
        else:  # pragma: no cover
            return None
        if not self.initialized.done():
            return None  # before INIT is answered the kernel cannot have cached anything
        if isinstance(event, Invalidate):
            future = self._purge(event.ino, event.offset, event.length)
        else:
            future = self._notify("entry", self.dev.notify_inval_entry, event.parent, event.name,
                                  0)
        self.stats.acks_held += 1
        return self._succeeded(future)

    def _succeeded(self, notification: asyncio.Future) -> asyncio.Future:
        """A future that succeeds once `notification` has, and fails otherwise."""
        outcome = self.loop.create_future()

        def done(f: asyncio.Future) -> None:
            if outcome.done():
                return
            if f.cancelled():
                err = errno.ECANCELED
            elif f.exception() is not None:
                exc = f.exception()
                err = exc.errno if isinstance(exc, NotificationFailed) else errno.EIO
            else:
                err = f.result()[0]
            if err in (0, errno.ENOENT):
                outcome.set_result(None)
            else:
                self.stats.acks_withheld += 1
                outcome.set_exception(NotificationFailed(err))

        notification.add_done_callback(done)
        return outcome

    def _inode(self, nodeid: int) -> _Inode:
        """Called before data of `nodeid` can reach the page cache (READ, STORE)."""
        st = self.inodes.get(nodeid)
        if st is None:
            st = self.inodes[nodeid] = _Inode()
        if nodeid not in self._announced:
            self._announce(nodeid)
        return st

    def _purge(self, nodeid: int, off: int = 0, length: int = 0) -> asyncio.Future:
        """Drop the kernel's pages (from `off`; all by default) and attributes of
        `nodeid`.  A whole-file purge clears the tainted mark unless an unleased
        READ reply went out while it ran."""
        st = self._inode(nodeid)
        taint_seq, fill_seq = st.taint_seq, st.fill_seq
        future = self._notify("inode", self.dev.notify_inval_inode, nodeid, off, length)

        def done(f: asyncio.Future) -> None:
            if f.cancelled() or f.exception() is not None or off != 0 or length > 0:
                return
            if f.result()[0] not in (0, errno.ENOENT):
                return  # nothing was dropped
            if st.taint_seq == taint_seq:
                st.tainted = False
            if st.fill_seq == fill_seq:
                st.may_have_pages = False

        future.add_done_callback(done)
        return future

    async def _drain_and_purge(self, nodeid: int, reads: list[asyncio.Future]) -> None:
        """R4: wait until the READs in `reads` are answered, then drop tainted pages."""
        if reads:
            await asyncio.wait(reads)
        st = self.inodes.get(nodeid)
        if st is not None and st.tainted:
            self.stats.purges += 1
            await self._purge(nodeid)

    def _schedule_purge(self, nodeid: int) -> None:
        st = self._inode(nodeid)
        if st.purge_scheduled:
            return
        st.purge_scheduled = True

        async def run():
            st.purge_scheduled = False  # a taint from now on schedules another
            if st.tainted:
                self.stats.purges += 1
                await self._purge(nodeid)

        task = asyncio.ensure_future(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _own_modification(self, nodeid: int, lease: LeaseGrant) -> None:
        """R5: after our own modification of `nodeid` the kernel may not keep its pages."""
        ino = lease.ino or nodeid
        if lease.ino:
            self.cache.invalidate_inode(lease.ino, lease.generation)
        else:
            self.cache.forget_own_copy(ino)
        if not self.leases:
            return
        st = self.inodes.get(ino)
        if st is not None and (st.may_have_pages or st.reads or st.tainted):
            self.stats.purges += 1
            await self._purge(ino)

    # --- lease rules for what the kernel may keep (R3, R4) ---------------------------

    def _accept(self, lease: LeaseGrant) -> bool:
        """True if the reply's content may stay cached in the kernel."""
        return self.leases and self.cache.accept_grant(lease) and self.cache.may_serve_data(lease.ino)

    def _valid_for(self, granted: bool, sec: int, nsec: int) -> tuple[int, int]:
        """Kernel timeout for attributes/entries: the host's, capped by the lease."""
        if not self.leases:
            return sec, nsec
        if not granted:
            return 0, 0
        remaining = min(self.cache.renewed_until - self.cache.clock(), sec + nsec / 1e9)
        if remaining <= 0:
            return 0, 0
        whole = int(remaining)
        return whole, int((remaining - whole) * 1e9)

    async def _attrs_granted(self, nodeid: int, lease: LeaseGrant) -> bool:
        """For a reply carrying attributes of `nodeid`: may the kernel keep them?

        Only under an accepted grant, and only once no tainted page is left
        (R4): valid attributes let later reads skip the GETATTR check."""
        if not self._accept(lease):
            return False
        st = self.inodes.get(nodeid)
        if st is not None and (st.tainted or st.reads):
            await self._drain_and_purge(nodeid, list(st.reads))
            if st.tainted:
                return False
        return self._accept(lease)

    def _entry_bytes(self, parent: int, entry, attr_granted: bool) -> bytes:
        if self.leases:
            parent_leased = self.cache.may_serve_data(parent)
            entry_valid = self._valid_for(parent_leased, entry.entry_valid, entry.entry_valid_nsec)
        else:
            entry_valid = (entry.entry_valid, entry.entry_valid_nsec)
        attr_valid = self._valid_for(attr_granted, entry.attr_valid, entry.attr_valid_nsec)
        self._size_sent(entry.nodeid, entry.attr)
        self._lookups[entry.nodeid] = self._lookups.get(entry.nodeid, 0) + 1
        return fuse.EntryOut.build({
            "nodeid": entry.nodeid, "generation": entry.generation,
            "entry_valid": entry_valid[0], "attr_valid": attr_valid[0],
            "entry_valid_nsec": entry_valid[1], "attr_valid_nsec": attr_valid[1],
            "attr": dataclasses.asdict(entry.attr)})

    def _attr_bytes(self, nodeid: int, out, granted: bool) -> bytes:
        valid = self._valid_for(granted, out.attr_valid, out.attr_valid_nsec)
        self._size_sent(nodeid, out.attr)
        return fuse.AttrOut.build({"attr_valid": valid[0], "attr_valid_nsec": valid[1],
                                   "attr": dataclasses.asdict(out.attr)})

    # --- the kernel's i_size (docs/mount.md, "The size a read sees") ---------------

    def _size_fetched(self, nodeid: int, attr) -> None:
        """The host answered with `attr`: a reply carrying its size is on its way
        to the kernel (call before any await, and pair with `_size_sent`)."""
        if attr.mode & 0o170000 == 0o100000:
            self._sizes_pending.setdefault(nodeid, []).append(attr.size)

    def _size_sent(self, nodeid: int, attr) -> None:
        """A reply carrying `attr` goes to the kernel, which may take its size."""
        if attr.mode & 0o170000 != 0o100000:
            return
        pending = self._sizes_pending.get(nodeid)
        if pending and attr.size in pending:
            pending.remove(attr.size)
            if not pending:
                del self._sizes_pending[nodeid]
        floor = self.size_floor.get(nodeid)
        self.size_floor[nodeid] = attr.size if floor is None else min(floor, attr.size)

    def _size_bound(self, nodeid: int, excluding: int) -> int | None:
        """The floor, lowered by every pending reply's size but one `excluding`."""
        pending = list(self._sizes_pending.get(nodeid, ()))
        if excluding in pending:
            pending.remove(excluding)
        floor = self.size_floor.get(nodeid)
        sizes = pending + ([] if floor is None else [floor])
        return min(sizes) if sizes else None

    def _may_shrink_to(self, nodeid: int, size: int) -> None:
        """A short READ reply: the kernel may cut i_size down to `size`."""
        floor = self.size_floor.get(nodeid)
        if floor is not None and size < floor:
            self.size_floor[nodeid] = size

    def _grows_to(self, nodeid: int, size: int) -> None:
        """The kernel's i_size is now at least `size` (its own WRITE, a STORE)."""
        floor = self.size_floor.get(nodeid)
        if floor is not None and size > floor:
            self.size_floor[nodeid] = size

    async def _repair_size(self, nodeid: int, fh: int, size: int) -> None:
        """Before answering a read(2)'s GETATTR that says `size`: make sure the
        kernel's i_size is at least `size`, whether or not it takes this reply.

        The kernel drops a GETATTR reply when the inode's attr_version moved on
        while it waited (fuse_change_attributes: any FUSE_NOTIFY_INVAL_INODE of
        the inode, our R4 purges and the host's recalls alike, or another
        attribute reply it took first); the read then stops at the old
        i_size.  So when `size` is above every size the kernel may hold
        (`size_floor`), store the file's last byte, fetched from the host now,
        with FUSE_NOTIFY_STORE: that grows i_size to `size` (and makes the
        kernel drop this reply, harmlessly: its size is in already).  Replies
        fetched but not sent yet count: the kernel may take one after this."""
        bound = self._size_bound(nodeid, excluding=size)
        if size <= 0 or (bound is not None and size <= bound):
            return
        try:
            reply = await self.client.request(nodeid, Read(fh, size - 1, 1, 0, 0, 0))
        except HostError:
            return  # e.g. a write-only handle (lseek(SEEK_END) asks too): no read follows
        data = reply.body.data
        if len(data) != 1:
            return  # it shrank meanwhile: a READ will cut the kernel's i_size (short reply)
        st = self._inode(nodeid)
        leased = self._accept(reply.lease)
        if not leased:
            # The byte may land in an uptodate page (when `size - 1` starts a
            # page): unleased data, like any unleased READ reply (R4).
            st.tainted = True
            st.taint_seq += 1
        st.fill_seq += 1
        st.may_have_pages = True
        err, _ = await self._notify("store", self.dev.notify_store, nodeid, size - 1, data)
        if err == 0:
            self.stats.size_repairs += 1
            self._grows_to(nodeid, size)

    def _open_flags(self, writing: bool, granted: bool) -> int:
        match self.policy:
            case Policy.NEVER:
                return FOPEN_DIRECT_IO
            case Policy.ALWAYS | Policy.TTL:
                return FOPEN_KEEP_CACHE
        return FOPEN_KEEP_CACHE if granted and not writing else FOPEN_DIRECT_IO

    def _opened(self, fh: int, flags: int) -> bytes:
        keep = bool(flags & FOPEN_KEEP_CACHE)
        self.handles[fh] = keep
        if keep:
            self.stats.opens_cached += 1
        else:
            self.stats.opens_direct += 1
        return fuse.OpenOut.build({"fh": fh, "open_flags": flags, "backing_id": 0})


# --- requests answered by the guest itself -------------------------------------------


def _init(m: GuestMount, h, body) -> None:
    arg = fuse.InitIn.parse(bytes(body[: fuse.InitIn.sizeof()]).ljust(fuse.InitIn.sizeof(), b"\0"))
    if arg.major != fuse.KERNEL_MAJOR:
        log.error("kernel FUSE major %d; only 7 is spoken", arg.major)
        m.dev.reply(h.unique, -errno.EPROTO)
        return
    wanted = FUSE_ASYNC_READ | FUSE_BIG_WRITES | FUSE_AUTO_INVAL_DATA | FUSE_PARALLEL_DIROPS
    wanted |= FUSE_MAX_PAGES
    out = fuse.InitOut.build({
        "major": fuse.KERNEL_MAJOR, "minor": min(arg.minor, fuse.KERNEL_MINOR),
        "max_readahead": arg.max_readahead, "flags": arg.flags & wanted,
        "max_background": 16, "congestion_threshold": 12, "max_write": m.max_io,
        "time_gran": 1, "max_pages": m.max_pages, "map_alignment": 0, "flags2": 0,
        "max_stack_depth": 0, "request_timeout": 0})
    m.dev.reply(h.unique, 0, out)
    if not arg.flags & FUSE_AUTO_INVAL_DATA and m.leases:
        log.warning("kernel lacks FUSE_AUTO_INVAL_DATA: reads of unleased cached files "
                    "are not re-checked (docs/mount.md, R4)")
    if not m.initialized.done():
        m.initialized.set_result(arg.minor)


def _forget(m: GuestMount, h, body) -> None:
    nlookup = fuse.ForgetIn.parse(bytes(body)).nlookup
    m._forgotten(h.nodeid, nlookup)
    m.client.forget(h.nodeid, nlookup)


def _batch_forget(m: GuestMount, h, body) -> None:
    count = BatchForgetIn.parse(bytes(body[:8])).count
    size = ForgetOne.sizeof()
    for i in range(count):
        one = ForgetOne.parse(bytes(body[8 + i * size: 8 + (i + 1) * size]))
        m._forgotten(one.nodeid, one.nlookup)
        m.client.forget(one.nodeid, one.nlookup)


def _opendir(m: GuestMount, h, body) -> None:
    # The host reads directories by node id; no handle is needed.
    m.dev.reply(h.unique, 0, fuse.OpenOut.build({"fh": 0, "open_flags": 0, "backing_id": 0}))


def _empty(m: GuestMount, h, body) -> None:
    m.dev.reply(h.unique, 0)  # RELEASEDIR, ACCESS (default_permissions checks modes)


def _statfs(m: GuestMount, h, body) -> None:
    # The protocol has no STATFS yet: report a large, mostly free file system.
    m.dev.reply(h.unique, 0, StatfsOut.build({
        "blocks": 1 << 30, "bfree": 1 << 29, "bavail": 1 << 29, "files": 1 << 24,
        "ffree": 1 << 23, "bsize": PAGE, "namelen": 255, "frsize": PAGE}))


def _interrupt(m: GuestMount, h, body) -> None:
    pass  # the request runs to completion and is answered normally


def _destroy(m: GuestMount, h, body) -> None:
    m.dev.reply(h.unique, 0)
    m.request_stop("the kernel sent DESTROY")


_LOCAL = {
    Opcode.INIT: _init,
    Opcode.FORGET: _forget,
    Opcode.BATCH_FORGET: _batch_forget,
    Opcode.OPENDIR: _opendir,
    Opcode.RELEASEDIR: _empty,
    Opcode.ACCESS: _empty,
    Opcode.STATFS: _statfs,
    Opcode.INTERRUPT: _interrupt,
    Opcode.DESTROY: _destroy,
}


# --- requests forwarded to the host ----------------------------------------------------


async def _lookup(m: GuestMount, h, body) -> bytes:
    name = fuse.LookupIn.parse(bytes(body)).name
    m.stats.lookups += 1
    reply = await m.client.request(h.nodeid, Lookup(name))
    entry = reply.body
    m._size_fetched(entry.nodeid, entry.attr)
    granted = await m._attrs_granted(entry.nodeid, reply.lease)
    return m._entry_bytes(h.nodeid, entry, granted)


async def _getattr(m: GuestMount, h, body) -> bytes:
    arg = fuse.GetattrIn.parse(bytes(body))
    fh = arg.fh if arg.getattr_flags & FUSE_GETATTR_FH else 0
    m.stats.getattrs += 1
    st = m.inodes.get(h.nodeid)
    # R4: the READs in flight now may carry data older than the read(2) that
    # sent this GETATTR; it must not find their pages.
    earlier_reads = list(st.reads) if st is not None else []
    reply = await m.client.request(h.nodeid, Getattr(fh, arg.getattr_flags))
    m._size_fetched(h.nodeid, reply.body.attr)
    if m.leases and st is not None:
        await m._drain_and_purge(h.nodeid, earlier_reads)
    granted = await m._attrs_granted(h.nodeid, reply.lease)
    if m.leases and arg.getattr_flags & FUSE_GETATTR_FH:
        # A GETATTR with a file handle comes from read(2) (fuse_cache_read_iter),
        # which then reads up to the kernel's i_size, whatever this reply says.
        await m._repair_size(h.nodeid, fh, reply.body.attr.size)
    return m._attr_bytes(h.nodeid, reply.body, granted)


async def _setattr(m: GuestMount, h, body) -> bytes:
    a = fuse.SetattrIn.parse(bytes(body))
    valid, now = a.valid, time.time_ns()
    atime, atimensec, mtime, mtimensec = a.atime, a.atimensec, a.mtime, a.mtimensec
    if valid & FATTR_ATIME_NOW:
        valid, atime, atimensec = valid | FATTR_ATIME, now // 10**9, now % 10**9
    if valid & FATTR_MTIME_NOW:
        valid, mtime, mtimensec = valid | FATTR_MTIME, now // 10**9, now % 10**9
    op = Setattr(valid=valid, fh=a.fh, size=a.size, atime=atime, mtime=mtime, ctime=a.ctime,
                 atimensec=atimensec, mtimensec=mtimensec, ctimensec=a.ctimensec, mode=a.mode,
                 uid=a.uid, gid=a.gid, lock_owner=a.lock_owner)
    reply = await m.client.request(h.nodeid, op)
    m._size_fetched(h.nodeid, reply.body.attr)
    await m._own_modification(h.nodeid, reply.lease)
    return m._attr_bytes(h.nodeid, reply.body, False)


def _writing(flags: int) -> bool:
    return (flags & os.O_ACCMODE) != os.O_RDONLY or bool(flags & os.O_TRUNC)


async def _open(m: GuestMount, h, body) -> bytes:
    arg = fuse.OpenIn.parse(bytes(body))
    writing = _writing(arg.flags)
    reply = await m.client.request(h.nodeid, Open(arg.flags, arg.open_flags))
    granted = False
    if writing:
        await m._own_modification(h.nodeid, reply.lease)
    elif m._accept(reply.lease):
        st = m.inodes.get(h.nodeid)
        if st is not None and (st.tainted or st.reads):
            await m._drain_and_purge(h.nodeid, list(st.reads))
        granted = m._accept(reply.lease) and not (st is not None and st.tainted)
    return m._opened(reply.body.fh, m._open_flags(writing, granted))


async def _create(m: GuestMount, h, body) -> bytes:
    arg = fuse.CreateIn.parse(bytes(body))
    # The kernel's mode carries the file type (S_IFREG); the protocol's is the
    # permission bits, as open(2) takes them.
    reply = await m.client.request(
        h.nodeid, Create(arg.name, arg.flags, arg.mode & 0o7777, arg.umask, arg.open_flags))
    entry, opened = reply.body.entry, reply.body.open
    m._size_fetched(entry.nodeid, entry.attr)
    await m._own_modification(entry.nodeid, reply.lease)
    flags = m._open_flags(True, False)
    return m._entry_bytes(h.nodeid, entry, False) + m._opened(opened.fh, flags)


async def _read(m: GuestMount, h, body) -> None:
    arg = fuse.ReadIn.parse(bytes(body))
    m.stats.read_requests += 1
    cached = m.handles.get(arg.fh, False)
    nodeid = h.nodeid
    # Every READ is tracked, not only those of KEEP_CACHE handles: a DIRECT_IO
    # handle fills the page cache too through MAP_PRIVATE mmap and splice.
    st = m._inode(nodeid) if m.leases else None
    done = None
    if st is not None:
        done = m.loop.create_future()
        st.reads.add(done)
    try:
        chunks, leases = [], []
        offset, remaining = arg.offset, arg.size
        while remaining > 0:
            size = min(remaining, m.max_io)
            reply = await m.client.request(nodeid, Read(arg.fh, offset, size, arg.read_flags,
                                                        arg.lock_owner, arg.flags))
            data = reply.body.data
            chunks.append(data)
            leases.append(reply.lease)
            if len(data) < size:
                break  # end of file
            offset += size
            remaining -= size
        data = b"".join(chunks)
        if m.read_delay:
            await asyncio.sleep(m.read_delay)
        m.stats.kernel_reads += 1
        m.stats.kernel_read_bytes += len(data)
        if cached:
            m.stats.cached_reads += 1
            m.stats.cached_read_bytes += len(data)
        else:
            m.stats.direct_reads += 1
            m.stats.direct_read_bytes += len(data)
        unleased = st is not None and not all(m._accept(lease) for lease in leases)
        if len(data) < arg.size:
            m._may_shrink_to(nodeid, arg.offset + len(data))  # fuse_read_update_size
        # No await from the grant check to the reply: an INVALIDATE handled in
        # between would otherwise not be seen by the check.
        m.dev.reply(h.unique, 0, data)
        if st is not None:
            st.fill_seq += 1
            st.may_have_pages = True
            if unleased:
                # These pages are not covered by a lease: the kernel may keep
                # them only until we drop them (R4).  On a DIRECT_IO handle
                # too: a mapping of it reads through this same path into the
                # page cache, where other mappings of the file see it.
                st.tainted = True
                st.taint_seq += 1
                if cached:
                    m.stats.unleased_cached_replies += 1
                if not m.hold_purges:
                    m._schedule_purge(nodeid)
        return None
    finally:
        if st is not None:
            st.reads.discard(done)
            done.set_result(None)


async def _write(m: GuestMount, h, body) -> bytes:
    arg = fuse.WriteIn.parse(bytes(body))
    data = bytes(arg.data)
    if arg.size != len(data):
        raise _Reply(errno.EINVAL)
    m.stats.kernel_writes += 1
    m.stats.kernel_write_bytes += len(data)
    reply = await m.client.request(h.nodeid, Write(arg.fh, arg.offset, data, arg.write_flags,
                                                   arg.lock_owner, arg.flags))
    await m._own_modification(h.nodeid, reply.lease)
    m._grows_to(h.nodeid, arg.offset + reply.body.size)  # fuse_write_update_attr
    return fuse.WriteOut.build({"size": reply.body.size})


async def _flush(m: GuestMount, h, body) -> bytes:
    arg = fuse.FlushIn.parse(bytes(body))
    await m.client.request(h.nodeid, Flush(arg.fh, arg.lock_owner))
    return b""


async def _fsync(m: GuestMount, h, body) -> bytes:
    arg = fuse.FsyncIn.parse(bytes(body))
    await m.client.request(h.nodeid, Fsync(arg.fh, arg.fsync_flags))
    return b""


async def _release(m: GuestMount, h, body) -> bytes:
    arg = fuse.ReleaseIn.parse(bytes(body))
    m.handles.pop(arg.fh, None)
    await m.client.request(h.nodeid, Release(arg.fh, arg.flags, arg.release_flags,
                                             arg.lock_owner))
    return b""


async def _readdir(m: GuestMount, h, body) -> bytes:
    arg = fuse.ReadIn.parse(bytes(body))
    reply = await m.client.request(h.nodeid, Readdir(arg.fh, arg.offset, arg.size, arg.read_flags,
                                                     arg.lock_owner, arg.flags))
    m._accept(reply.lease)  # a lease on the directory lets its entries be cached
    return b"".join(fuse.Dirent.build({"ino": e.ino, "off": e.off, "namelen": len(e.name),
                                       "type": e.type, "name": e.name})
                    for e in reply.body.entries)


async def _mkdir(m: GuestMount, h, body) -> bytes:
    arg = fuse.MkdirIn.parse(bytes(body))
    reply = await m.client.request(h.nodeid, Mkdir(arg.name, arg.mode & 0o7777, arg.umask))
    return m._entry_bytes(h.nodeid, reply.body, False)


async def _unlink(m: GuestMount, h, body) -> bytes:
    await m.client.request(h.nodeid, Unlink(fuse.UnlinkIn.parse(bytes(body)).name))
    return b""


async def _rmdir(m: GuestMount, h, body) -> bytes:
    await m.client.request(h.nodeid, Rmdir(fuse.RmdirIn.parse(bytes(body)).name))
    return b""


async def _rename(m: GuestMount, h, body) -> bytes:
    arg = fuse.RenameIn.parse(bytes(body))
    await m.client.request(h.nodeid, Rename(arg.newdir, arg.oldname, arg.newname))
    return b""


_FORWARDED = {
    Opcode.LOOKUP: _lookup,
    Opcode.GETATTR: _getattr,
    Opcode.SETATTR: _setattr,
    Opcode.OPEN: _open,
    Opcode.CREATE: _create,
    Opcode.READ: _read,
    Opcode.WRITE: _write,
    Opcode.FLUSH: _flush,
    Opcode.FSYNC: _fsync,
    Opcode.RELEASE: _release,
    Opcode.READDIR: _readdir,
    Opcode.MKDIR: _mkdir,
    Opcode.UNLINK: _unlink,
    Opcode.RMDIR: _rmdir,
    Opcode.RENAME: _rename,
}


# --- running it ---------------------------------------------------------------------------


async def open_mount(address: str, mountpoint: str, *, name: str, token: bytes | None = None,
                     request_timeout: float = 30.0, **options) -> GuestMount:
    """Connect to the host as `name`, mount the export at `mountpoint` (GuestMount
    `options`), and let SIGTERM/SIGINT stop the mount.  Returns the started mount;
    its client is `mount.client`.  Raises what MountClient.connect and
    GuestMount.start raise; the connection is closed then."""
    client = await MountClient.connect(address, name=name, request_timeout=request_timeout,
                                       reconnect=False, token=token)
    mount = GuestMount(client, mountpoint, **options)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, mount.request_stop, f"signal {signum}")
    try:
        await mount.start()
    except BaseException:
        await client.close()
        raise
    return mount


async def run_mount(address: str, mountpoint: str, *, name: str = "mount",
                    stats_path: str | None = None, request_timeout: float = 30.0,
                    token: bytes | None = None) -> int:
    """Connect, mount, print `READY <mountpoint> ...`, serve until SIGINT/SIGTERM or
    until the host goes away; then unmount.  Returns the exit status."""
    if not os.path.isdir(mountpoint):
        raise SystemExit(f"cleanlease guest: --mount {mountpoint!r} is not a directory")
    # Fault injection for tests: hold every READ reply (an INVALIDATE then
    # arrives while the kernel still waits for the READ of the same pages).
    delay = float(os.environ.get("CLEANLEASE_MOUNT_READ_DELAY_MS", "0")) / 1000.0
    # ... and leave tainted pages for the next GETATTR to drop (docs/mount.md, R4).
    hold_purges = os.environ.get("CLEANLEASE_MOUNT_HOLD_PURGES") == "1"
    mount = await open_mount(address, mountpoint, name=name, token=token,
                             request_timeout=request_timeout, stats_path=stats_path,
                             read_delay=delay, hold_purges=hold_purges)
    client = mount.client
    print(f"READY {mount.mountpoint} policy={client.policy.label} guest={client.hello.guest_id}",
          flush=True)
    await mount.stop_requested.wait()
    reason = mount.stop_reason
    await mount.stop()
    await client.close()
    if mount.term_ran_out:  # (it may have looked like the kernel ending the connection)
        reason = "the lease term ran out: the watchdog aborted and purged the mount"
    print(f"cleanlease guest: unmounted {mount.mountpoint}: {reason}", file=sys.stderr, flush=True)
    return 0 if reason.startswith(("signal", "the kernel")) else 1


# --- measuring -------------------------------------------------------------------------------


def cached_read_throughput(mount_file: str, host_file: str, *, rounds: int = 5,
                           chunk: int = 1 << 20) -> dict:
    """Cached-read throughput through a mount against reading the host file directly.

    Both files are read once to warm the caches (the guest's kernel page cache
    through the mount, the host's page cache directly); then each is read
    whole `rounds` times, opening it each time.  Returns MB/s for both and
    their ratio.  For `cleanlease bench` to wire in.
    """

    def read_all(path: str) -> int:
        total = 0
        fd = os.open(path, os.O_RDONLY)
        try:
            while True:
                data = os.read(fd, chunk)
                if not data:
                    return total
                total += len(data)
        finally:
            os.close(fd)

    def measure(path: str) -> tuple[float, int]:
        read_all(path)
        started = time.perf_counter()
        total = sum(read_all(path) for _ in range(rounds))
        return time.perf_counter() - started, total

    mount_s, mount_bytes = measure(mount_file)
    host_s, host_bytes = measure(host_file)
    size = os.stat(host_file).st_size
    mount_mbps = mount_bytes / mount_s / 1e6 if mount_s else 0.0
    host_mbps = host_bytes / host_s / 1e6 if host_s else 0.0
    return {"file_bytes": size, "rounds": rounds, "chunk": chunk,
            "mount_MBps": round(mount_mbps, 1), "host_MBps": round(host_mbps, 1),
            "mount_vs_host": round(mount_mbps / host_mbps, 3) if host_mbps else 0.0}
