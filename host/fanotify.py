"""fanotify pre-content permission events (FAN_PRE_ACCESS) through ctypes.

This is how the host learns that a host-local writer is *about to* modify a
file of the export, while the writer waits in the kernel for our answer.

Model (docs/kernel.md has the measurements and the commands):

* One group per daemon: ``fanotify_init(FAN_CLASS_PRE_CONTENT | FAN_CLOEXEC
  | FAN_NONBLOCK | FAN_REPORT_TID | FAN_UNLIMITED_QUEUE, O_RDONLY|O_CLOEXEC)``.
* One permanent ``FAN_PRE_ACCESS`` mark on the MOUNT of the export, which is a
  private bind mount of the export over itself (host/bindmount.py).  Never a
  mark on a whole file system the machine runs on: :meth:`mark_mount`
  refuses anything that is not the top of a bind mount of a sub-directory.
* Per inode, "disarmed" = an ignore mark (``FAN_MARK_IGNORE |
  FAN_MARK_IGNORED_SURV_MODIFY``) in the same group; "armed" = no ignore
  mark.  Removing the ignore mark re-arms, also for fds opened while
  disarmed (they were opened through the marked mount, so the kernel kept
  them watchable).
* An event says neither read nor write.  With FAN_REPORT_TID the accessing
  thread is blocked in the syscall while we decide, so :func:`classify`
  reads ``/proc/<tid>/syscall`` to tell a read from a modification.

Hazards the caller must respect:

* EVERY permission event must be answered (:meth:`PreContentGroup.respond`),
  on every path including exceptions, or the accessing thread waits
  forever.  Closing the group answers all pending events with "allow".
* Never fork without exec while holding a group: the child inherits the
  group fd (FAN_CLOEXEC only covers exec) and keeps the group alive.
* The daemon must not read or write files through the marked mount from
  the thread that answers events (it would wait for itself).  Do the
  daemon's own I/O through a directory fd opened before the bind mount, or
  through the event fds (they never generate events).
* Not seen: stores through an mmap that already exists, open(O_TRUNC),
  anything through an fd opened before the mark, any access made through
  another mount of the same directory (the original mount under the bind,
  a container's copy, a directory fd or cwd taken before the bind).
"""

from __future__ import annotations

import ctypes
import enum
import fcntl
import errno as _errno
import os
import platform
import stat as _stat
import struct
from dataclasses import dataclass
from typing import Iterator

from host import bindmount

__all__ = [
    "Access",
    "FAN_PRE_ACCESS",
    "PreContentEvent",
    "PreContentGroup",
    "available",
    "classify",
    "syscall_line",
    "writing_to",
]

# fanotify_init flags
FAN_CLOEXEC = 0x00000001
FAN_NONBLOCK = 0x00000002
FAN_CLASS_PRE_CONTENT = 0x00000008
FAN_UNLIMITED_QUEUE = 0x00000010
FAN_REPORT_TID = 0x00000100

# fanotify_mark flags
FAN_MARK_ADD = 0x00000001
FAN_MARK_REMOVE = 0x00000002
FAN_MARK_DONT_FOLLOW = 0x00000004
FAN_MARK_MOUNT = 0x00000010
FAN_MARK_IGNORED_SURV_MODIFY = 0x00000040
FAN_MARK_IGNORE = 0x00000400

# event bits
FAN_ACCESS = 0x00000001
FAN_Q_OVERFLOW = 0x00004000
FAN_PRE_ACCESS = 0x00100000

# responses
FAN_ALLOW = 0x01
FAN_DENY = 0x02
FAN_NOFD = -1

FANOTIFY_METADATA_VERSION = 3
FAN_EVENT_INFO_TYPE_RANGE = 6

AT_FDCWD = -100

