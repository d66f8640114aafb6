"""`GuestMount`: one FUSE mount served from one connected MountClient: its
lifecycle, the watchdog, and the requests read from /dev/fuse and dispatched
through one table (`guest.mount.dispatch`)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import json
import logging
import os
import time

from guest.client import HostError, SessionLost
from guest.fuse_device import WATCHDOG_FIRED, FuseDevice, Watchdog, parse_request
from guest.mount.caller import caller_of
from guest.mount.coherence import Coherence
from guest.mount.dispatch import FORWARDED, LOCAL
from guest.mount.size import KernelSize
from guest.witness import write_config
from guest.mount.state import (
    MAX_PAGES_LIMIT,
    NOTIFIER_THREADS,
    PAGE,
    TERM_PUBLISH_S,
    WATCHDOG_GUARD_S,
    WATCHDOG_GUARD_SHARE,
    MountClient,
    MountStats,
    _Inode,
    _Reply,
)
from protocol import wire
from protocol.fuse import Opcode
from protocol.messages import Policy

log = logging.getLogger("cleanlease.mount")


def watchdog_fired(why: int | None) -> str:
    """The mount's stop reason once its watchdog fired (`why`: wire.PURGED_*)."""
    return (f"{wire.PURGED_REASONS.get(why, 'the watchdog fired')}: the watchdog aborted and "
            f"purged the mount")


def _opcode_name(opcode: int) -> str:
    try:
        return Opcode(opcode).name
    except ValueError:
        return str(opcode)


class GuestMount(Coherence, KernelSize):
    """Serves one FUSE mount from one connected MountClient."""

    def __init__(self, client: MountClient, mountpoint: str, *, stats_path: str | None = None,
                 read_delay: float = 0.0, hold_purges: bool = False,
                 source: str = "cleanlease"):
        self.client = client
        self.source = source  # what findmnt and df show as the mount's source
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
        self._by_opcode: dict[int, int] = {}  # kernel requests per opcode (stats: by name)
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
        self.interruptible: dict[int, asyncio.Task] = {}  # unique -> a SETLKW's task
        # A SETLKW's kernel unique -> (node id, the unique of its host request),
        # and SETLKWs interrupted before their task sent anything (locks.py).
        self.lock_waits: dict[int, tuple[int, int]] = {}
        self.interrupted: set[int] = set()
        self._stats_task: asyncio.Task | None = None
        self._reading = False
        # The watchdog (lease policies; docs/mount.md, "When the term runs out"):
        # node ids whose data may be in the page cache, as it was told of them,
        # and the kernel's lookup count of each (a FORGET to 0: nothing cached).
        self.watchdog: Watchdog | None = None
        self._watchdog_task: asyncio.Task | None = None
        self._announced: set[int] = set()
        self._lookups: dict[int, int] = {}
        # Names the kernel may keep under a directory's lease (entry timeout > 0),
        # per directory: dropped when the guest loses that lease.
        self._names: dict[int, set[bytes]] = {}
        # Node ids whose attributes the kernel may hold as valid (a subset of
        # `_announced`): an own modification drops them once.
        self._attrs_kept: set[int] = set()
        self._term_started = False
        self._stopping = False
        self._asked_fire = False
        self.watchdog_fired = ""  # why the watchdog fired, if not because we asked: void
        client.on_invalidate = self._on_invalidate
        self._session_watch = asyncio.ensure_future(self._watch_session(client.session))

    # --- lifecycle ---------------------------------------------------------------

    async def start(self, timeout: float = 10.0) -> None:
        """Mount, and return once the kernel's INIT has been answered (and, under
        the lease policies, the watchdog is watching)."""
        self.dev.mount(self.mountpoint, source=self.source)
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
        witness_fd = -1
        client = self.client
        if client.hello is not None and client.hello.features & wire.FEATURE_WITNESS:
            witness_fd = write_config(client.address, client.token, client.client_id,
                                      client.hello.guest_id, client.name)
        try:
            self.watchdog = Watchdog(self.dev.fd, self.connection, self.mountpoint, guard_ns,
                                     witness_fd)
        finally:
            if witness_fd >= 0:
                os.close(witness_fd)
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
                why = self.watchdog.fired_why()
                self.request_stop(watchdog_fired(why))
            else:
                log.error("the watchdog of %s exited (%s): stopping the mount", self.mountpoint,
                          status)
                self.request_stop(f"the watchdog exited ({status})")

    def ask(self, h, op, nodeid: int | None = None, wait_forever: bool = False,
            unique: int | None = None):
        """Forward `op` for the kernel request `h` (to `h.nodeid`, or `nodeid`), as
        the request's caller (guest/mount/caller.py), as host request `unique`
        (default: a new one); returns the host's reply."""
        self.stats.host_requests += 1
        return self.client.request(h.nodeid if nodeid is None else nodeid, op, unique=unique,
                                   caller=caller_of(h), wait_forever=wait_forever)

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
        # The kernel evicted the inode (fuse_evict_inode sends the FORGET): no pages,
        # and (a dentry pins its parent) no names under it.
        del self._lookups[nodeid]
        self._names.pop(nodeid, None)
        self._attrs_kept.discard(nodeid)
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
            why = self.watchdog.fired_why()  # before close: it reads the watchdog's pipe
            self.watchdog.close(quit=True)
            if why is not None and why != wire.PURGED_GUEST_ASKED:
                self.watchdog_fired = watchdog_fired(why)
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
        d["by_opcode"] = {_opcode_name(op): n for op, n in sorted(self._by_opcode.items())}
        d["policy"] = self.policy.label
        d["mountpoint"] = self.mountpoint
        d["guest_id"] = self.client.hello.guest_id
        d["acks_sent"] = self.client.acks_sent
        d["watchdog_nodeids"] = len(self._announced)  # what its purge would drop
        d["lock_waits"] = len(self.lock_waits)  # SETLKWs sent to the host, unanswered
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
        self._by_opcode[opcode] = self._by_opcode.get(opcode, 0) + 1
        local = LOCAL.get(opcode)
        if local is not None:
            local(self, header, body)
            return
        handler = FORWARDED.get(opcode)
        if handler is None:
            name = _opcode_name(opcode)
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
        if opcode == Opcode.SETLKW:  # it may wait for ever: an INTERRUPT ends it (EINTR)
            self.interruptible[header.unique] = task
            task.add_done_callback(lambda _: self.interruptible.pop(header.unique, None))

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
