"""One guest actor of a simulation that goes through a real FUSE mount.

`cleanlease simulate --mount` starts, for every guest actor,

    cleanlease guest --connect ADDR --mount RUN_DIR/mnt-gN --actor gN --log L --stats S ...

which is this module.  One process, two kinds of thread:

* the **main thread** runs the event loop: `MountClient` (the connection to
  the host) and `GuestMount`, which reads /dev/fuse and answers every kernel
  request there (guest/mount/; its notifier threads write the
  invalidations).  It never touches the mount with a system call.
* the **actor thread** runs the workload's schedule with plain system calls
  on files under the mountpoint (os.open, os.pread, os.pwrite, os.fsync,
  os.close), and speaks the coordinator's protocol on stdin/stdout: READY,
  `GO <t0_ns>`, DONE, EXIT, exactly as workload/agent.py does.  A system
  call on the mount from the thread that serves /dev/fuse would wait for a
  reply only that thread can write; from this thread it cannot deadlock.

What is logged is what agent.py logs: every block read, with the stamp it
returned and the op's start..end, and every block written (WriteRecord,
via "guest"), so the checker and the oracle work unchanged.

**Hits.**  The application's reads are the actor's own; the kernel's misses
are the READ requests the mount answers (`MountStats.kernel_reads`, counted
just before each reply is written).  A read op is a hit when
`kernel_reads` did not move from before its open to after its pread.  The
mount serves this one actor thread only, so every READ answered in that
window was sent for this op.  It is exact as long as the kernel sends no
READ on its own after a read returns: asynchronous readahead could (and
would make a later op a miss, never a miss a hit), but most workloads'
files are smaller than the readahead window, so the synchronous readahead
of the op that needs them fetches them whole (log-append's log grows; there
it can happen).  Every READ an op needs is answered before its pread
returns, so no miss is ever counted as a hit.  Bytes are reported as well: `app_read_bytes` and
`byte_hit_rate` (guest.mount.hit_rate).

**Writes.**  Whether a write was the first dirtying one is known only to
the host's reply, which a system call does not return: every write goes to
`write_other`, and its WriteRecord says `first_dirty=None` (cannot tell).

The mount is always taken down: at EXIT, on SIGTERM/SIGINT, when the host
or the kernel ends the session, and when the actor fails.  The process
exits 0 only after a clean EXIT.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import errno
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time

from guest.fuse_device import is_mountpoint_of_fuse, resolve_mountpoint, umount
from guest.mount import GuestMount, hit_rate, open_mount
from workload import stamp as stamps
from workload.agent import Latencies, Stamper, _actor, _log_read
from workload.oplog import LogWriter, WriteRecord
from workload.workloads import APPEND, FSYNC, READ, WRITE, Actor, Op, Workload

BLOCK = stamps.BLOCK_SIZE
EXIT_REASON = "EXIT from the coordinator"

log = logging.getLogger("cleanlease.mount_agent")


MNT_FORCE = 1
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


def abort_mount(mountpoint: str) -> bool:
    """Take a FUSE mount down from outside the process that serves it.

    `umount2(MNT_FORCE)` makes the kernel abort the FUSE connection
    (fuse_umount_begin) even when it then refuses the unmount as busy: every
    request in flight ends with an error.  That frees a serving process that
    was killed while its own actor thread waited on its own mount: SIGKILL
    cannot finish such a process, because that thread waits for a reply only
    the dead serving thread could write, and /dev/fuse stays open until every
    thread is gone (fusectl's abort would do the same, but fusectl is often
    not mounted).  Then the mount is detached.  True if a mount was there.
    """
    if not is_mountpoint_of_fuse(mountpoint):
        return False
    _libc.umount2(os.fsencode(resolve_mountpoint(mountpoint)), MNT_FORCE)  # EBUSY is expected
    try:
        umount(mountpoint)
    except OSError as exc:
        if exc.errno != errno.EINVAL:  # EINVAL: the forced unmount already took it off
            raise
    return True


_PF_EXITING = 0x4  # include/linux/sched.h: the task is in do_exit()


def leader_is_dead(pid: int) -> bool:
    """True if process `pid` is dying but cannot finish: a mount actor killed while
    a thread of it waited on its own mount, whose serving thread is gone.

    Either the main thread has exited while another thread still waits (state
    Z), or the main thread is itself in do_exit (PF_EXITING), stuck closing a
    file on its own mount (the FLUSH of that close waits for an answer that
    will never come: seen as fuse_flush under do_exit in /proc/PID/stack)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
        return fields[0] == "Z" or bool(int(fields[6]) & _PF_EXITING)
    except (OSError, IndexError, ValueError):
        return False


