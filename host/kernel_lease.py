"""Linux file read leases (fcntl F_SETLEASE) for the open-lease baseline.

The open-lease policy models NFSv4 read delegations / SMB oplocks: a guest
may cache a file while the host holds a kernel READ lease on it, and the
lease is broken when anybody opens the file for write (or truncates it).
The opener is blocked in open()/truncate() until the holder releases the
lease (F_UNLCK) or closes the fd, or /proc/sys/fs/lease-break-time (45 s
by default) runs out; that is the window in which the daemon recalls the
guests' caches.

How the daemon learns WHICH lease is being broken: F_SETSIG makes the
kernel send a real-time signal whose siginfo carries ``si_fd`` (the fd of
the lease).  :class:`LeaseBreakWatcher` blocks that signal and reads it
from a signalfd, so an asyncio loop can ``add_reader(watcher.fileno(), ...)``
and call :meth:`LeaseBreakWatcher.read_breaks`.

IMPORTANT: the lease signal (and SIGIO, the kernel's fallback when the
real-time signal queue is full) must be blocked in EVERY thread of the
process, otherwise the kernel may deliver it to a thread that does not block
it, whose default action for a real-time signal is to kill the process.
Threads inherit the mask of the thread that creates them, so call
:func:`block_lease_signals` in the main thread before any thread starts
(before the asyncio default executor, uvloop threads, logging threads ...).
:class:`LeaseBreakWatcher` checks every thread of the process and raises
RuntimeError when one does not block the signals.

Other facts (measured on 6.18, ext4, see docs/kernel.md):

* A read lease is refused (EAGAIN -> :class:`LeaseUnavailable`) while any
  fd has the file open for write, ours included (and while it is mapped
  shared-writable).
* Broken by open(O_WRONLY/O_RDWR) and truncate(); not by read opens, chmod,
  rename, unlink, utime, setxattr.
* The holder's own process is an opener like any other: opening the file for
  write from the daemon while it holds the lease blocks the daemon itself
  for lease-break-time (O_NONBLOCK opens fail with EWOULDBLOCK instead).
  Release first.
* Needs to own the file or CAP_LEASE; /proc/sys/fs/leases-enable must be 1.
"""

from __future__ import annotations

import ctypes
import errno as _errno
import fcntl
import os
import signal
import struct
import tempfile
import threading

__all__ = [
    "DEFAULT_LEASE_SIGNAL",
    "LeaseBreakWatcher",
    "LeaseError",
    "LeaseUnavailable",
    "ReadLease",
    "available",
    "block_lease_signals",
]

F_SETSIG = 10
F_SETLEASE = 1024
F_GETLEASE = 1025
F_RDLCK = 0
F_WRLCK = 1
F_UNLCK = 2

SFD_CLOEXEC = os.O_CLOEXEC
SFD_NONBLOCK = os.O_NONBLOCK

# glibc reserves the first two kernel RT signals; signal.SIGRTMIN is already
# past them.  +4 keeps clear of libraries that take SIGRTMIN itself.
DEFAULT_LEASE_SIGNAL: int = int(signal.SIGRTMIN) + 4

# struct signalfd_siginfo is 128 bytes:
#   u32 ssi_signo @0, s32 ssi_errno @4, s32 ssi_code @8, u32 ssi_pid @12,
#   u32 ssi_uid @16, s32 ssi_fd @20, u32 ssi_tid @24, u32 ssi_band @28, ...
SIGNALFD_SIGINFO_SIZE = 128
_SIGINFO_HEAD = struct.Struct("=IiiIIiII")  # up to and including ssi_band

_libc = ctypes.CDLL(None, use_errno=True)


