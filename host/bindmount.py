"""Private bind mounts through ctypes mount(2)/umount2(2).

Why: the daemon puts its fanotify pre-content mark on a MOUNT, never on a
whole file system the machine runs on.  It bind-mounts the export over
itself (``mount --bind E E`` then ``mount --make-private E``) and marks that
mount only.  Every path-based open of ``E/...`` made after the bind goes
through the new mount (it is on top), so host-local writers are seen; the
daemon's own I/O can go around it through a directory fd opened *before*
the bind (see docs/kernel.md, "which path is seen").

Propagation: the bind is made private right after it is created.  If the
parent mount is shared (systemd makes ``/`` shared), the bind has already
propagated copies to the peers by then; those copies are not marked and
are not removed by :func:`unmount`.  Run the daemon in its own mount
namespace (``unshare -m --propagation private``) on such hosts.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno as _errno
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Iterator

__all__ = [
    "MountInfo",
    "available",
    "bind",
    "bind_over_itself",
    "find_mount",
    "mount_id_of_fd",
    "mountinfo",
    "private_bind",
    "unmount",
]

MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
MNT_DETACH = 0x2
UMOUNT_NOFOLLOW = 0x8

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]
_libc.mount.restype = ctypes.c_int
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.umount2.restype = ctypes.c_int


def _mount(source: str | None, target: str, fstype: str | None, flags: int) -> None:
    ret = _libc.mount(
        os.fsencode(source) if source is not None else None,
        os.fsencode(target),
        os.fsencode(fstype) if fstype is not None else None,
        flags,
        None,
    )
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount({source!r}, {target!r}, flags={flags:#x}): {os.strerror(err)}", target)


def _umount(target: str, flags: int) -> None:
    if _libc.umount2(os.fsencode(target), flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"umount2({target!r}): {os.strerror(err)}", target)


def bind(source: str | os.PathLike, target: str | os.PathLike) -> str:
    """Bind-mount directory ``source`` at directory ``target`` (non-recursive),
    then make the new mount MS_PRIVATE.  Returns the real path of ``target``.

    On failure to make it private the bind is undone and OSError raised.
    """
    src = os.path.realpath(source)
    dst = os.path.realpath(target)
    for p in (src, dst):
        if not os.path.isdir(p):
            raise NotADirectoryError(_errno.ENOTDIR, "bind mounts here are for directories", p)
    if dst == "/":
        raise ValueError("refusing to mount over /")
    _mount(src, dst, None, MS_BIND)
    try:
        _mount(None, dst, None, MS_PRIVATE)
    except BaseException:
        _umount(dst, MNT_DETACH | UMOUNT_NOFOLLOW)
        raise
    return dst


def bind_over_itself(path: str | os.PathLike) -> str:
    """``mount --bind path path`` + ``mount --make-private path``.

    Returns the real path (the new mount point).  Needs CAP_SYS_ADMIN.
    """
    return bind(path, path)


def unmount(path: str | os.PathLike) -> None:
    """Detach the mount on top of ``path`` (umount2 MNT_DETACH|UMOUNT_NOFOLLOW).

    Lazy: processes still using files below it keep them; new lookups see
    the mount below.  Raises OSError (EINVAL when ``path`` is not a mount
    point).
    """
    _umount(os.path.realpath(path), MNT_DETACH | UMOUNT_NOFOLLOW)


@contextlib.contextmanager
def private_bind(path: str | os.PathLike, target: str | os.PathLike | None = None) -> Iterator[str]:
    """Context manager: private bind of ``path`` over itself (or at
    ``target``); always unmounted on exit.  Yields the mount point."""
    mnt = bind(path, path if target is None else target)
    try:
        yield mnt
    finally:
        unmount(mnt)


# --------------------------------------------------------------- mountinfo


@dataclass(frozen=True)
class MountInfo:
    """One line of /proc/self/mountinfo."""

    mount_id: int
    parent_id: int
    dev: str  # "major:minor"
    root: str  # path of the mount's root inside its file system
    mount_point: str
    options: str
    optional: tuple[str, ...]  # e.g. ("shared:1",), () when private
    fstype: str
    source: str
    super_options: str

    @property
    def shared(self) -> bool:
        return any(f.startswith("shared:") for f in self.optional)


def _unescape(s: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo
    out = []
    i = 0
    while i < len(s):
        if s[i] == "\\" and i + 3 < len(s) and s[i + 1 : i + 4].isdigit():
            out.append(chr(int(s[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(s[i])
            i += 1
    return "".join(out)


def mountinfo(pid: int | str = "self") -> list[MountInfo]:
    """Parse /proc/<pid>/mountinfo (mount order: later lines are on top)."""
    res = []
    with open(f"/proc/{pid}/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            left, _, right = line.rstrip("\n").partition(" - ")
            a = left.split(" ")
            b = right.split(" ")
            res.append(
                MountInfo(
                    mount_id=int(a[0]),
                    parent_id=int(a[1]),
                    dev=a[2],
                    root=_unescape(a[3]),
                    mount_point=_unescape(a[4]),
                    options=a[5],
                    optional=tuple(x for x in a[6:] if x),
                    fstype=b[0],
                    source=_unescape(b[1]) if len(b) > 1 else "",
                    super_options=b[2] if len(b) > 2 else "",
                )
            )
    return res


def mount_id_of_fd(fd: int) -> int:
    """The mount id (as in mountinfo) of the mount an open fd was opened
    through, from /proc/self/fdinfo/<fd>."""
    with open(f"/proc/self/fdinfo/{fd}", encoding="ascii") as f:
        for line in f:
            if line.startswith("mnt_id:"):
                return int(line.split()[1])
    raise OSError(_errno.ENOENT, f"no mnt_id in /proc/self/fdinfo/{fd}")


def find_mount(path: str | os.PathLike) -> MountInfo:
    """The mount that ``path`` resolves into (the topmost one)."""
    fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    try:
        mid = mount_id_of_fd(fd)
    finally:
        os.close(fd)
    for m in mountinfo():
        if m.mount_id == mid:
            return m
    raise OSError(_errno.ENOENT, f"mount id {mid} not in /proc/self/mountinfo", os.fspath(path))


# --------------------------------------------------------------- probe


def available(dir: str | os.PathLike | None = None) -> tuple[bool, str]:
    """Probe for real: bind a fresh temporary directory over itself, make it
    private and unmount it.  ``dir`` is where the temporary directory is
    made (default: tempfile's default).  Returns (ok, reason)."""
    try:
        tmp = tempfile.mkdtemp(prefix="cleanlease-bindprobe-", dir=dir)
    except OSError as e:
        return False, f"cannot create a probe directory: {e.strerror}"
    try:
        try:
            bind_over_itself(tmp)
        except OSError as e:
            if e.errno == _errno.EPERM:
                return False, "needs CAP_SYS_ADMIN (mount(2) returned EPERM)"
            return False, f"bind mount failed: {e.strerror}"
        try:
            unmount(tmp)
        except OSError as e:
            return False, f"umount2 failed: {e.strerror}"
        return True, "ok"
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
