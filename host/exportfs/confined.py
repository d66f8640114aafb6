"""What confines every operation to the export: one-component names, checked
integers, and data opened only through the O_PATH fd the inode store holds
(see host/backend.py, invariants 1 and 3).  Shared by `ExportFS` and its parts
in this package."""

from __future__ import annotations

import ctypes
import errno
import os
import stat as _stat

NAME_MAX = 255
OPATH = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
OFF_MAX = 2**63 - 1
# What a guest may ask of an open file beyond its access mode.  O_CREAT and
# O_EXCL belong to create(); O_NOFOLLOW, O_PATH, O_DIRECTORY, O_TMPFILE are for
# the daemon to decide; O_DIRECT would make every unaligned pread fail.
PASSED_FLAGS = os.O_APPEND | os.O_TRUNC | os.O_SYNC | os.O_DSYNC


def err(code: int, detail: str | None = None) -> OSError:
    return OSError(code, detail or os.strerror(code))


def check_int(value: object, what: str, lo: int, hi: int) -> int:
    # bool is an int subclass; a guest-decoded field is never a bool, so a
    # bool here is a caller bug worth refusing.
    if type(value) is not int or not lo <= value <= hi:
        raise err(errno.EINVAL, f"{what} must be an int in [{lo}, {hi}]")
    return value


def check_name(name: object) -> bytes:
    """One path component, or ``OSError`` (``EINVAL`` / ``ENAMETOOLONG``)."""
    if not isinstance(name, (bytes, bytearray)):
        raise err(errno.EINVAL, "name must be bytes")
    name = bytes(name)
    if not name or b"/" in name or b"\0" in name or name in (b".", b".."):
        raise err(errno.EINVAL, f"invalid name {name!r}")
    if len(name) > NAME_MAX:
        raise err(errno.ENAMETOOLONG)
    return name


def open_flags(flags: object) -> int:
    flags = check_int(flags, "flags", 0, 2**32 - 1)
    access = flags & os.O_ACCMODE
    if access not in (os.O_RDONLY, os.O_WRONLY, os.O_RDWR):
        raise err(errno.EINVAL, "bad access mode")
    return access | (flags & PASSED_FLAGS)


def require_regular(st: os.stat_result) -> None:
    if _stat.S_ISREG(st.st_mode):
        return
    if _stat.S_ISDIR(st.st_mode):
        raise err(errno.EISDIR)
    if _stat.S_ISLNK(st.st_mode):
        raise err(errno.ELOOP)
    raise err(errno.EINVAL, "not a regular file")


def proc_path(fd: int) -> str:
    return f"/proc/self/fd/{fd}"


def reopen(opath_fd: int, flags: int) -> int:
    """Open the regular file ``opath_fd`` holds, for data, with ``flags``.

    Raises:
      OSError: ``EISDIR``, ``ELOOP`` (symlink) or ``EINVAL`` (anything else
        that is not a regular file) before anything is opened; else whatever
        ``open(2)`` says (``EACCES``, ``ETXTBSY``...).
    """
    require_regular(os.stat(opath_fd))
    # No O_NOFOLLOW: it would apply to the /proc magic link itself and fail
    # with ELOOP every time.  The magic link resolves to exactly the inode the
    # O_PATH fd holds and is not followed further: on a symlink's O_PATH fd
    # the kernel answers ELOOP, never the target (tests check this).
    return os.open(proc_path(opath_fd), flags | os.O_CLOEXEC)


_renameat2_fn = None


def renameat2(olddirfd: int, oldname: bytes, newdirfd: int, newname: bytes, flags: int) -> None:
    # os has no renameat2; glibc has had it since 2.28.
    global _renameat2_fn
    if _renameat2_fn is None:
        fn = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
        if fn is None:
            raise err(errno.ENOSYS, "renameat2 not available")
        fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        fn.restype = ctypes.c_int
        _renameat2_fn = fn
    if _renameat2_fn(olddirfd, oldname, newdirfd, newname, flags) != 0:
        raise err(ctypes.get_errno())