_METADATA = struct.Struct("=IBBHQii")  # 24 bytes
_INFO_HDR = struct.Struct("=BBH")  # type, pad, len
_RANGE = struct.Struct("=BBHIQQ")  # 24 bytes: hdr, u32 pad, offset, count
_RESPONSE = struct.Struct("=iI")

# errnos the kernel accepts in FAN_DENY | errno << 24 (6.14+)
DENY_ERRNOS = frozenset(
    {_errno.EPERM, _errno.EIO, _errno.EBUSY, _errno.ETXTBSY, _errno.EAGAIN, _errno.ENOSPC, _errno.EDQUOT}
)

# Mount points that must never carry a mount mark, whatever mountinfo says.
_SYSTEM_DIRS = frozenset(
    {"/", "/tmp", "/var", "/var/tmp", "/home", "/root", "/usr", "/etc", "/opt", "/srv",
     "/mnt", "/media", "/boot", "/run", "/dev", "/proc", "/sys", "/work", "/nix"}
)

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fanotify_init.argtypes = [ctypes.c_uint, ctypes.c_uint]
_libc.fanotify_init.restype = ctypes.c_int
_libc.fanotify_mark.argtypes = [ctypes.c_int, ctypes.c_uint, ctypes.c_uint64, ctypes.c_int, ctypes.c_char_p]
_libc.fanotify_mark.restype = ctypes.c_int


def _init(flags: int, event_f_flags: int) -> int:
    fd = _libc.fanotify_init(flags, event_f_flags)
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"fanotify_init({flags:#x}): {os.strerror(err)}")
    return fd


def _mark(group: int, flags: int, mask: int, target: int | str | os.PathLike) -> None:
    if isinstance(target, int):
        dirfd, path = target, None
        if fcntl.fcntl(target, fcntl.F_GETFL) & os.O_PATH:
            # fanotify_mark() refuses an O_PATH fd with a NULL path (EBADF);
            # the magic link resolves to the same inode.
            dirfd, path = AT_FDCWD, os.fsencode(f"/proc/self/fd/{target}")
    else:
        dirfd, path = AT_FDCWD, os.fsencode(target)
    if _libc.fanotify_mark(group, flags, mask, dirfd, path) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"fanotify_mark(flags={flags:#x}, mask={mask:#x}, {target!r}): {os.strerror(err)}")


# ------------------------------------------------------------------ events


@dataclass(frozen=True)
class PreContentEvent:
    """One event read from the group.

    ``fd`` is an O_RDONLY fd on the file (opened without generating events),
    owned by the group until :meth:`PreContentGroup.respond` closes it; -1
    for a queue-overflow event.  ``pid`` is the accessing *thread* id
    (FAN_REPORT_TID).  ``offset``/``count`` come from the range info record
    (page aligned) and are None when the kernel sent none.
    """

    fd: int
    pid: int
    mask: int
    offset: int | None = None
    count: int | None = None

    @property
    def overflow(self) -> bool:
        """Queue overflow: some events were lost (and, for permission events,
        ALLOWED by the kernel).  Treat every file as possibly modified."""
        return bool(self.mask & FAN_Q_OVERFLOW)


def _parse(buf: bytes) -> Iterator[PreContentEvent]:
    off = 0
    while off + _METADATA.size <= len(buf):
        event_len, vers, _reserved, metadata_len, mask, fd, pid = _METADATA.unpack_from(buf, off)
        if vers != FANOTIFY_METADATA_VERSION or event_len < _METADATA.size or off + event_len > len(buf):
            raise RuntimeError(f"fanotify: unexpected metadata vers={vers} len={event_len}")
        rng_off = rng_count = None
        info = off + metadata_len
        end = off + event_len
        while info + _INFO_HDR.size <= end:
            itype, _pad, ilen = _INFO_HDR.unpack_from(buf, info)
            if ilen < _INFO_HDR.size:
                break
            if itype == FAN_EVENT_INFO_TYPE_RANGE and ilen >= _RANGE.size:
                _t, _p, _l, _pad2, rng_off, rng_count = _RANGE.unpack_from(buf, info)
            info += ilen
        yield PreContentEvent(fd=fd, pid=pid, mask=mask, offset=rng_off, count=rng_count)
        off += event_len