def stop_mount_actors(actors, grace: float = 10.0) -> None:
    """For the coordinator: stop mount actors, given as (Popen, mountpoint), so that
    no mount is left.  SIGTERM first: each unmounts itself.  One that has not
    exited within `grace` seconds, or cannot finish dying (`leader_is_dead`),
    gets its FUSE connection aborted from here, then SIGKILL.  Every mount still
    there is then detached."""
    for popen, mountpoint in actors:
        if popen.poll() is None:
            if leader_is_dead(popen.pid):
                abort_mount(mountpoint)
            popen.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for popen, mountpoint in actors:
        try:
            popen.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            abort_mount(mountpoint)
            popen.kill()
            try:
                popen.wait(grace)
            except subprocess.TimeoutExpired:
                log.error("%s: pid %d did not exit after SIGKILL", mountpoint, popen.pid)
    for _, mountpoint in actors:
        try:
            abort_mount(mountpoint)
        except OSError as exc:
            log.error("cannot unmount %s: %s", mountpoint, exc)


class _Stopped(Exception):
    """The mount went away while the actor was running."""


def _pread_full(fd: int, size: int, offset: int) -> bytes:
    """pread until `size` bytes or end of file (a FUSE read may come back short)."""
    chunks, got = [], 0
    while got < size:
        data = os.pread(fd, size - got, offset + got)
        if not data:
            break
        chunks.append(data)
        got += len(data)
    return b"".join(chunks)


