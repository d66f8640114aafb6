"""`cleanlease chaos-mount`: seeded faults against mounted guests and their applications.

Real processes, as in `cleanlease simulate --mount`: one `cleanlease host`
(clean-lease; the fanotify detector when it can run here), N mounted guests
(`cleanlease guest --connect ADDR --mount MNT`, each with its watchdog:
docs/mount.md, "When the term runs out"), and application processes that use
the mounts with plain system calls, started by this module
(`python -m workload.chaos_mount app ...`):

* per mount, one reader with pread(2) (half of its reads open, pread and
  close; the other half go through a descriptor it keeps open for a while),
  one reader through a shared read-only mapping and one through a private
  read-only mapping (each mapping lives for a seeded 0.2 to 2.5 s and is read
  block by block with loads, so a purged page raises SIGBUS);
* per mount, one writer that overwrites stamped blocks through the mount
  (open O_WRONLY, pwrite, close);
* one host-local writer that overwrites stamped blocks in the export
  directly (only with the fanotify detector: with an after-the-fact detector
  its writes could be read stale by design).

Every block read is logged as a ReadRecord, every block written as a
WriteRecord (workload/oplog.py); a write through a mount that failed may
still have been carried out by the host, so it is logged "uncertain": its
version is a possible one, never a reason to call another read stale.

Faults at seeded instants (a Poisson process; the classes in seeded
permutations, so each comes once in every three faults), each against a
mount guest that is up at that instant:

* cut-mount-connection: the guest really loses its socket.  The mount guest
  has no fault hook (a mount ends with its session: guest/mount/), so the
  coordinator takes a duplicate of the guest's socket to the host with
  pidfd_getfd(2) and shuts it down (both directions): the guest reads EOF,
  the host sees the connection end.
* stop-mount-guest: SIGSTOP, then SIGCONT after a seeded 0.2 to 1.5 s (with
  the default 1 s term, long stops outlast the term: the watchdog aborts and
  purges the mount, and the guest unmounts after SIGCONT).
* kill-mount-guest: SIGKILL; the watchdog notices (its pipe from the guest
  closes, or the guest's pidfd) and aborts and purges the mount.  A mount
  still there 3 s after its guest ended is detached here and counted (an
  anomaly: docs/reliability.md, "Chaos with mounted guests").

A guest that has ended is replaced by a new one on a fresh mountpoint; the
applications reach their mount through a symlink per slot, which the
coordinator points at the new mountpoint once it is READY, so they carry on
(errors meanwhile: ENOENT, ENOTCONN, SIGBUS for a mapping reader, which is
then started again; all counted, all allowed).

Afterwards: the checker judges every read (read(2) and each kind of mapping
counted apart; stale mapping reads also by cause, MAPPING_CAUSES), and a final read of every block made directly on the export
must not be stale (a stale final read is a lost write).  Every write that
completed is held to ack timeout + lease term + the clock margin
(host/leases.py, `stall_bound_s`), except a write through a mount whose own
guest was stopped, cut or killed while it ran (its wait is its own guest's),
reported apart.  A writer still blocked when the run ends breaks invariant 3.
Exit status 1 if any promise broke.

`python -m workload.chaos_mount --seeds 1,2,3 --duration 20` is the same as
`cleanlease chaos-mount --seeds 1,2,3 --duration 20`.
"""

from __future__ import annotations

import argparse
import bisect
import ctypes
import dataclasses
import errno
import json
import mmap
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

from workload import stamp as stamps
from workload.checker import corrupt_reads
from workload.oplog import ReadRecord, WriteRecord

BLOCK = stamps.BLOCK_SIZE
FAULTS = ("cut-mount-connection", "stop-mount-guest", "kill-mount-guest")
READ_KINDS = ("pread", "mmap-shared", "mmap-private")
# Why a mapping read could be stale (the report splits them; every one counts):
MAPPING_CAUSES = {
    "after-watchdog": "the mapping's guest's watchdog had already aborted and purged the "
                      "mount (its term ran out, or the guest died): the promise of the fault "
                      "model itself",
    "direct": "the mapping's file was opened DIRECT_IO (no lease at open), or another "
              "application mapped the same file on the same mount through a DIRECT_IO "
              "handle in the 3 s before: pages from unleased READ replies on such a handle, "
              "which nothing drops (the page cache is the inode's: every mapping sees them)",
    "stopped": "its guest was stopped (SIGSTOP), its watchdog had not fired yet: a page "
               "from an unleased READ reply whose drop the stop held up "
               "(docs/mount.md, 'When the term runs out', what is not covered)",
    "running": "a KEEP_CACHE mapping, its guest running: the window between an unleased "
               "READ reply and its scheduled drop (docs/mount.md, 'What the proof does "
               "not cover'), or anything else",
}
# Actor name prefixes of the applications (the checker reports per actor).
PREFIX = {"pread": "rd", "mmap-shared": "ms", "mmap-private": "mp", "write": "wr",
          "host-write": "hw"}
HOST_WRITER_ID = 1000
FILES, BLOCKS_PER_FILE = 6, 4
# An "uncertain" write may land as late as the host carries it out; it only adds a
# possible version, so its end is put past everything the run can read.
UNCERTAIN_END_S = 600
READY_TIMEOUT_S = 30.0
DIRECT_WINDOW_S = 3.0  # how far back a DIRECT_IO mapping of the same file is looked for


@dataclass(frozen=True)
class FileSpec:
    path: str
    file_id: int
    blocks: int

    def arg(self) -> str:
        return f"{self.path}:{self.file_id}:{self.blocks}"

    @classmethod
    def parse(cls, text: str) -> FileSpec:
        path, file_id, blocks = text.rsplit(":", 2)
        return cls(path, int(file_id), int(blocks))


def make_files(n: int = FILES, blocks: int = BLOCKS_PER_FILE) -> list[FileSpec]:
    return [FileSpec(f"f{i}.dat", i + 1, blocks) for i in range(n)]