# ------------------------------------------------------------------ classify


class Access(enum.Enum):
    """What the blocked thread is doing, from /proc/<tid>/syscall.

    Callers MUST treat UNKNOWN exactly like MODIFY (the safe side).
    """

    READ = "read"
    MODIFY = "modify"
    MMAP_WRITE = "mmap-write"
    MMAP_READ = "mmap-read"
    UNKNOWN = "unknown"

    @property
    def may_modify(self) -> bool:
        """True for MODIFY, MMAP_WRITE and UNKNOWN."""
        return self in (Access.MODIFY, Access.MMAP_WRITE, Access.UNKNOWN)


# Per architecture: syscall number -> kind.  "rw:<in>,<out>" = data moves
# from the fd in argument <in> to the fd in argument <out> (which side the
# event is for is decided by looking at the fds).
_X86_64 = {
    0: "read", 17: "read", 19: "read", 295: "read", 327: "read",  # read pread64 readv preadv preadv2
    78: "read", 217: "read",  # getdents getdents64 (only with FAN_ONDIR marks)
    59: "read", 322: "read",  # execve execveat (loads the binary)
    1: "modify", 18: "modify", 20: "modify", 296: "modify", 328: "modify",  # write pwrite64 writev pwritev pwritev2
    76: "modify", 77: "modify", 285: "modify",  # truncate ftruncate fallocate
    326: "rw:0,2",  # copy_file_range(fd_in, off_in, fd_out, ...)
    40: "rw:1,0",  # sendfile(out_fd, in_fd, ...)
    275: "rw:0,2",  # splice(fd_in, off_in, fd_out, ...)
    9: "mmap",
}
_AARCH64 = {
    63: "read", 67: "read", 65: "read", 69: "read", 286: "read",  # read pread64 readv preadv preadv2
    61: "read",  # getdents64
    221: "read", 281: "read",  # execve execveat
    64: "modify", 68: "modify", 66: "modify", 70: "modify", 287: "modify",  # write pwrite64 writev pwritev pwritev2
    45: "modify", 46: "modify", 47: "modify",  # truncate ftruncate fallocate
    285: "rw:0,2",  # copy_file_range
    71: "rw:1,0",  # sendfile
    76: "rw:0,2",  # splice
    222: "mmap",
}
_TABLES = {"x86_64": _X86_64, "amd64": _X86_64, "aarch64": _AARCH64, "arm64": _AARCH64}
SYSCALL_TABLE: dict[int, str] = _TABLES.get(platform.machine(), {})
# "modify" syscalls whose first argument is a path, not an fd: truncate
_BY_PATH = {"x86_64": {76}, "amd64": {76}, "aarch64": {45}, "arm64": {45}}.get(platform.machine(), set())

PROT_WRITE = 0x2
MAP_TYPE = 0x0F
MAP_SHARED = 0x01
MAP_SHARED_VALIDATE = 0x03


def syscall_line(tid: int) -> str | None:
    """``/proc/<tid>/syscall``, stripped; None when it cannot be read (the thread is gone)."""
    try:
        with open(f"/proc/{tid}/syscall", encoding="ascii") as f:
            return f.read().strip()
    except OSError:
        return None


def _split_syscall(line: str | None) -> list[str] | None:
    fields = line.split() if line is not None else None
    if not fields or fields[0] in ("running", "-1") or len(fields) < 7:
        return None
    return fields


def _fd_stat(tid: int, fd: int) -> os.stat_result | None:
    try:
        return os.stat(f"/proc/{tid}/fd/{fd}")
    except OSError:
        return None


