"""The *at() calls os lacks in the form the daemon needs: fchownat(fd, "",
AT_EMPTY_PATH) on an O_PATH fd (a symlink included: its own owner, never its
target's), and utimensat with UTIME_NOW / UTIME_OMIT (so that "set to now"
keeps its own permission rule: the owner, or anyone who may write)."""

from __future__ import annotations

import ctypes
import os

__all__ = ["UTIME_NOW", "UTIME_OMIT", "chown_fd", "set_times"]

AT_FDCWD = -100
AT_EMPTY_PATH = 0x1000
UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2

_libc = ctypes.CDLL(None, use_errno=True)
_fchownat = _libc.fchownat
_fchownat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32, ctypes.c_uint32,
                      ctypes.c_int]
_fchownat.restype = ctypes.c_int


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_int64), ("tv_nsec", ctypes.c_long)]


_utimensat = _libc.utimensat
_utimensat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.POINTER(_Timespec), ctypes.c_int]
_utimensat.restype = ctypes.c_int


def _check(result: int) -> None:
    if result != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def chown_fd(fd: int, uid: int, gid: int) -> None:
    """Change the owner (uid, or -1 to keep) and group (gid, or -1) of the inode
    an O_PATH fd holds.  Raises OSError (EPERM...)."""
    _check(_fchownat(fd, b"", uid & 0xFFFFFFFF, gid & 0xFFFFFFFF, AT_EMPTY_PATH))


def set_times(path: str, atime_ns: int, mtime_ns: int) -> None:
    """utimensat(AT_FDCWD, path, ...); each time is ns since the epoch, or
    UTIME_NOW / UTIME_OMIT.  Raises OSError (EPERM, EACCES...)."""
    def spec(t: int) -> _Timespec:
        if t in (UTIME_NOW, UTIME_OMIT):
            return _Timespec(0, t)
        return _Timespec(t // 1_000_000_000, t % 1_000_000_000)
    times = (_Timespec * 2)(spec(atime_ns), spec(mtime_ns))
    _check(_utimensat(AT_FDCWD, os.fsencode(path), times, 0))