def _pwrite_full(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


class SyscallActor:
    """The actor thread: the workload's schedule as system calls on the mount."""

    def __init__(self, args, workload: Workload, actor: Actor, mount: GuestMount,
                 loop: asyncio.AbstractEventLoop):
        self.args, self.workload, self.actor = args, workload, actor
        self.mount = mount
        self.loop = loop
        self.root = mount.mountpoint
        self.ops: list[Op] = workload.schedule(actor, args.seed, args.duration)
        self.stop = threading.Event()  # set by the main thread when the mount goes away
        self.lat = Latencies()
        self.errors: dict[str, int] = {}
        self.reads = self.hits = self.done = 0
        self.app_read_bytes = 0
        self.elapsed = 0
        self.ok = False  # ran the schedule and saw EXIT
        self.failure: str | None = None
        self._stdin = b""

    # --- the coordinator's protocol ------------------------------------------------

    def _line(self) -> str:
        """One line from the coordinator.  Read from fd 0 directly: sys.stdin's
        lock, held by a thread blocked here, would hang the interpreter's exit
        when the main thread ends the process after a failure."""
        while b"\n" not in self._stdin:
            chunk = os.read(0, 4096)
            if not chunk:
                break
            self._stdin += chunk
        line, _, self._stdin = self._stdin.partition(b"\n")
        if self.stop.is_set():
            raise _Stopped()
        return line.decode(errors="replace")

    @staticmethod
    def _say(word: str) -> None:
        os.write(1, word.encode() + b"\n")

    def _due(self, t0: int, op: Op) -> None:
        delay = (t0 + op.at_ns - time.monotonic_ns()) / 1e9
        if delay > 0 and self.stop.wait(delay):
            raise _Stopped()
        if self.stop.is_set():
            raise _Stopped()

    def run(self) -> None:
        held: dict[int, int] = {}
        try:
            if self.workload.writer_holds_open and self.actor.role == "writer":
                for spec in self.workload.files:
                    held[spec.file_id] = os.open(self._path(spec.file_id), os.O_RDWR)
            self._say("READY")
            line = self._line()
            word, _, t0 = line.strip().partition(" ")
            if word != "GO":
                raise RuntimeError(f"expected 'GO <t0_ns>' on stdin, got {line!r}")
            self._run_schedule(int(t0), held)
            self._say("DONE")
            # Stay mounted, files open, until every actor is done (agent.py).
            self._line()
            self.ok = True
        except _Stopped:
            pass  # the mount's own stop reason says why
        except BaseException as exc:  # reported; then the mount comes down
            self.failure = f"actor failed: {exc!r}"
            log.exception("actor %s failed", self.actor.name)
        finally:
            for fd in held.values():
                try:
                    os.close(fd)
                except OSError:
                    pass
            reason = EXIT_REASON if self.ok else (self.failure or "actor ended")
            self.loop.call_soon_threadsafe(self.mount.request_stop, reason)

    # --- the schedule ------------------------------------------------------------------

    def _path(self, file_id: int) -> str:
        return os.path.join(self.root, self.workload.file(file_id).path)

    def _run_schedule(self, t0: int, held: dict[int, int]) -> None:
        name = self.actor.name
        stamper = Stamper(self.actor)
        stats = self.mount.stats  # read here, written by the event loop thread
        with LogWriter(self.args.log) as oplog:
            started = time.monotonic_ns()
            for op_no, op in enumerate(self.ops):
                self._due(t0, op)
                path = self._path(op.file_id)
                fd = held.get(op.file_id)
                own = fd is None
                try:
                    if op.kind == READ:
                        before = stats.kernel_reads
                        start = time.monotonic_ns()
                        if own:
                            fd = os.open(path, os.O_RDONLY)
                        try:
                            r0 = time.monotonic_ns()
                            data = _pread_full(fd, op.nblocks * BLOCK, op.block * BLOCK)
                            end = time.monotonic_ns()
                        finally:
                            if own:
                                os.close(fd)
                        hit = stats.kernel_reads == before
                        (self.lat.read_hit if hit else self.lat.read_miss).append(end - r0)
                        self.reads += 1
                        self.hits += hit
                        self.app_read_bytes += len(data)
                        _log_read(oplog, name, op_no, op.file_id, op.block, data, start, end, hit)
                    elif op.kind in (WRITE, APPEND):
                        start = time.monotonic_ns()
                        if own:
                            fd = os.open(path, os.O_WRONLY)
                        try:
                            blocks = [stamper.block(op.file_id, op.block + b, start)
                                      for b in range(op.nblocks)]
                            w0 = time.monotonic_ns()
                            _pwrite_full(fd, b"".join(b for b, _ in blocks), op.block * BLOCK)
                            end = time.monotonic_ns()
                        finally:
                            if own:
                                os.close(fd)
                        # A system call does not say whether it dirtied a clean inode.
                        self.lat.write_other.append(end - w0)
                        for b, (_, seq) in enumerate(blocks):
                            oplog.write(WriteRecord(name, op.file_id, op.block + b,
                                                    stamper.writer, seq, start, end, None,
                                                    "guest"))
                    elif op.kind == FSYNC:
                        if own:
                            fd = os.open(path, os.O_WRONLY)
                        try:
                            os.fsync(fd)
                        finally:
                            if own:
                                os.close(fd)
                    else:
                        raise ValueError(f"a guest cannot {op.kind}")
                    self.done += 1
                except OSError as exc:
                    if self.stop.is_set():
                        raise _Stopped() from exc
                    key = f"{op.kind}: {errno.errorcode.get(exc.errno, exc.errno)}"
                    self.errors[key] = self.errors.get(key, 0) + 1
            self.elapsed = time.monotonic_ns() - started

    def stats(self, mount: GuestMount) -> dict:
        m = mount.stats_dict()
        cache = mount.client.cache.stats.__dict__
        return dict(
            actor=self.actor.name, policy=mount.policy.label, mode="mount",
            ops=self.done, elapsed_ns=self.elapsed, errors=self.errors,
            latencies=self.lat.as_dict(),
            reads=self.reads, hits=self.hits, misses=self.reads - self.hits,
            bytes_fetched=m["kernel_read_bytes"],
            invalidations=m["invalidations"], inval_entries=m["inval_entries"],
            stale_grants_dropped=cache.get("stale_grants_dropped", 0),
            acks=mount.client.acks_sent,
            app_read_bytes=self.app_read_bytes,
            byte_hit_rate=hit_rate(self.app_read_bytes, m),
            hit_attribution="a read op is a hit when the mount answered no READ from its "
                            "open to the end of its pread (one actor thread per mount)",
            write_first_known=False,
            mount=m)


async def run_mount_actor(args, workload: Workload) -> int:
    """Mount at args.mount, run one guest actor through it, unmount; the exit status."""
    actor = _actor(workload, args.actor)
    mountpoint = args.mount
    os.makedirs(mountpoint, exist_ok=True)
    mount = await open_mount(args.connect, mountpoint, name=actor.name, token=args.token)
    client = mount.client
    loop = asyncio.get_running_loop()
    runner = SyscallActor(args, workload, actor, mount, loop)
    thread = threading.Thread(target=runner.run, name=f"actor-{actor.name}", daemon=True)
    try:
        thread.start()
        await mount.stop_requested.wait()
    finally:
        # Always unmount, whatever ended the run: a mount left behind breaks the next one.
        runner.stop.set()
        reason = mount.stop_reason
        await mount.stop()
        await client.close()
    if reason != EXIT_REASON or not runner.ok:
        print(f"cleanlease guest {actor.name}: unmounted {mount.mountpoint}: "
              f"{runner.failure or reason}", file=sys.stderr, flush=True)
        return 1
    thread.join(5)
    with open(args.stats, "w") as f:
        json.dump(runner.stats(mount), f)
    return 0