def _fd_accmode(tid: int, fd: int) -> int | None:
    try:
        with open(f"/proc/{tid}/fdinfo/{fd}", encoding="ascii") as f:
            for line in f:
                if line.startswith("flags:"):
                    return int(line.split()[1], 8) & os.O_ACCMODE
    except (OSError, ValueError):
        pass
    return None


def classify(tid: int, event_fd: int | None = None) -> Access:
    """Tell what the thread ``tid``, blocked on a pre-content event, is doing.

    Reads ``/proc/<tid>/syscall`` (number, then six hex arguments):

    * read/pread64/readv/preadv/preadv2 (and getdents, execve): READ
    * write/pwrite64/writev/pwritev/pwritev2, truncate, ftruncate,
      fallocate: MODIFY
    * copy_file_range/sendfile/splice: MODIFY when the event is for the
      destination.  The event is for the source (READ) when the destination
      fd is not a regular file, or when ``event_fd`` (the event's fd) is
      given and is the same file as the source but not the destination.
    * mmap: MMAP_WRITE when ``flags & MAP_SHARED`` and ``prot & PROT_WRITE``;
      also MMAP_WRITE for a shared read-only mapping of an fd opened O_RDWR
      (mprotect() can add PROT_WRITE later without any new event) or when
      that cannot be checked; otherwise MMAP_READ.  Stores through the
      mapping are never seen again: the caller must keep an MMAP_WRITE file
      dirty until the mapping is gone (it cannot know: treat as dirty until
      flushed and the writer closed it).
    * anything else (thread not in a syscall, e.g. a page fault; io_uring
      workers; an unknown syscall or architecture; /proc unreadable):
      UNKNOWN.

    Callers MUST treat UNKNOWN as MODIFY (the safe side): an unknown access
    might dirty the file.  ``Access.may_modify`` does that.
    """
    fields = _split_syscall(syscall_line(tid))
    if fields is None:
        return Access.UNKNOWN
    try:
        nr = int(fields[0])
        args = [int(a, 16) for a in fields[1:7]]
    except ValueError:
        return Access.UNKNOWN
    kind = SYSCALL_TABLE.get(nr)
    if kind is None:
        return Access.UNKNOWN
    if kind == "read":
        return Access.READ
    if kind == "modify":
        return Access.MODIFY
    if kind == "mmap":
        prot, flags, fd = args[2], args[3], args[4] & 0xFFFFFFFF
        if flags & MAP_TYPE not in (MAP_SHARED, MAP_SHARED_VALIDATE):
            return Access.MMAP_READ  # private: stores never reach the file
        if prot & PROT_WRITE:
            return Access.MMAP_WRITE
        if _fd_accmode(tid, fd) in (os.O_RDONLY, os.O_WRONLY):
            return Access.MMAP_READ  # no VM_MAYWRITE: cannot become writable
        return Access.MMAP_WRITE
    if kind.startswith("rw:"):
        i_in, i_out = (int(x) for x in kind[3:].split(","))
        fd_in, fd_out = args[i_in] & 0xFFFFFFFF, args[i_out] & 0xFFFFFFFF
        st_out = _fd_stat(tid, fd_out)
        if st_out is not None and not _stat.S_ISREG(st_out.st_mode):
            return Access.READ
        if event_fd is not None and st_out is not None:
            st_in = _fd_stat(tid, fd_in)
            ev = os.fstat(event_fd)
            same_in = st_in is not None and (st_in.st_dev, st_in.st_ino) == (ev.st_dev, ev.st_ino)
            same_out = (st_out.st_dev, st_out.st_ino) == (ev.st_dev, ev.st_ino)
            if same_in and not same_out:
                return Access.READ
        return Access.MODIFY
    return Access.UNKNOWN


CANNOT_TELL = -1  # `_written_fd`: the call may modify something, and what cannot be told


