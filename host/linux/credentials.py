"""Per-thread file-system credentials: carry out a request as its caller.

The daemon runs as root; a guest's request carries its caller's uid, gid and
supplementary groups.  `acting_as(caller)` switches the *calling thread's*
file-system uid and gid (setfsuid(2), setfsgid(2)) and its supplementary
groups (setgroups(2)) for the duration of a `with` block, and switches back
to the daemon's own on every exit.  The kernel then checks permissions, picks
owners of new files, and clears setuid/setgid bits (a write or a chown by a
caller without CAP_FSETID) exactly as it would for the caller itself: a
change of the fsuid away from 0 drops the file-system capabilities
(CAP_CHOWN, CAP_DAC_OVERRIDE, CAP_FOWNER, CAP_FSETID, ...) from the thread's
effective set, and a change back to 0 restores them (capabilities(7), "Effect
of user ID changes on capabilities").

The calls are raw syscalls, not glibc's wrappers: glibc's setgroups() changes
every thread of the process (its setxid broadcast), and so would switch the
event loop's thread and every worker at once.  A raw syscall changes only the
calling thread.  This is how virtiofsd carries out requests too.

The seam for blocking calls: what runs on a worker thread runs there as the
caller with `caller.run(fn, *args)` (for `asyncio.to_thread(caller.run, fn)`),
never by switching the event loop's thread across an await (another
request's step would run with these credentials).

Only a daemon running as root can switch (`can_switch()`); otherwise every
Caller is the daemon's own and `acting_as` does nothing (the daemon's own
checks then apply, as before).
"""

from __future__ import annotations

import ctypes
import os
import platform
from contextlib import contextmanager
from dataclasses import dataclass

__all__ = ["Caller", "DAEMON", "acting_as", "can_switch"]

# Syscall numbers (asm/unistd_64.h, asm-generic/unistd.h): the 32-bit-id forms.
_SYSCALLS = {
    "x86_64": {"setfsuid": 122, "setfsgid": 123, "setgroups": 116},
    "aarch64": {"setfsuid": 151, "setfsgid": 152, "setgroups": 159},
}
_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_NR = _SYSCALLS.get(platform.machine())
MAX_GROUPS = 65536  # NGROUPS_MAX


@dataclass(frozen=True)
class Caller:
    """Who a request runs as: fsuid, fsgid and supplementary groups."""

    uid: int
    gid: int
    groups: tuple[int, ...] = ()

    def run(self, fn, *args):
        """fn(*args) on this thread, as this caller (for a worker thread)."""
        with acting_as(self):
            return fn(*args)


DAEMON = Caller(os.geteuid(), os.getegid(), tuple(os.getgroups()))


def can_switch() -> bool:
    """True if this process may switch to any caller (root, a known architecture)."""
    return _NR is not None and os.geteuid() == 0


def _syscall(name: str, *args) -> int:
    result = _libc.syscall(_NR[name], *args)
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{name}: {os.strerror(err)}")
    return result


def _set_groups(groups: tuple[int, ...]) -> None:
    array = (ctypes.c_uint32 * max(1, len(groups)))(*groups)
    _syscall("setgroups", ctypes.c_size_t(len(groups)), array)


def _set_ids(uid: int, gid: int) -> None:
    # setfsuid/setfsgid return the previous id and cannot report an error:
    # asking again with an invalid id (-1) returns the current one, to check.
    _libc.syscall(_NR["setfsgid"], ctypes.c_uint32(gid))
    _libc.syscall(_NR["setfsuid"], ctypes.c_uint32(uid))
    if (_libc.syscall(_NR["setfsuid"], ctypes.c_int32(-1)) & 0xFFFFFFFF != uid
            or _libc.syscall(_NR["setfsgid"], ctypes.c_int32(-1)) & 0xFFFFFFFF != gid):
        raise OSError(1, f"cannot act as uid {uid} gid {gid}")


@contextmanager
def acting_as(caller: Caller | None):
    """`with acting_as(caller):` file-system calls of this thread run as `caller`.

    Switches back to the daemon's credentials on every exit.  Raises OSError
    (EINVAL, EPERM) if the switch fails; nothing runs as anyone else then.
    With `caller` None or the daemon itself, or a process that cannot switch,
    does nothing."""
    if caller is None or caller == DAEMON or not can_switch():
        yield
        return
    if len(caller.groups) > MAX_GROUPS:
        raise OSError(22, "too many supplementary groups")
    try:
        _set_groups(caller.groups)
        _set_ids(caller.uid, caller.gid)
    except BaseException:
        _restore()
        raise
    try:
        yield
    finally:
        _restore()


def _restore() -> None:
    _set_ids(DAEMON.uid, DAEMON.gid)
    _set_groups(DAEMON.groups)
