"""cachestat(2) through ctypes: is the page cache of a file clean?

The daemon re-arms a clean lease only when the host file is clean again
(docs/kernel.md, "cachestat").  "Clean" here means: the page cache of the
file has no dirty page and no page under writeback::

    cachestat(fd, &{off, len}, &out, 0)  ->  out.nr_dirty == 0
                                             and out.nr_writeback == 0

Facts this module relies on (measured on Linux 6.18, ext4; see
docs/kernel.md for the commands):

* syscall number 451 on every architecture that uses the common syscall
  table for new calls (x86_64, aarch64, arm, riscv64, ppc64le, s390x, ...);
  Linux 6.5 and newer.  Older kernels answer ENOSYS.
* ``length == 0`` means "from ``offset`` to the end of the file".
* The caller needs an fd open for write, or to own the file, or to have
  write permission on it (EPERM otherwise).  Root passes.
* It answers "is the page cache clean", not "is the inode clean": chmod or
  a timestamp update dirty the inode but never ``nr_dirty``.
* With large folios a 1-byte write can report a whole folio (up to 512
  pages) dirty, so do not read ``nr_dirty`` as a byte count.
* fdatasync()/fsync() make it clean; sync_file_range(WRITE) alone leaves
  pages in writeback.
* tmpfs/ramfs keep no dirty state: cachestat always reports 0 there, so a
  "clean" answer means nothing; :func:`available` says so.
"""

from __future__ import annotations

import ctypes
import errno as _errno
import os
import platform
from dataclasses import dataclass

__all__ = [
    "CacheStat",
    "NR_CACHESTAT",
    "available",
    "cachestat",
    "is_clean",
]

# New system calls (>= 424) share one number on all architectures but alpha.
_SYSCALL_NUMBERS = {
    "x86_64": 451,
    "amd64": 451,
    "aarch64": 451,
    "arm64": 451,
    "armv7l": 451,
    "armv8l": 451,
    "i386": 451,
    "i686": 451,
    "riscv64": 451,
    "ppc64le": 451,
    "ppc64": 451,
    "s390x": 451,
    "loongarch64": 451,
    "alpha": 561,
}
NR_CACHESTAT: int | None = _SYSCALL_NUMBERS.get(platform.machine())

# f_type values of file systems whose page cache never reports dirty pages
# (tmpfs/ramfs pages are never "dirty"; proc/sys have no page cache).
_NO_DIRTY_FS = {
    0x01021994: "tmpfs",
    0x858458F6: "ramfs",
    0x00009FA0: "procfs",
    0x62656572: "sysfs",
}


class _Range(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _Stat(ctypes.Structure):
    _fields_ = [
        ("nr_cache", ctypes.c_uint64),
        ("nr_dirty", ctypes.c_uint64),
        ("nr_writeback", ctypes.c_uint64),
        ("nr_evicted", ctypes.c_uint64),
        ("nr_recently_evicted", ctypes.c_uint64),
    ]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


@dataclass(frozen=True)
class CacheStat:
    """Page counts of one file range, as reported by cachestat(2)."""

    nr_cache: int
    nr_dirty: int
    nr_writeback: int
    nr_evicted: int
    nr_recently_evicted: int

    @property
    def clean(self) -> bool:
        return self.nr_dirty == 0 and self.nr_writeback == 0


def cachestat(fd: int, offset: int = 0, length: int = 0) -> CacheStat:
    """Return the page-cache state of ``[offset, offset+length)`` of ``fd``.

    ``length == 0`` means to the end of the file.  Raises OSError (ENOSYS on
    kernels before 6.5 or an unknown architecture, EPERM without write
    access or ownership, EBADF, ...).
    """
    if NR_CACHESTAT is None:
        raise OSError(_errno.ENOSYS, f"cachestat: no syscall number known for {platform.machine()}")
    if offset < 0 or length < 0:
        raise ValueError("offset and length must be >= 0")
    rng = _Range(offset, length)
    out = _Stat()
    ret = _libc.syscall(
        ctypes.c_long(NR_CACHESTAT),
        ctypes.c_uint(fd),
        ctypes.byref(rng),
        ctypes.byref(out),
        ctypes.c_uint(0),
    )
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"cachestat(fd={fd}): {os.strerror(err)}")
    return CacheStat(
        out.nr_cache, out.nr_dirty, out.nr_writeback, out.nr_evicted, out.nr_recently_evicted
    )


def is_clean(fd: int) -> bool:
    """True when the whole page cache of ``fd`` has no dirty page and no page
    under writeback (``nr_dirty == 0 and nr_writeback == 0``).

    Raises OSError like :func:`cachestat`.  On tmpfs it is always True,
    which means nothing (see :func:`available`).
    """
    return cachestat(fd).clean


class _Statfs(ctypes.Structure):
    # struct statfs (glibc, 64-bit): only f_type is read; the buffer is
    # oversized so every ABI fits.
    _fields_ = [("f_type", ctypes.c_long), ("_rest", ctypes.c_byte * 256)]


def _fs_type(fd: int) -> int | None:
    buf = _Statfs()
    if _libc.fstatfs(ctypes.c_int(fd), ctypes.byref(buf)) != 0:
        return None
    return buf.f_type & 0xFFFFFFFF


def available(path_or_fd: str | os.PathLike | int) -> tuple[bool, str]:
    """Probe cachestat(2) for real on a file or directory (path or fd).

    Returns ``(True, "ok")`` or ``(False, reason)``; reasons name the
    missing piece: an old kernel (ENOSYS, before 6.5), missing permission,
    or a file system that keeps no dirty state (tmpfs, ramfs).
    """
    own = False
    if isinstance(path_or_fd, int):
        fd = path_or_fd
    else:
        try:
            fd = os.open(path_or_fd, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            return False, f"cannot open {os.fspath(path_or_fd)!r}: {e.strerror}"
        own = True
    try:
        try:
            cachestat(fd)
        except OSError as e:
            if e.errno == _errno.ENOSYS:
                return False, "kernel lacks cachestat(2) (needs Linux >= 6.5)"
            if e.errno == _errno.EPERM:
                return False, "cachestat(2) needs write access to or ownership of the file"
            if e.errno == _errno.EOPNOTSUPP:
                return False, "file system does not support cachestat(2) (hugetlbfs?)"
            return False, f"cachestat(2) failed: {e.strerror}"
        fs = _NO_DIRTY_FS.get(_fs_type(fd) or 0)
        if fs is not None:
            return False, f"{fs} keeps no dirty state: cachestat(2) always reports clean"
        return True, "ok"
    finally:
        if own:
            os.close(fd)