def _written_fd(fields: list[str]) -> int | None:
    """The fd that a thread's current system call (the fields of its
    ``/proc/<tid>/syscall``) may modify: None when it modifies nothing through
    an fd (no call, or a call that does not modify), CANNOT_TELL when that
    cannot be told (the thread is running, the line does not parse, or the
    call takes a path: truncate)."""
    if fields[0] == "running":
        return CANNOT_TELL
    if fields[0] == "-1" or len(fields) < 7:
        return None
    try:
        nr = int(fields[0])
        args = [int(a, 16) for a in fields[1:7]]
    except ValueError:
        return CANNOT_TELL
    kind = SYSCALL_TABLE.get(nr)
    if kind == "modify":
        return CANNOT_TELL if nr in _BY_PATH else args[0] & 0xFFFFFFFF
    if kind is not None and kind.startswith("rw:"):
        return args[int(kind[3:].split(",")[1])] & 0xFFFFFFFF
    return None


def writing_to(tid: int, dev: int, ino: int) -> bool:
    """Is thread ``tid`` inside a system call that may be modifying inode
    ``(dev, ino)`` right now (or can that not be told)?

    True when ``/proc/<tid>/syscall`` says "running" (it cannot be told), or
    shows a write/pwrite/writev/pwritev/pwritev2/ftruncate/fallocate on an fd
    that refers to that inode, the destination fd of a copy_file_range,
    sendfile or splice that does, or a truncate(path) (the path cannot be
    resolved as the thread sees it).  False when the thread is gone, blocked
    outside a system call, or in any other call (reads, mmap, futex...; an
    io_uring submission is not seen: docs/kernel.md, "What is missed").
    """
    fd = _written_fd((syscall_line(tid) or "-1").split())
    if fd is None:
        return False
    if fd == CANNOT_TELL:
        return True
    try:
        st = os.stat(f"/proc/{tid}/fd/{fd}")
    except FileNotFoundError:  # gone, or the fd was closed under the call: cannot tell
        return os.path.exists(f"/proc/{tid}")
    except OSError:
        return True
    return (st.st_dev, st.st_ino) == (dev, ino)


def modifying_threads(dev: int):
    """Yield ``(tid, tgid, (dev, ino))`` for every thread of the machine that may be
    modifying a file of device ``dev`` right now: inside a write-like system
    call on such a file (as `writing_to` reads it), or running (on a CPU:
    ``/proc/<tid>/syscall`` cannot tell), for each file of ``dev`` its process
    has open for writing.  Threads that cannot be read are skipped, and so is
    the calling process.  Costs a few reads per thread of the machine (about
    20 ms for 100 processes here): for a daemon's start, not for a hot path."""
    for tgid_name in os.listdir("/proc"):
        if not tgid_name.isdigit():
            continue
        tgid = int(tgid_name)
        if tgid == os.getpid():
            continue  # the daemon itself: its own writes go through the daemon
        try:
            tids = [int(t) for t in os.listdir(f"/proc/{tgid}/task")]
        except OSError:
            continue
        for tid in tids:
            fields = (syscall_line(tid) or "-1").split()
            if fields[0] == "running":
                for key in _files_open_for_write(tgid, dev):
                    yield tid, tgid, key
                continue
            fd = _written_fd(fields)
            if fd is None or fd == CANNOT_TELL:
                continue
            try:
                st = os.stat(f"/proc/{tid}/fd/{fd}")
            except OSError:
                continue
            if st.st_dev == dev:
                yield tid, tgid, (st.st_dev, st.st_ino)