def populate(export: str, files: list[FileSpec]) -> None:
    """The initial version of every block (writer 0, seq 0), flushed: clean inodes."""
    for f in files:
        data = b"".join(stamps.make_block(stamps.Stamp.initial(f.file_id, b))
                        for b in range(f.blocks))
        fd = os.open(os.path.join(export, f.path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)


# --- the applications -------------------------------------------------------------------------
#
# Each is its own process, reading or writing files under --root (a mount's slot
# symlink, or the export itself for the host-local writer) until --until-ns.  Every
# record and every error is written with one write(2) as it happens: a mapping
# reader dies of SIGBUS without a chance to flush anything.


class _App:
    def __init__(self, args):
        self.args = args
        self.rng = random.Random(args.seed)
        self.files = [FileSpec.parse(x) for x in args.files.split(",")]
        self.until = args.until_ns
        self.log = os.open(args.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self.err = os.open(args.errors, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self.opens = os.open(args.errors + ".opens", os.O_WRONLY | os.O_CREAT | os.O_APPEND,
                             0o644)
        self.op = 0
        self.gap_s = args.gap_ms / 1000.0

    def path(self, f: FileSpec) -> str:
        return os.path.join(self.args.root, f.path)

    def record(self, rec) -> None:
        os.write(self.log, (rec.to_json() + "\n").encode())

    def error(self, what: str, exc: BaseException) -> None:
        name = errno.errorcode.get(getattr(exc, "errno", None) or 0, type(exc).__name__)
        os.write(self.err, f"{what}:{name}\n".encode())

    def opened(self, f: FileSpec, fd: int, handle: str = "-") -> None:
        """Which mount this descriptor is on, and (mappings) whether the mount opened
        it KEEP_CACHE ("cached") or DIRECT_IO ("direct"): for the report."""
        try:
            where = os.path.dirname(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            where = "?"
        os.write(self.opens, f"{time.monotonic_ns()} {f.file_id} {where} {handle}\n".encode())

    def pause(self, mean_s: float | None = None) -> None:
        time.sleep(min(self.rng.expovariate(1.0 / (mean_s or self.gap_s)), 0.5))

    def read_blocks(self, f: FileSpec, first: int, data: bytes, start: int, end: int) -> None:
        """Log each block of `data` (read from block `first` on) as one read op."""
        n = max(1, -(-len(data) // BLOCK))
        for i in range(n):
            chunk = data[i * BLOCK:(i + 1) * BLOCK]
            try:
                s = stamps.parse_block(chunk)
                rec = ReadRecord(self.args.actor, f.file_id, first + i, s.writer, s.seq,
                                 start, end, False, self.op, None)
            except stamps.CorruptBlock as exc:
                rec = ReadRecord(self.args.actor, f.file_id, first + i, -1, -1, start, end,
                                 False, self.op, exc.kind)
            self.record(rec)
        self.op += 1


def _pread_full(fd: int, size: int, offset: int) -> bytes:
    chunks, got = [], 0
    while got < size:
        data = os.pread(fd, size - got, offset + got)
        if not data:
            break
        chunks.append(data)
        got += len(data)
    return b"".join(chunks)


def _app_pread(app: _App) -> None:
    held: dict[int, tuple[int, int]] = {}  # file_id -> (fd, close after, monotonic ns)
    try:
        while time.monotonic_ns() < app.until:
            f = app.rng.choice(app.files)
            nblocks = min(f.blocks, app.rng.choice((1, 1, 2)))
            first = app.rng.randrange(f.blocks - nblocks + 1)
            keep = app.rng.random() < 0.5
            start = time.monotonic_ns()
            fd = None
            try:
                if keep:
                    entry = held.get(f.file_id)
                    if entry is not None and entry[1] < start:
                        held.pop(f.file_id)
                        os.close(entry[0])
                        entry = None
                    if entry is None:
                        fd = os.open(app.path(f), os.O_RDONLY)
                        held[f.file_id] = (fd, start + int(app.rng.uniform(0.2, 2.0) * 1e9))
                        app.opened(f, fd)
                    fd = held[f.file_id][0]
                    start = time.monotonic_ns()
                else:
                    fd = os.open(app.path(f), os.O_RDONLY)
            except OSError as exc:
                app.error("open", exc)
                app.pause(0.02)
                continue
            try:
                data = _pread_full(fd, nblocks * BLOCK, first * BLOCK)
                end = time.monotonic_ns()
            except OSError as exc:
                app.error("pread", exc)
                if keep:
                    held.pop(f.file_id, None)
                _close(fd)
                app.pause(0.02)
                continue
            if not keep:
                _close(fd)
            app.read_blocks(f, first, data, start, end)
            app.pause()
    finally:
        for fd, _ in held.values():
            _close(fd)


def _app_mmap(app: _App, shared: bool) -> None:
    flags = mmap.MAP_SHARED if shared else mmap.MAP_PRIVATE
    while time.monotonic_ns() < app.until:
        f = app.rng.choice(app.files)
        try:
            fd = os.open(app.path(f), os.O_RDONLY)
        except OSError as exc:
            app.error("open", exc)
            app.pause(0.02)
            continue
        try:
            mapping = mmap.mmap(fd, f.blocks * BLOCK, flags=flags, prot=mmap.PROT_READ)
            app.opened(f, fd, "cached" if shared else _handle_kind(fd, f.blocks * BLOCK))
        except (OSError, ValueError) as exc:  # ENODEV: shared, and opened DIRECT_IO
            app.error("mmap", exc)
            app.pause(0.02)
            continue
        finally:
            _close(fd)
        life_end = time.monotonic_ns() + int(app.rng.uniform(0.2, 2.5) * 1e9)
        try:
            while time.monotonic_ns() < min(life_end, app.until):
                block = app.rng.randrange(f.blocks)
                start = time.monotonic_ns()
                data = mapping[block * BLOCK:(block + 1) * BLOCK]  # a purged page: SIGBUS
                end = time.monotonic_ns()
                app.read_blocks(f, block, data, start, end)
                app.pause()
        finally:
            mapping.close()


def _handle_kind(fd: int, size: int) -> str:
    """How the mount opened `fd`: a shared mapping of a FOPEN_DIRECT_IO file is
    refused with ENODEV (no FUSE_DIRECT_IO_ALLOW_MMAP), of a KEEP_CACHE one not."""
    try:
        mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ).close()
        return "cached"
    except OSError as exc:
        return "direct" if exc.errno == errno.ENODEV else "?"
    except ValueError:
        return "?"


def _app_write(app: _App, via: str) -> None:
    writer, seq = app.args.writer_id, 0
    while time.monotonic_ns() < app.until:
        app.pause()
        f = app.rng.choice(app.files)
        block = app.rng.randrange(f.blocks)
        seq += 1
        start = time.monotonic_ns()
        data = stamps.make_block(stamps.Stamp(f.file_id, block, writer, seq, start))
        try:
            fd = os.open(app.path(f), os.O_WRONLY)
        except OSError as exc:
            app.error("open", exc)  # nothing was written
            continue
        try:
            view, offset = memoryview(data), block * BLOCK
            while view:
                n = os.pwrite(fd, view, offset)
                view, offset = view[n:], offset + n
            end = time.monotonic_ns()
            app.record(WriteRecord(app.args.actor, f.file_id, block, writer, seq, start, end,
                                   None, via))
        except OSError as exc:
            # The request may have reached the host, which carries it out anyway.
            app.error("pwrite", exc)
            app.record(WriteRecord(app.args.actor, f.file_id, block, writer, seq, start,
                                   time.monotonic_ns() + int(UNCERTAIN_END_S * 1e9), None,
                                   "uncertain"))
        finally:
            try:
                os.close(fd)
            except OSError as exc:
                app.error("close", exc)


def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


def app_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m workload.chaos_mount app")
    p.add_argument("--kind", required=True, choices=(*READ_KINDS, "write", "host-write"))
    p.add_argument("--actor", required=True)
    p.add_argument("--root", required=True)
    p.add_argument("--files", required=True)
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--until-ns", type=int, required=True)
    p.add_argument("--log", required=True)
    p.add_argument("--errors", required=True)
    p.add_argument("--writer-id", type=int, default=0)
    p.add_argument("--gap-ms", type=float, default=5.0)
    args = p.parse_args(argv)
    app = _App(args)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    if args.kind == "pread":
        _app_pread(app)
    elif args.kind in ("mmap-shared", "mmap-private"):
        _app_mmap(app, args.kind == "mmap-shared")
    else:
        _app_write(app, "guest" if args.kind == "write" else "host-local")
    return 0


# --- cutting a guest's connection from outside --------------------------------------------------

_SYS_PIDFD_GETFD = 438  # the same number on every architecture (asm-generic)
_libc = ctypes.CDLL(None, use_errno=True)


def _pidfd_getfd(pid: int, target_fd: int) -> int:
    pidfd = os.pidfd_open(pid)
    try:
        fd = _libc.syscall(_SYS_PIDFD_GETFD, pidfd, target_fd, 0)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"pidfd_getfd({pid}, {target_fd}): {os.strerror(err)}")
        return fd
    finally:
        os.close(pidfd)


def cut_connection(pid: int, host_socket: str) -> str | None:
    """Shut down (both ways) process `pid`'s Unix socket connected to `host_socket`,
    through a duplicate taken with pidfd_getfd(2): the socket is the same, so the
    process reads EOF and the host sees the connection end.  None if one was cut,
    else what was found instead."""
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError as exc:
        return f"/proc/{pid}/fd: {exc.strerror}"
    seen = []
    for name in names:
        try:
            if not os.readlink(f"/proc/{pid}/fd/{name}").startswith("socket:"):
                continue
            fd = _pidfd_getfd(pid, int(name))
        except OSError as exc:
            seen.append(f"fd {name}: {exc}")
            continue
        sock = socket.socket(fileno=fd)
        try:
            peer = sock.getpeername() if sock.family == socket.AF_UNIX else None
            if peer == host_socket:
                sock.shutdown(socket.SHUT_RDWR)
                return None
            seen.append(f"fd {name}: peer {peer!r}")
        except OSError as exc:
            seen.append(f"fd {name}: {exc}")
        finally:
            sock.close()
    return "no socket connected to the host (" + "; ".join(seen) + ")"


# --- the coordinator ---------------------------------------------------------------------------


def _command(*args: str) -> list[str]:
    return [sys.executable, "-m", *args]


class _Proc:
    """A child process; stdout read without blocking, stderr to a file."""

    def __init__(self, name: str, argv: list[str], run_dir: str, stdout: bool = False):
        self.name = name
        self.err_path = os.path.join(run_dir, f"{name}.err")
        self._err = open(self.err_path, "wb")
        self.popen = subprocess.Popen(argv,
                                      stdout=subprocess.PIPE if stdout else subprocess.DEVNULL,
                                      stderr=self._err, stdin=subprocess.DEVNULL,
                                      env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self._err.close()
        if stdout:
            os.set_blocking(self.popen.stdout.fileno(), False)
        self._partial = b""
        self.lines: list[str] = []
        self.handled = False  # its exit has been accounted for

    def poll_lines(self) -> list[str]:
        out = self.popen.stdout
        if out is not None and not out.closed:
            try:
                chunk = os.read(out.fileno(), 65536)
            except BlockingIOError:
                chunk = None
            if chunk:
                *whole, self._partial = (self._partial + chunk).split(b"\n")
                self.lines += [w.decode(errors="replace").strip() for w in whole]
        return self.lines

    def stderr(self) -> str:
        try:
            with open(self.err_path, errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def tail(self, lines: int = 8) -> str:
        text = self.stderr().strip().splitlines()[-lines:]
        return ("; stderr: " + " | ".join(text)) if text else ""

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, sig=signal.SIGTERM, timeout: float = 10.0) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        if self.popen.stdout is not None:
            self.popen.stdout.close()


@dataclass
class _Guest:
    """One incarnation of a slot's mount guest."""

    slot: str
    name: str
    mountpoint: str
    proc: _Proc
    ready: bool = False
    stopped: bool = False
    ended_at: int = 0  # monotonic ns when its exit was seen
    faulted: str = ""  # the fault that ended it, if any
    err_seen: int = 0  # how much of its stderr has been looked at
    watchdog_at: int = 0  # monotonic ns when its watchdog's line was seen (0: not yet)


@dataclass
class _Slot:
    name: str
    link: str  # what the applications use: a symlink to the current mountpoint
    incarnations: int = 0
    guest: _Guest | None = None
    restart_at: float = 0.0  # monotonic s: when to start the next incarnation


@dataclass
class MountChaosReport:
    seed: int
    duration: float
    detector: str = "none"
    faults: dict[str, int] = field(default_factory=lambda: {f: 0 for f in FAULTS})
    not_achieved: dict[str, int] = field(default_factory=dict)
    incarnations: int = 0
    guest_exits: dict[str, int] = field(default_factory=dict)  # why each guest ended
    watchdog_fired: dict[str, int] = field(default_factory=dict)  # by its reason
    stops_watchdog_fired: int = 0  # stops during which the guest's watchdog fired
    mounts_left: int = 0  # a guest gone, its mount still there after the grace time
    reads: dict[str, int] = field(default_factory=lambda: {k: 0 for k in READ_KINDS})
    stale: dict[str, int] = field(default_factory=lambda: {k: 0 for k in READ_KINDS})
    worst_stale_ms: float = 0.0
    mapping_stale: dict[str, int] = field(default_factory=dict)  # MAPPING_CAUSES -> n
    mapping_worst_ms: dict[str, float] = field(default_factory=dict)
    stale_examples: list[str] = field(default_factory=list)
    lost_writes: int = 0
    final_blocks: int = 0
    corrupt: int = 0  # corrupt blocks no host-local race explains, phantom, future
    corrupt_kinds: dict[str, int] = field(default_factory=dict)
    torn_by_host_race: int = 0
    guest_writes: int = 0
    host_writes: int = 0
    uncertain_writes: int = 0
    calm_writes: int = 0
    worst_stall_ms: float = 0.0
    worst_stall_what: str = ""
    bound_ms: float = 0.0
    own_fault_writes: int = 0
    worst_own_fault_ms: float = 0.0
    app_errors: dict[str, int] = field(default_factory=dict)  # "kind what:ERRNO" -> n
    app_restarts: dict[str, int] = field(default_factory=dict)  # "kind: SIGBUS" -> n
    stuck_apps: list[str] = field(default_factory=list)
    app_failures: list[str] = field(default_factory=list)
    host_crashed: str = ""
    notes: list[str] = field(default_factory=list)

    def broken(self) -> list[str]:
        out = []
        stale = sum(self.stale.values())
        if stale:
            kinds = ", ".join(f"{k} {n}" for k, n in self.stale.items() if n)
            out.append(f"{stale} stale reads ({kinds})")
        if self.lost_writes:
            out.append(f"{self.lost_writes} lost writes")
        if self.corrupt:
            out.append(f"{self.corrupt} corrupt, phantom or future blocks")
        if self.worst_stall_ms > self.bound_ms:
            out.append(f"a stall of {self.worst_stall_ms:.0f} ms > {self.bound_ms:.0f} ms "
                       f"({self.worst_stall_what})")
        if self.stuck_apps:
            out.append(f"still blocked when the run ended: {', '.join(self.stuck_apps)}")
        out += [f"application failed: {a}" for a in self.app_failures]
        if self.host_crashed:
            out.append(f"the host: {self.host_crashed}")
        return out

    def anomalies(self) -> list[str]:
        """What went wrong that is not one of the promises above (no exit status)."""
        out = []
        if self.mounts_left:
            out.append(f"{self.mounts_left} mounts still mounted (aborted, not detached) 3 s "
                       f"after their guest ended; chaos-mount detached them")
        return out

    @property
    def ok(self) -> bool:
        return not self.broken()


class _Run:
    """One seed: the host, the slots, the applications, the fault schedule."""

    def __init__(self, args, seed: int):
        from host.leases import stall_bound_s

        self.args = args
        self.seed = seed
        # The fault schedule and the choices made while injecting come from one seeded
        # stream; the applications' seeds and the restart delays from others, so that
        # how often a mapping reader happens to be started again does not move them.
        self.rng = random.Random(seed)
        self.app_rng = random.Random(seed * 7919 + 1)
        self.delay_rng = random.Random(seed * 7919 + 2)
        self.run_dir = tempfile.mkdtemp(prefix=f"seed{seed}-", dir=args.workdir)
        self.export = os.path.join(self.run_dir, "export")
        os.mkdir(self.export)
        self.files = make_files()
        populate(self.export, self.files)
        self.socket = os.path.join(self.run_dir, "host.sock")
        self.address = f"unix:{self.socket}"
        self.host: _Proc | None = None
        self.detector = "none"
        self.slots = [_Slot(f"g{i}", os.path.join(self.run_dir, f"slot-g{i}"))
                      for i in range(args.guests)]
        self.guests: list[_Guest] = []  # every incarnation
        self.apps: list[tuple[str, str, _Proc, str, str]] = []  # (kind, slot, proc, log, errors)
        self.app_seq = 0
        self.log: list[tuple[int, str, str]] = []  # (monotonic ns, event, target)
        self.report = MountChaosReport(seed=seed, duration=args.duration)
        self.report.bound_ms = 1000 * stall_bound_s(args.ack_timeout / 1000, args.lease_term / 1000)
        self.resume: list[tuple[float, _Guest]] = []
        self.schedule: list[tuple[float, str]] = []
        self.t0 = 0.0
        self.until_ns = 0
        self.mounts_to_check: list[tuple[float, _Guest]] = []

    # --- processes ---------------------------------------------------------------------

    def start_host(self) -> None:
        a = self.args
        self.host = _Proc("host", _command(
            "workload.cli", "host", "--export", self.export, "--listen", self.address,
            "--policy", "clean-lease", "--lease-term", str(a.lease_term),
            "--ack-timeout", str(a.ack_timeout), "--detector", a.detector,
            "--stats", os.path.join(self.run_dir, "host.json")), self.run_dir, stdout=True)
        line = self._wait_line(self.host, "READY")
        said = dict(w.split("=", 1) for w in line.split() if "=" in w)
        self.detector = self.report.detector = said.get("detector", "none")

    def _wait_line(self, proc: _Proc, prefix: str) -> str:
        import select

        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            for line in proc.poll_lines():
                if line.startswith(prefix):
                    return line
            if not proc.alive():
                raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode} before "
                                   f"{prefix}{proc.tail()}")
            select.select([proc.popen.stdout], [], [], 0.1)
        raise RuntimeError(f"{proc.name}: no {prefix} within {READY_TIMEOUT_S:.0f} s{proc.tail()}")

    def start_guest(self, slot: _Slot) -> _Guest:
        slot.incarnations += 1
        self.report.incarnations += 1
        name = f"{slot.name}.{slot.incarnations}"
        mountpoint = os.path.join(self.run_dir, f"mnt-{name}")
        os.mkdir(mountpoint)
        proc = _Proc(name, _command("workload.cli", "guest", "--connect", self.address,
                                    "--mount", mountpoint, "--actor", name),
                     self.run_dir, stdout=True)
        guest = _Guest(slot.name, name, mountpoint, proc)
        slot.guest = guest
        self.guests.append(guest)
        return guest

    def _poll_guest_ready(self, slot: _Slot) -> None:
        g = slot.guest
        if g is None or g.ready or not g.proc.alive():
            return
        if any(line.startswith("READY") for line in g.proc.poll_lines()):
            g.ready = True
            tmp = slot.link + ".new"
            os.symlink(g.mountpoint, tmp)
            os.replace(tmp, slot.link)  # the applications' next open goes to the new mount
            self._event("ready", g.name)

    def start_app(self, kind: str, slot: str | None, writer_id: int = 0,
                  gap_ms: float = 5.0) -> None:
        self.app_seq += 1
        name = f"{PREFIX[kind]}-{slot or 'host'}.{self.app_seq}"
        root = self.export if kind == "host-write" else os.path.join(self.run_dir, f"slot-{slot}")
        log = os.path.join(self.run_dir, f"{name}.log")
        errors = os.path.join(self.run_dir, f"{name}.errors")
        proc = _Proc(name, _command(
            "workload.chaos_mount", "app", "--kind", kind, "--actor", name, "--root", root,
            "--files", ",".join(f.arg() for f in self.files),
            "--seed", str(self.app_rng.randrange(1 << 30)), "--until-ns", str(self.until_ns),
            "--log", log, "--errors", errors, "--writer-id", str(writer_id),
            "--gap-ms", str(gap_ms)), self.run_dir)
        self.apps.append((kind, slot or "host", proc, log, errors))

    def _event(self, what: str, target: str) -> None:
        self.log.append((time.monotonic_ns(), what, target))

    # --- the run -------------------------------------------------------------------------

    def start(self) -> None:
        self.start_host()
        for slot in self.slots:
            self.start_guest(slot)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not all(s.guest.ready for s in self.slots):
            for slot in self.slots:
                g = slot.guest
                if not g.proc.alive():
                    raise RuntimeError(f"{g.name} exited with {g.proc.popen.returncode}"
                                       f"{g.proc.tail()}")
                self._poll_guest_ready(slot)
            if time.monotonic() > deadline:
                raise RuntimeError("mount guests not READY within 30 s")
            time.sleep(0.02)  # polling for READY lines
        self.t0 = time.monotonic()
        self.until_ns = int((self.t0 + self.args.duration) * 1e9)
        for i, slot in enumerate(self.slots):
            for kind in self.args.readers:
                self.start_app(kind, slot.name)
            self.start_app("write", slot.name, writer_id=i + 1, gap_ms=self.args.write_gap_ms)
        if self.detector == "fanotify":
            self.start_app("host-write", None, writer_id=HOST_WRITER_ID,
                           gap_ms=self.args.write_gap_ms)
        else:
            self.report.notes.append(f"detector {self.detector}: no host-local writer (its "
                                     f"writes would not be held before they land)")
        self._plan()

    def _plan(self) -> None:
        t, times = 0.5, []
        while True:
            t += self.rng.expovariate(1.0 / self.args.mean_gap)
            if t > self.args.duration - 0.5:
                break
            times.append(t)
        kinds: list[str] = []
        while len(kinds) < len(times):
            block = list(FAULTS)
            self.rng.shuffle(block)
            kinds += block
        self.schedule = list(zip(times, kinds))

    def tick(self) -> None:
        now = time.monotonic()
        since = now - self.t0
        if self.host.popen.poll() is not None and not self.report.host_crashed:
            self.report.host_crashed = f"exited with {self.host.popen.returncode} mid-run" \
                                       f"{self.host.tail()}"
        for due, guest in list(self.resume):
            if since >= due:
                self.resume.remove((due, guest))
                self._continue(guest)
        for g in self.guests:
            self._watch_stderr(g)
        for slot in self.slots:
            self._poll_guest_ready(slot)
            g = slot.guest
            if g is not None and not g.ended_at and not g.proc.alive():
                self._ended(slot, g)
            if slot.guest is None and now >= slot.restart_at and since < self.args.duration:
                self.start_guest(slot)
        for at, guest in list(self.mounts_to_check):
            if now >= at:
                self.mounts_to_check.remove((at, guest))
                self._check_mount_gone(guest)
        self._respawn_apps(since)
        while self.schedule and self.schedule[0][0] <= since:
            fault = self.schedule[0][1]
            targets = [s.guest for s in self.slots if s.guest is not None and s.guest.ready
                       and not s.guest.stopped and not s.guest.faulted
                       and not s.guest.ended_at and s.guest.proc.alive()]
            if not targets:
                break  # wait until a guest is up again
            self.schedule.pop(0)
            self._inject(fault, self.rng.choice(targets), since)

    def _watch_stderr(self, g: _Guest) -> None:
        """Note when a guest's watchdog fires (it says so on the guest's stderr):
        from then on the mount is aborted and purged."""
        if g.watchdog_at or (g.ended_at and time.monotonic_ns() - g.ended_at > 5e9):
            return
        try:
            with open(g.proc.err_path, "rb") as f:
                f.seek(g.err_seen)
                chunk = f.read()
        except OSError:
            return
        whole = chunk[:chunk.rfind(b"\n") + 1]
        g.err_seen += len(whole)
        if b"cleanlease watchdog: " in whole:
            g.watchdog_at = time.monotonic_ns()
            self._event("watchdog-fired", g.name)

    def _inject(self, fault: str, g: _Guest, since: float) -> None:
        pid = g.proc.popen.pid
        if fault == "cut-mount-connection":
            why = cut_connection(pid, self.socket)
            if why is None:
                g.faulted = fault
                self._count(fault, g.name)
            else:
                self._not_achieved(fault, f"{g.name}: {why}")
        elif fault == "stop-mount-guest":
            g.proc.popen.send_signal(signal.SIGSTOP)
            g.stopped = True
            self.resume.append((since + self.rng.uniform(0.2, 1.5), g))
            self._count(fault, g.name)
        elif fault == "kill-mount-guest":
            g.proc.popen.send_signal(signal.SIGKILL)
            g.faulted = fault
            self._count(fault, g.name)

    def _count(self, fault: str, target: str) -> None:
        self.report.faults[fault] += 1
        self._event(fault, target)

    def _not_achieved(self, fault: str, why: str) -> None:
        self.report.not_achieved[fault] = self.report.not_achieved.get(fault, 0) + 1
        self.report.notes.append(f"{fault}: not achieved ({why})")

    def _continue(self, g: _Guest) -> None:
        if g.proc.alive():
            g.proc.popen.send_signal(signal.SIGCONT)
        g.stopped = False
        self._event("resume-mount-guest", g.name)

    def _ended(self, slot: _Slot, g: _Guest) -> None:
        g.ended_at = time.monotonic_ns()
        self._event("guest-ended", g.name)
        if g.stopped:
            self.resume = [(d, x) for d, x in self.resume if x is not g]
            g.stopped = False
        slot.guest = None
        slot.restart_at = time.monotonic() + self.delay_rng.uniform(0.1, 0.5)
        # The mount must go with its guest (the guest unmounts; a killed guest's
        # watchdog detaches it).  Checked a little later, not at once.
        self.mounts_to_check.append((time.monotonic() + 3.0, g))

    def _check_mount_gone(self, g: _Guest) -> None:
        from guest.fuse_device import is_mountpoint_of_fuse
        from workload.mount_agent import abort_mount

        if is_mountpoint_of_fuse(g.mountpoint):
            self.report.mounts_left += 1
            self.report.notes.append(f"{g.name}: its mount was still there 3 s after it ended")
            abort_mount(g.mountpoint)

    def _respawn_apps(self, since: float) -> None:
        """A mapping reader killed by SIGBUS (its pages were purged under it) starts
        again; any other application that ended before the run did has failed."""
        for i, (kind, slot, proc, log, errors) in enumerate(list(self.apps)):
            rc = proc.popen.poll()
            if rc is None or proc.handled:
                continue
            proc.handled = True
            if time.monotonic_ns() >= self.until_ns and rc == 0:
                continue
            if rc == -signal.SIGBUS and kind.startswith("mmap"):
                key = f"{kind}: killed by SIGBUS (started again)"
                self.report.app_restarts[key] = self.report.app_restarts.get(key, 0) + 1
                self._event("app-sigbus", proc.name)
                if since < self.args.duration:
                    self.start_app(kind, slot)
            else:
                self.report.app_failures.append(f"{proc.name} exited with {rc}{proc.tail()}")

    def wait(self) -> None:
        while time.monotonic() - self.t0 < self.args.duration:
            self.tick()
            time.sleep(0.01)  # the coordinator's poll interval
        # The end: resume every stopped guest, then let the applications finish.
        for _, g in list(self.resume):
            self._continue(g)
        self.resume.clear()
        for _, fault in self.schedule:
            self._not_achieved(fault, "no guest was up before the run ended")
        self.schedule.clear()
        deadline = time.monotonic() + self.report.bound_ms / 1000 + 10.0
        while time.monotonic() < deadline and any(p.alive() for _, _, p, _, _ in self.apps):
            self.tick()
            time.sleep(0.01)
        self.tick()
        # Every guest that ended gets its mount checked, 3 s after it ended.
        while self.mounts_to_check and time.monotonic() < deadline + 5.0:
            self.tick()
            time.sleep(0.01)
        for kind, slot, proc, _, _ in self.apps:
            if proc.alive():
                self.report.stuck_apps.append(f"{proc.name} ({kind} on {slot})")
                try:
                    with open(f"/proc/{proc.popen.pid}/stack", errors="replace") as f:
                        stack = [x.split()[-1] for x in f.read().splitlines() if x.strip()]
                    self.report.notes.append(f"{proc.name} is in: " + " <- ".join(stack[:8]))
                except OSError:
                    pass

    def teardown(self) -> None:
        """Stop everything, leave no mount behind.  Safe to call twice."""
        from workload.mount_agent import abort_mount, leader_is_dead

        for _, g in self.resume:
            if g.proc.alive():
                g.proc.popen.send_signal(signal.SIGCONT)
        self.resume.clear()
        for _, _, proc, _, _ in self.apps:
            if proc.alive():
                proc.popen.kill()
        for g in self.guests:
            if g.proc.alive():
                if leader_is_dead(g.proc.popen.pid):
                    abort_mount(g.mountpoint)
                g.proc.popen.send_signal(signal.SIGCONT)
                g.proc.popen.send_signal(signal.SIGTERM)
        for _, _, proc, _, _ in self.apps:
            proc.stop(signal.SIGKILL)
        for g in self.guests:
            try:
                g.proc.popen.wait(10)
            except subprocess.TimeoutExpired:
                abort_mount(g.mountpoint)
                g.proc.popen.kill()
            g.proc.stop(signal.SIGKILL)
        for g in self.guests:
            try:
                abort_mount(g.mountpoint)
            except OSError:
                pass
        if self.host is not None:
            self.host.stop()
        _unmount_under(self.run_dir)

    # --- afterwards -----------------------------------------------------------------------------

    def guest_exit_reasons(self) -> None:
        r = self.report
        for g in self.guests:
            rc = g.proc.popen.returncode
            text = g.proc.stderr()
            if rc is not None and rc < 0:
                why = f"killed by {signal.Signals(-rc).name}"
            else:
                why = "still running at the end"
                for line in text.splitlines():
                    if ": unmounted " in line:
                        why = line.split(": ", 2)[-1]
                if why.startswith("signal"):
                    why = "stopped at the end of the run (SIGTERM)"
            why = f"{why} (after {g.faulted})" if g.faulted else why
            r.guest_exits[why] = r.guest_exits.get(why, 0) + 1
            for line in text.splitlines():
                if line.startswith("cleanlease watchdog: "):
                    reason = line[len("cleanlease watchdog: "):].split(":")[0]
                    r.watchdog_fired[reason] = r.watchdog_fired.get(reason, 0) + 1

    def final_reads(self) -> list[ReadRecord]:
        out = []
        for f in self.files:
            with open(os.path.join(self.export, f.path), "rb") as fh:
                data = fh.read()
            now = time.monotonic_ns()
            for b in range(f.blocks):
                chunk = data[b * BLOCK:(b + 1) * BLOCK]
                try:
                    s = stamps.parse_block(chunk)
                    out.append(ReadRecord("final", f.file_id, b, s.writer, s.seq, now, now,
                                          False, b, None))
                except stamps.CorruptBlock as exc:
                    out.append(ReadRecord("final", f.file_id, b, -1, -1, now, now, False, b,
                                          exc.kind))
        return out

    def analyse(self) -> MountChaosReport:
        from workload.checker import check
        from workload.oplog import read_logs

        r = self.report
        self.guest_exit_reasons()
        records = read_logs([log for _, _, _, log, _ in self.apps if os.path.exists(log)])
        finals = self.final_reads()
        r.final_blocks = len(finals)
        # Each mapping read is checked under a label that says how it was made (the
        # mapping's handle, and whether its guest was stopped at that instant), so
        # that the checker's per-actor counts split the stale ones by cause.
        self.opens = self._opens()
        self.guest_at = {g.mountpoint: g.name for g in self.guests}
        self.stopped = self._stopped_intervals()
        self.fired_at = {g.name: g.watchdog_at for g in self.guests if g.watchdog_at}
        self.direct_maps: dict[tuple[str, int], list[int]] = {}
        for rows in self.opens.values():
            for t, file_id, where, handle in rows:
                if handle == "direct":
                    self.direct_maps.setdefault((where, file_id), []).append(t)
        for times in self.direct_maps.values():
            times.sort()
        kind_of = {p.name: kind for kind, _, p, _, _ in self.apps}
        labelled = []
        for rec in records:
            if isinstance(rec, ReadRecord) and kind_of.get(rec.actor, "").startswith("mmap"):
                rec = dataclasses.replace(rec, actor=f"{rec.actor}|{self._mapping_cause(rec)}")
            labelled.append(rec)
        result = check(labelled + finals)
        for actor, counts in result.per_actor.items():
            name, _, cause = actor.partition("|")
            kind = kind_of.get(name)
            if actor == "final":
                r.lost_writes = counts.stale_reads
            elif kind in READ_KINDS:
                r.reads[kind] += counts.reads
                r.stale[kind] += counts.stale_reads
                if cause:
                    r.mapping_stale[cause] = r.mapping_stale.get(cause, 0) + counts.stale_reads
        if sum(r.stale.values()):
            r.worst_stale_ms = max(c.worst_stale_age_ns for a, c in result.per_actor.items()
                                   if a != "final") / 1e6
            for cause in MAPPING_CAUSES:
                worst = [c.worst_stale_age_ns for a, c in result.per_actor.items()
                         if a.endswith("|" + cause) and c.stale_reads]
                if worst:
                    r.mapping_worst_ms[cause] = max(worst) / 1e6
        r.stale_examples = [self._describe(e) for e in result.examples[:6]]
        writes = [x for x in records if isinstance(x, WriteRecord)]
        torn, unexplained = corrupt_reads(records + finals, writes)
        r.torn_by_host_race = torn
        r.corrupt = unexplained + result.phantom + result.future
        r.corrupt_kinds = dict(result.corrupt)
        if result.phantom or result.future:
            r.notes.append(f"phantom {result.phantom}, future {result.future}")
        self._stalls(writes)
        for kind, slot, proc, _, errors in self.apps:
            try:
                with open(errors) as f:
                    lines = f.read().split()
            except FileNotFoundError:
                continue
            for line in lines:
                key = f"{kind}: {line}"
                r.app_errors[key] = r.app_errors.get(key, 0) + 1
        r.stops_watchdog_fired = self._stops_with_watchdog()
        with open(os.path.join(self.run_dir, "events.txt"), "w") as f:
            for t, what, target in self.log:
                f.write(f"{t} {self._at(t)} {what} {target}\n")
        return r

    def _opens(self) -> dict[str, list[tuple[int, int, str, str]]]:
        """actor -> [(monotonic ns, file_id, mountpoint, handle)] of its mappings and
        kept descriptors, in order."""
        out = {}
        for _, _, proc, _, errors in self.apps:
            try:
                with open(errors + ".opens") as f:
                    rows = [line.split() for line in f if line.strip()]
            except FileNotFoundError:
                continue
            out[proc.name] = [(int(t), int(fid), where, handle) for t, fid, where, handle in rows]
        return out

    def _opened_for(self, rec: ReadRecord):
        """The last mapping (or kept descriptor) `rec`'s actor made before `rec`."""
        rows = self.opens.get(rec.actor.partition("|")[0], [])
        i = bisect.bisect_right(rows, (rec.start_ns, 1 << 62)) - 1
        return rows[i] if i >= 0 else None

    def _mapping_cause(self, rec: ReadRecord) -> str:
        """MAPPING_CAUSES: which one applies to a mapping read."""
        opened = self._opened_for(rec)
        if opened is None:
            return "running"
        guest = self.guest_at.get(opened[2])
        fired = self.fired_at.get(guest, 0)
        if fired and rec.start_ns > fired:
            return "after-watchdog"
        if opened[3] == "direct" or self._direct_nearby(opened[2], rec):
            return "direct"
        if guest is not None and any(a <= rec.start_ns <= b
                                     for a, b in self.stopped.get(guest, ())):
            return "stopped"
        return "running"

    def _direct_nearby(self, mountpoint: str, rec: ReadRecord) -> bool:
        """Whether any application mapped `rec`'s file on the same mount through a
        DIRECT_IO handle in the DIRECT_WINDOW_S before `rec`: the page cache is the
        inode's, so a page such a mapping faulted in serves every mapping of it."""
        times = self.direct_maps.get((mountpoint, rec.file_id), [])
        i = bisect.bisect_right(times, rec.start_ns)
        return i > 0 and rec.start_ns - times[i - 1] <= DIRECT_WINDOW_S * 1e9

    def _stopped_intervals(self) -> dict[str, list[tuple[int, int]]]:
        """guest incarnation -> the (from, to) monotonic ns it was stopped."""
        out: dict[str, list[tuple[int, int]]] = {}
        since: dict[str, int] = {}
        for t, what, target in self.log:
            if what == "stop-mount-guest":
                since[target] = t
            elif what in ("resume-mount-guest", "guest-ended", "watchdog-fired") \
                    and target in since:
                out.setdefault(target, []).append((since.pop(target), t))
        for target, t in since.items():
            out.setdefault(target, []).append((t, 1 << 63))
        return out

    def _stalls(self, writes: list[WriteRecord]) -> None:
        r = self.report
        own = self._own_fault_intervals()
        slot_of = {p.name: slot for kind, slot, p, _, _ in self.apps}
        calm = []
        for w in writes:
            if w.via == "uncertain":
                r.uncertain_writes += 1
                continue
            if w.via == "host-local":
                r.host_writes += 1
            else:
                r.guest_writes += 1
            took = w.end_ns - w.start_ns
            slot = slot_of.get(w.actor)
            if w.via == "guest" and any(w.start_ns <= b and w.end_ns >= a
                                        for a, b in own.get(slot, ())):
                r.own_fault_writes += 1
                r.worst_own_fault_ms = max(r.worst_own_fault_ms, took / 1e6)
                continue
            calm.append((took, w))
        r.calm_writes = len(calm)
        if calm:
            took, w = max(calm, key=lambda x: x[0])
            r.worst_stall_ms = took / 1e6
            r.worst_stall_what = (f"{w.actor} ({w.via}) write of file {w.file_id} block "
                                  f"{w.block} at {self._at(w.start_ns)}")

    def _own_fault_intervals(self) -> dict[str, list[tuple[int, int]]]:
        """slot -> the (from, to) monotonic ns in which its guest was stopped, or had
        been cut or killed and had not ended yet."""
        out: dict[str, list[tuple[int, int]]] = {}
        slot_of = {g.name: g for g in self.guests}
        stopped: dict[str, int] = {}
        for t, what, target in self.log:
            g = slot_of.get(target)
            if g is None:
                continue
            if what == "stop-mount-guest":
                stopped[target] = t
            elif what in ("resume-mount-guest", "guest-ended") and target in stopped:
                out.setdefault(g.slot, []).append((stopped.pop(target), t))
            elif what in ("cut-mount-connection", "kill-mount-guest"):
                out.setdefault(g.slot, []).append((t, g.ended_at or (1 << 63)))
        for target, t in stopped.items():
            out.setdefault(slot_of[target].slot, []).append((t, 1 << 63))
        return out

    def _stops_with_watchdog(self) -> int:
        n = 0
        for g in self.guests:
            stopped = any(what == "stop-mount-guest" and target == g.name
                          for _, what, target in self.log)
            if stopped and "the lease term ran out without a renewal" in g.proc.stderr():
                n += 1
        return n

    def _at(self, ns: int) -> str:
        return f"+{ns / 1e9 - self.t0:.3f}s"

    def _describe(self, e) -> str:
        read, version, overwrite = e.read, e.version, e.overwrite
        v = (f"written by {version.actor} ({version.via}) {self._at(version.start_ns)}.."
             f"{self._at(version.end_ns)}" if version else "the initial content")
        near = [f"{what} {target} {self._at(t)}" for t, what, target in self.log
                if abs(t - read.start_ns) < 3e9]
        opened = self._opened_for(read) if "|" in read.actor else None
        how = (f" through a mapping of file {opened[1]} made {self._at(opened[0])} on "
               f"{os.path.basename(opened[2])} ({opened[3]} handle)" if opened else "")
        return (f"stale{how}: {read.actor} read file {read.file_id} block {read.block} "
                f"{self._at(read.start_ns)}..{self._at(read.end_ns)} returned "
                f"{read.writer}/{read.seq}, {v}; replaced by {overwrite.writer}/{overwrite.seq} "
                f"from {overwrite.actor} ({overwrite.via}) {self._at(overwrite.start_ns)}.."
                f"{self._at(overwrite.end_ns)}, {e.age_ns / 1e6:.1f} ms before the read; "
                f"events nearby: {', '.join(near) or 'none'}")


def _unmount_under(root: str) -> None:
    """Detach every mount below `root` (FUSE ones aborted first), as
    tests/conftest.py's unmount_binds_under does."""
    from host import bindmount
    from workload.mount_agent import abort_mount

    root = os.path.realpath(root)
    for _ in range(16):
        left = [m.mount_point for m in bindmount.mountinfo()
                if m.mount_point == root or m.mount_point.startswith(root + os.sep)]
        if not left:
            return
        for mount_point in reversed(left):
            try:
                if not abort_mount(mount_point):
                    bindmount.unmount(mount_point)
            except OSError:
                pass


# --- one seed, several seeds, the tables ------------------------------------------------------


def run_one(args, seed: int, console=None) -> MountChaosReport:
    from rich.console import Console

    console = console or Console()
    run = _Run(args, seed)
    try:
        run.start()
        with console.status(f"chaos-mount, seed {seed}: {len(run.schedule)} faults over "
                            f"{args.duration:.0f} s"):
            run.wait()
    except BaseException:
        run.teardown()
        raise
    run.teardown()
    report = run.analyse()
    if not args.keep:
        import shutil

        shutil.rmtree(run.run_dir, ignore_errors=True)
    else:
        report.notes.append(f"kept: {run.run_dir}")
    _print(console, report)
    for line in report.anomalies():
        console.print(f"[yellow]chaos-mount, seed {seed}: anomaly:[/yellow] {line}")
    broken = report.broken()
    if broken:
        console.print(f"[red]chaos-mount, seed {seed}: a promise broke:[/red] " + "; ".join(broken))
        for line in report.stale_examples:
            console.print("  " + line)
    else:
        console.print(f"[green]chaos-mount, seed {seed}: all promises held[/green]")
    return report


def _print(console, r: MountChaosReport) -> None:
    from rich.table import Table

    t = Table(title=f"chaos-mount, seed {r.seed}, {r.duration:.0f} s, detector {r.detector}",
              title_justify="left")
    t.add_column("what")
    t.add_column("count", justify="right")
    for name in FAULTS:
        extra = f" (+{r.not_achieved[name]} not achieved)" if r.not_achieved.get(name) else ""
        t.add_row(f"faults injected: {name}", f"{r.faults[name]}{extra}")
    t.add_row("stops during which the watchdog fired (term ran out)", str(r.stops_watchdog_fired))
    t.add_row("mount guests started (incarnations)", str(r.incarnations))
    for why, n in sorted(r.guest_exits.items()):
        t.add_row(f"guest ended: {why}", str(n))
    for why, n in sorted(r.watchdog_fired.items()):
        t.add_row(f"watchdog fired: {why}", str(n))
    for kind in READ_KINDS:
        t.add_row(f"reads checked: {kind}", str(r.reads[kind]))
    for kind in READ_KINDS:
        t.add_row(f"stale reads: {kind}", str(r.stale[kind]))
    for cause in MAPPING_CAUSES:
        n = r.mapping_stale.get(cause, 0)
        worst = f" (worst {r.mapping_worst_ms[cause]:.0f} ms)" if n else ""
        t.add_row(f"  of the mapping reads: {cause}{worst}", str(n))
    t.add_row("lost writes (final read of every block stale)",
              f"{r.lost_writes} (of {r.final_blocks})")
    t.add_row("corrupt, phantom or future blocks", str(r.corrupt))
    t.add_row("torn blocks a host-local write overlapped (ext4's pread, allowed)",
              str(r.torn_by_host_race))
    t.add_row("writes: through mounts / host-local / failed ('uncertain')",
              f"{r.guest_writes} / {r.host_writes} / {r.uncertain_writes}")
    t.add_row("writes held to the bound", str(r.calm_writes))
    t.add_row("worst writer stall (ms)", f"{r.worst_stall_ms:.0f}")
    t.add_row("bound: ack timeout + lease term + clock margin (ms)", f"{r.bound_ms:.0f}")
    t.add_row("writes whose own guest was stopped, cut or killed", str(r.own_fault_writes))
    t.add_row("worst of those (ms, its own guest's fault included)", f"{r.worst_own_fault_ms:.0f}")
    t.add_row("applications still blocked at the end", str(len(r.stuck_apps)))
    t.add_row("mounts left behind by a guest that ended (anomaly)", str(r.mounts_left))
    for key, n in sorted(r.app_restarts.items()):
        t.add_row(f"application {key}", str(n))
    for key, n in sorted(r.app_errors.items()):
        t.add_row(f"application errors (allowed): {key}", str(n))
    console.print(t)
    for note in r.notes:
        console.print(f"  note: {note}")


def _print_summary(console, reports: list[MountChaosReport]) -> None:
    from rich.table import Table

    t = Table(title=f"chaos-mount: {len(reports)} seeds", title_justify="left")
    t.add_column("")
    for r in reports:
        t.add_column(f"seed {r.seed}", justify="right")

    def row(label, value):
        t.add_row(label, *(value(r) for r in reports))

    for name in FAULTS:
        row(name, lambda r, n=name: str(r.faults[n]))
    row("stops that outlasted the term (watchdog fired)", lambda r: str(r.stops_watchdog_fired))
    for kind in READ_KINDS:
        row(f"reads checked: {kind}", lambda r, k=kind: str(r.reads[k]))
    for kind in READ_KINDS:
        row(f"stale reads: {kind}", lambda r, k=kind: str(r.stale[k]))
    for cause in MAPPING_CAUSES:
        row(f"  of the mapping reads: {cause}", lambda r, c=cause: str(r.mapping_stale.get(c, 0)))
    row("lost writes", lambda r: str(r.lost_writes))
    row("corrupt / phantom", lambda r: str(r.corrupt))
    row("worst stall / bound (ms)", lambda r: f"{r.worst_stall_ms:.0f} / {r.bound_ms:.0f}")
    row("application errors (allowed)",
        lambda r: str(sum(r.app_errors.values()) + sum(r.app_restarts.values())))
    row("mounts left behind (anomaly)", lambda r: str(r.mounts_left))
    row("promises", lambda r: "held" if r.ok else "BROKEN")
    console.print(t)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """`cleanlease chaos-mount`'s options (workload/cli.py)."""
    p.add_argument("--seeds", default="1", metavar="LIST",
                   type=lambda s: [int(x) for x in s.split(",") if x],
                   help="comma-separated seeds, one run each (default: %(default)s)")
    p.add_argument("--duration", type=float, default=20.0, metavar="S",
                   help="seconds of faults per seed (default: %(default)s)")
    p.add_argument("--guests", type=int, default=3, help="mounted guests (default: %(default)s)")
    p.add_argument("--mean-gap", type=float, default=1.2, metavar="S",
                   help="mean time between faults (default: %(default)s)")
    p.add_argument("--write-gap-ms", type=float, default=120.0, metavar="MS",
                   help="mean time between one writer's writes (default: %(default)s)")
    p.add_argument("--readers", default=",".join(READ_KINDS), metavar="LIST",
                   type=lambda s: [x for x in s.split(",") if x],
                   help="which readers run on every mount (default: %(default)s)")
    p.add_argument("--lease-term", type=int, default=1000, metavar="MS")
    p.add_argument("--ack-timeout", type=int, default=300, metavar="MS")
    p.add_argument("--detector", default="auto", choices=("auto", "none", "inotify", "fanotify"))
    p.add_argument("--workdir", default=None, help="where runs go (default: under /tmp)")
    p.add_argument("--keep", action="store_true", help="keep exports, logs and stderr")
    p.add_argument("--json", metavar="PATH", help="also write every seed's figures as JSON")


def run(args) -> int:
    """Every seed in args.seeds; exit status 1 if any broke a promise."""
    from rich.console import Console

    from guest.fuse_device import unavailable_reason

    why = unavailable_reason()
    if why:
        print(f"cleanlease chaos-mount: cannot mount: {why}", file=sys.stderr)
        return 2
    unknown = [k for k in args.readers if k not in READ_KINDS]
    if unknown:
        print(f"cleanlease chaos-mount: --readers: unknown {', '.join(unknown)} (choose from "
              f"{', '.join(READ_KINDS)})", file=sys.stderr)
        return 2
    args.workdir = args.workdir or tempfile.mkdtemp(prefix="cleanlease-chaos-mount-")
    os.makedirs(args.workdir, exist_ok=True)
    console = Console()
    if not console.is_terminal:
        console = Console(width=120)
    reports = [run_one(args, seed, console) for seed in args.seeds]
    if len(reports) > 1:
        _print_summary(console, reports)
    if args.json:
        with open(args.json, "w") as f:
            json.dump([dict(dataclasses.asdict(r), broken=r.broken(), anomalies=r.anomalies())
                       for r in reports], f, indent=1)
    ok = all(r.ok for r in reports)
    console.print("[green]chaos-mount: all promises held[/green]" if ok
                  else "[red]chaos-mount: a promise broke[/red]")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["app"]:
        return app_main(argv[1:])
    p = argparse.ArgumentParser(prog="python -m workload.chaos_mount")
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