class _SigSet(ctypes.Structure):
    _fields_ = [("val", ctypes.c_ulong * (1024 // (8 * ctypes.sizeof(ctypes.c_ulong))))]


_libc.signalfd.argtypes = [ctypes.c_int, ctypes.POINTER(_SigSet), ctypes.c_int]
_libc.signalfd.restype = ctypes.c_int
_libc.sigemptyset.argtypes = [ctypes.POINTER(_SigSet)]
_libc.sigaddset.argtypes = [ctypes.POINTER(_SigSet), ctypes.c_int]


class LeaseError(OSError):
    """A lease operation failed."""


class LeaseUnavailable(LeaseError):
    """F_SETLEASE F_RDLCK failed with EAGAIN: the file is open for write
    (or mapped shared-writable) by some process, possibly this one."""


def _signals(signum: int) -> set[int]:
    return {signum, int(signal.SIGIO)}


def block_lease_signals(signum: int = DEFAULT_LEASE_SIGNAL) -> None:
    """Block ``signum`` and SIGIO in the calling thread.

    Call it in the main thread before any other thread is started: threads
    created afterwards inherit the blocked mask.
    """
    signal.pthread_sigmask(signal.SIG_BLOCK, _signals(signum))


def _threads_not_blocking(signums: set[int]) -> list[int]:
    bad = []
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return bad
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/status", encoding="ascii") as f:
                for line in f:
                    if line.startswith("SigBlk:"):
                        mask = int(line.split()[1], 16)
                        if any(not mask & (1 << (s - 1)) for s in signums):
                            bad.append(int(tid))
                        break
        except OSError:
            continue  # thread exited
    return bad


def _open_rdonly(path_or_opath_fd: int | str | os.PathLike) -> int:
    if isinstance(path_or_opath_fd, int):
        # Re-open through the magic link: works for O_PATH fds and for any
        # fd, and gives a fresh open file description that we own.
        return os.open(f"/proc/self/fd/{path_or_opath_fd}", os.O_RDONLY | os.O_CLOEXEC)
    return os.open(path_or_opath_fd, os.O_RDONLY | os.O_CLOEXEC)


class ReadLease:
    """A kernel read lease on one file.

    Opens the file O_RDONLY (a path, or an fd — typically O_PATH — that is
    re-opened through /proc/self/fd), sets F_SETSIG to ``signum`` and takes
    F_SETLEASE F_RDLCK.  Raises :class:`LeaseUnavailable` when the file is
    open for write somewhere, :class:`LeaseError` for other failures.
    """

    def __init__(self, path_or_opath_fd: int | str | os.PathLike, signum: int = DEFAULT_LEASE_SIGNAL) -> None:
        self.signum = signum
        self._fd = _open_rdonly(path_or_opath_fd)
        try:
            fcntl.fcntl(self._fd, F_SETSIG, signum)
            fcntl.fcntl(self._fd, F_SETLEASE, F_RDLCK)
        except OSError as e:
            os.close(self._fd)
            self._fd = -1
            if e.errno in (_errno.EAGAIN, _errno.EWOULDBLOCK):
                raise LeaseUnavailable(e.errno, "file is open for write somewhere; no read lease") from None
            raise LeaseError(e.errno, f"F_SETLEASE F_RDLCK: {os.strerror(e.errno)}") from None
        self._held = True

    @property
    def fd(self) -> int:
        """The O_RDONLY fd holding the lease (``ssi_fd`` of a break)."""
        return self._fd

    def fileno(self) -> int:
        return self._fd

    @property
    def held(self) -> bool:
        """True until :meth:`release` (a break in progress does not clear it)."""
        return self._held

    def breaking(self) -> bool:
        """True when the kernel is breaking the lease (F_GETLEASE no longer
        says F_RDLCK while we have not released it)."""
        if not self._held:
            return False
        return fcntl.fcntl(self._fd, F_GETLEASE) != F_RDLCK

    def release(self) -> None:
        """F_SETLEASE F_UNLCK: a blocked opener proceeds.  Idempotent.  The fd
        stays open (close() closes it)."""
        if self._held and self._fd >= 0:
            self._held = False
            fcntl.fcntl(self._fd, F_SETLEASE, F_UNLCK)

    def close(self) -> None:
        """Release and close the fd.  Idempotent."""
        try:
            self.release()
        finally:
            fd, self._fd = self._fd, -1
            if fd >= 0:
                os.close(fd)

    def __enter__(self) -> "ReadLease":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ReadLease(fd={self._fd}, held={self._held})"


class LeaseBreakWatcher:
    """Learn which leases are being broken, through a signalfd.

    Construction blocks ``signum`` and SIGIO in the calling thread, then
    checks that every thread of the process blocks them (RuntimeError if
    not: call :func:`block_lease_signals` before starting threads).

    ``fileno()`` is readable when breaks are pending; :meth:`read_breaks`
    returns the fds of the registered leases being broken.  SIGIO means the
    real-time queue overflowed and the fd was lost: every registered lease
    is then checked with F_GETLEASE.
    """

    def __init__(self, signum: int = DEFAULT_LEASE_SIGNAL) -> None:
        self.signum = signum
        sigs = _signals(signum)
        block_lease_signals(signum)
        bad = _threads_not_blocking(sigs)
        if bad:
            raise RuntimeError(
                f"signals {sorted(sigs)} are not blocked in threads {bad}: call "
                "host.kernel_lease.block_lease_signals() in the main thread before any thread starts"
            )
        ss = _SigSet()
        _libc.sigemptyset(ctypes.byref(ss))
        for s in sigs:
            _libc.sigaddset(ctypes.byref(ss), s)
        fd = _libc.signalfd(-1, ctypes.byref(ss), SFD_NONBLOCK | SFD_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"signalfd: {os.strerror(err)}")
        self._fd = fd
        self._leases: dict[int, ReadLease] = {}
        self._lock = threading.Lock()

    def fileno(self) -> int:
        if self._fd < 0:
            raise ValueError("watcher is closed")
        return self._fd

    def lease(self, path_or_opath_fd: int | str | os.PathLike) -> ReadLease:
        """Take a read lease with this watcher's signal and register it."""
        lease = ReadLease(path_or_opath_fd, self.signum)
        self.add(lease)
        return lease

    def add(self, lease: ReadLease) -> None:
        if lease.signum != self.signum:
            raise ValueError("lease uses another signal")
        with self._lock:
            self._leases[lease.fd] = lease

    def discard(self, lease: ReadLease) -> None:
        with self._lock:
            if self._leases.get(lease.fd) is lease:
                del self._leases[lease.fd]

    def get(self, fd: int) -> ReadLease | None:
        return self._leases.get(fd)

    def read_breaks(self) -> list[int]:
        """Drain the signalfd without blocking; return the fds (registered,
        still held) whose leases are being broken, each once, in arrival
        order.  [] when nothing is pending."""
        fds: list[int] = []
        overflow = False
        while True:
            try:
                buf = os.read(self.fileno(), SIGNALFD_SIGINFO_SIZE * 32)
            except BlockingIOError:
                break
            except InterruptedError:
                continue
            if not buf:
                break
            for off in range(0, len(buf) - SIGNALFD_SIGINFO_SIZE + 1, SIGNALFD_SIGINFO_SIZE):
                signo, _err, _code, _pid, _uid, ssi_fd, _tid, _band = _SIGINFO_HEAD.unpack_from(buf, off)
                if signo == self.signum:
                    fds.append(ssi_fd)
                else:
                    overflow = True
        with self._lock:
            leases = dict(self._leases)
        if overflow:
            fds.extend(fd for fd, lease in leases.items() if lease.breaking())
        out: list[int] = []
        for fd in fds:
            lease = leases.get(fd)
            if lease is not None and lease.held and fd not in out:
                out.append(fd)
        return out

    def close(self) -> None:
        """Close the signalfd (the signals stay blocked).  Idempotent."""
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def __enter__(self) -> "LeaseBreakWatcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def available(dir: str | os.PathLike | None = None) -> tuple[bool, str]:
    """Probe for real: take and release a read lease on a fresh temporary
    file in ``dir``.  Returns (ok, reason)."""
    try:
        with open("/proc/sys/fs/leases-enable", encoding="ascii") as f:
            if f.read().strip() == "0":
                return False, "leases are disabled (/proc/sys/fs/leases-enable = 0)"
    except OSError:
        pass
    try:
        tfd, tpath = tempfile.mkstemp(prefix="cleanlease-leaseprobe-", dir=dir)
    except OSError as e:
        return False, f"cannot create a probe file: {os.strerror(e.errno or 0)}"
    os.close(tfd)
    try:
        try:
            ReadLease(tpath).close()
        except LeaseUnavailable:
            return False, "read lease refused (EAGAIN) on a file nobody has open for write"
        except OSError as e:
            if e.errno in (_errno.EACCES, _errno.EPERM):
                return False, "needs to own the file or CAP_LEASE"
            if e.errno == _errno.EINVAL:
                return False, "file system does not support leases (EINVAL)"
            return False, f"F_SETLEASE failed: {os.strerror(e.errno or 0)}"
        return True, "ok"
    finally:
        os.unlink(tpath)