def writers_by_file(dev: int) -> dict[tuple[int, int], set[int]]:
    """For every regular file of device ``dev`` some process (not the caller)
    has open for writing: the set of those processes (tgids)."""
    writers: dict[tuple[int, int], set[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit() and int(name) != os.getpid():
            for key in _files_open_for_write(int(name), dev):
                writers.setdefault(key, set()).add(int(name))
    return writers


def has_open_for_write(tgid: int, key: tuple[int, int]) -> bool:
    """Does process ``tgid`` still have file ``key`` open for writing?"""
    return key in _files_open_for_write(tgid, key[0])


def _files_open_for_write(tgid: int, dev: int) -> list[tuple[int, int]]:
    keys = []
    try:
        fds = os.listdir(f"/proc/{tgid}/fd")
    except OSError:
        return keys
    for fd in fds:
        try:
            with open(f"/proc/{tgid}/fdinfo/{fd}", encoding="ascii") as f:
                flags = next((int(line.split()[1], 8) for line in f if line.startswith("flags:")), 0)
            if flags & os.O_ACCMODE == os.O_RDONLY:
                continue
            st = os.stat(f"/proc/{tgid}/fd/{fd}")
        except (OSError, ValueError):
            continue
        if st.st_dev == dev and _stat.S_ISREG(st.st_mode):
            keys.append((st.st_dev, st.st_ino))
    return keys


# ------------------------------------------------------------------ group


class PreContentGroup:
    """A fanotify group for FAN_PRE_ACCESS permission events.

    Use :meth:`open`; add it to an event loop with ``fileno()`` (readable
    when events are queued); :meth:`read_events` then :meth:`respond` to
    each one.  ``close()`` (or leaving the ``with`` block) allows every
    event still pending.
    """

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._pending: dict[int, PreContentEvent] = {}

    @classmethod
    def open(cls, unlimited_queue: bool = True) -> "PreContentGroup":
        """fanotify_init(FAN_CLASS_PRE_CONTENT | FAN_CLOEXEC | FAN_NONBLOCK |
        FAN_REPORT_TID [| FAN_UNLIMITED_QUEUE], O_RDONLY | O_CLOEXEC).

        FAN_UNLIMITED_QUEUE is on by default: on a queue overflow the kernel
        ALLOWS the permission events it could not queue, i.e. a write would
        land unseen.  Each queued event is a blocked thread, so the queue is
        bounded by the writers anyway.  Raises OSError (EPERM without
        CAP_SYS_ADMIN, EINVAL on kernels without these flags).
        """
        flags = FAN_CLASS_PRE_CONTENT | FAN_CLOEXEC | FAN_NONBLOCK | FAN_REPORT_TID
        if unlimited_queue:
            flags |= FAN_UNLIMITED_QUEUE
        return cls(_init(flags, os.O_RDONLY | os.O_CLOEXEC | os.O_LARGEFILE))

    def fileno(self) -> int:
        if self._fd < 0:
            raise ValueError("fanotify group is closed")
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd < 0

    @property
    def pending(self) -> list[PreContentEvent]:
        """Events read but not answered yet."""
        return list(self._pending.values())

    # -- marks

    def mark_mount(self, path: str | os.PathLike) -> None:
        """Permanent FAN_PRE_ACCESS mark on the mount whose root is ``path``.

        Guard: ``path`` must be the mount point of the topmost mount there,
        that mount must be a bind mount of a sub-directory (its root inside
        the file system is not "/"), must be private, and must not be a
        system directory (/, /tmp, /home, ...).  Otherwise ValueError.  The
        check and the mark use the same open fd, so the mount cannot be
        swapped in between.
        """
        real = os.path.realpath(path)
        fd = os.open(real, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            mid = bindmount.mount_id_of_fd(fd)
            mi = next((m for m in bindmount.mountinfo() if m.mount_id == mid), None)
            if mi is None:
                raise ValueError(f"{real}: mount id {mid} not found in /proc/self/mountinfo")
            if mi.mount_point != real:
                raise ValueError(
                    f"{real} is not a mount point (it is inside {mi.mount_point}); "
                    "bind-mount it over itself first (host.bindmount.bind_over_itself)"
                )
            if real in _SYSTEM_DIRS or mi.mount_point in _SYSTEM_DIRS:
                raise ValueError(f"refusing to mark system mount point {real}")
            if mi.root == "/":
                raise ValueError(
                    f"{real} is the root of a whole {mi.fstype} file system, not a bind mount "
                    "of a sub-directory; refusing to mark it"
                )
            if mi.shared:
                raise ValueError(f"{real} is a shared mount ({' '.join(mi.optional)}); make it private")
            _mark(self.fileno(), FAN_MARK_ADD | FAN_MARK_MOUNT, FAN_PRE_ACCESS, fd)
        finally:
            os.close(fd)

    def mark_inode(self, fd_or_path: int | str | os.PathLike) -> None:
        """Optional, path-independent: a permanent FAN_PRE_ACCESS mark on one
        inode (FAN_MARK_ADD).  Unlike the mount mark it sees accesses made
        through ANY mount or path (the original directory under the bind, a
        directory fd or cwd taken before the bind, another mount namespace),
        but only through fds opened after this call.  disarm()/arm() work on
        it the same way.  The mark pins the inode in memory until
        :meth:`unmark_inode` or close()."""
        _mark(self.fileno(), FAN_MARK_ADD, FAN_PRE_ACCESS, fd_or_path)

    def unmark_inode(self, fd_or_path: int | str | os.PathLike) -> None:
        """Remove the permanent inode mask added by :meth:`mark_inode`
        (ENOENT = no mark = success).  An ignore mark (disarmed) stays."""
        try:
            _mark(self.fileno(), FAN_MARK_REMOVE, FAN_PRE_ACCESS, fd_or_path)
        except OSError as e:
            if e.errno != _errno.ENOENT:
                raise

    def disarm(self, fd_or_path: int | str | os.PathLike) -> None:
        """Disarm one inode: add an ignore mark for FAN_PRE_ACCESS
        (FAN_MARK_ADD | FAN_MARK_IGNORE | FAN_MARK_IGNORED_SURV_MODIFY).
        Idempotent.  ``fd_or_path``: an open fd (O_PATH is fine) or a path."""
        _mark(self.fileno(), FAN_MARK_ADD | FAN_MARK_IGNORE | FAN_MARK_IGNORED_SURV_MODIFY,
              FAN_PRE_ACCESS, fd_or_path)

    def arm(self, fd_or_path: int | str | os.PathLike) -> None:
        """Re-arm one inode: remove its ignore mark.  ENOENT (no mark: it was
        already armed) is success.  Works for fds opened while disarmed."""
        try:
            _mark(self.fileno(), FAN_MARK_REMOVE | FAN_MARK_IGNORE | FAN_MARK_IGNORED_SURV_MODIFY,
                  FAN_PRE_ACCESS, fd_or_path)
        except OSError as e:
            if e.errno != _errno.ENOENT:
                raise

    # -- events

    def read_events(self, max_events: int | None = None) -> list[PreContentEvent]:
        """Drain the queue without blocking; [] when nothing is queued.

        Every returned event with ``fd >= 0`` is pending until
        :meth:`respond` is called for it.  With ``max_events``, about that
        many at most (a few more when fewer than 6 are asked for: a read
        buffer must hold one event with its info records): the kernel opens
        an fd for each event read, and denies (EPERM) an event it cannot
        open one for, so a caller that keeps a reserve of descriptors reads
        no more than the reserve holds.  Events not read stay queued, their
        threads blocked.

        Raises OSError (EMFILE, ENFILE) if the kernel could not open an fd
        for the first event: it denied that event.
        """
        out: list[PreContentEvent] = []
        fd = self.fileno()
        while max_events is None or len(out) < max_events:
            size = 65536 if max_events is None else min(
                65536, max(128, (max_events - len(out)) * _METADATA.size))
            try:
                buf = os.read(fd, size)
            except BlockingIOError:
                break
            except InterruptedError:
                continue
            if not buf:
                break
            # An unparseable buffer raises RuntimeError: the events in it
            # cannot be answered by fd; close() the group (allows them all).
            for ev in _parse(buf):
                if ev.fd >= 0:
                    self._pending[ev.fd] = ev
                out.append(ev)
        return out

    def respond(self, event: PreContentEvent, allow: bool = True, errno: int | None = None) -> None:
        """Answer ``event`` and close its fd.

        ``allow=False`` denies; with ``errno`` (one of DENY_ERRNOS) the
        blocked syscall fails with that errno (FAN_DENY | errno << 24),
        otherwise with EPERM.  If the kernel rejects the chosen errno the
        event is still answered with a plain FAN_DENY before the error is
        raised, so no writer is left blocked.
        """
        if event.fd < 0:
            raise ValueError("event has no fd (queue overflow events need no answer)")
        if allow:
            response = FAN_ALLOW
        else:
            response = FAN_DENY
            if errno:
                response |= (errno & 0xFF) << 24
        try:
            try:
                os.write(self.fileno(), _RESPONSE.pack(event.fd, response))
            except OSError:
                if response not in (FAN_ALLOW, FAN_DENY):
                    os.write(self.fileno(), _RESPONSE.pack(event.fd, FAN_DENY))
                raise
        finally:
            self._pending.pop(event.fd, None)
            try:
                os.close(event.fd)
            except OSError:
                pass

    def close(self) -> None:
        """Close the group: the kernel allows every pending event.  Then
        close the fds of events that were never answered.  Idempotent."""
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)
        pending, self._pending = self._pending, {}
        for efd in pending:
            try:
                os.close(efd)
            except OSError:
                pass

    def __enter__(self) -> "PreContentGroup":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ------------------------------------------------------------------ probe


def available(path: str | os.PathLike) -> tuple[bool, str]:
    """Probe for real whether pre-content events work on directory ``path``.

    Creates a group and puts an *ignore* mark for FAN_PRE_ACCESS on the
    directory's inode (the same capability checks as a real mark, but an
    ignore mark can never make anybody wait), then closes the group.
    Returns (True, "ok") or (False, reason).
    """
    try:
        g = _init(FAN_CLASS_PRE_CONTENT | FAN_CLOEXEC | FAN_NONBLOCK | FAN_REPORT_TID, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == _errno.EPERM:
            return False, "needs CAP_SYS_ADMIN (fanotify_init returned EPERM)"
        if e.errno == _errno.ENOSYS:
            return False, "kernel built without fanotify (CONFIG_FANOTIFY)"
        if e.errno == _errno.EINVAL:
            return False, "kernel lacks FAN_CLASS_PRE_CONTENT/FAN_REPORT_TID (fanotify_init EINVAL)"
        return False, f"fanotify_init failed: {os.strerror(e.errno)}"
    try:
        flags = FAN_MARK_ADD | FAN_MARK_IGNORE | FAN_MARK_IGNORED_SURV_MODIFY
        try:
            _mark(g, flags, FAN_ACCESS, path)
        except OSError as e:
            if e.errno == _errno.EINVAL:
                return False, "kernel lacks FAN_MARK_IGNORE (< 6.0)"
            if e.errno in (_errno.ENOENT, _errno.ENOTDIR, _errno.EACCES):
                return False, f"cannot mark {os.fspath(path)!r}: {os.strerror(e.errno)}"
            return False, f"fanotify_mark failed: {os.strerror(e.errno)}"
        try:
            _mark(g, flags, FAN_PRE_ACCESS, path)
        except OSError as e:
            if e.errno == _errno.EINVAL:
                return False, "kernel lacks FAN_PRE_ACCESS (< 6.14)"
            if e.errno == _errno.EOPNOTSUPP:
                return False, "file system does not support pre-content events (tmpfs?)"
            return False, f"fanotify_mark(FAN_PRE_ACCESS) failed: {os.strerror(e.errno)}"
        return True, "ok"
    finally:
        os.close(g)
