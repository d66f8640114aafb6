"""`ExportFS`'s locks: POSIX record locks (GETLK, SETLK, SETLKW) and flock(2),
taken on the host so that every guest and every host-local process sees them.

Each lock owner of a guest (the kernel's lock owner id: a process's files for
POSIX locks, an open file for flock) gets its own open file description of
the inode, opened with its handle's access mode, and its locks are Linux's
open-file-description locks (F_OFD_SETLK) or flock(2) on it.  So owners
conflict with each other exactly as processes do, whichever guest they are
in, and with host-local POSIX locks (OFD and POSIX locks conflict).  An
owner's POSIX locks go when it closes any descriptor of the file (FLUSH with
its lock owner), a flock with its open file (RELEASE), and all of a guest's
with its session: its handles are closed, and so are these descriptors.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct

from host.exportfs.confined import check_int, err, proc_path

F_RDLCK, F_WRLCK, F_UNLCK = 0, 1, 2
OFFSET_MAX = 2**63 - 1
# struct flock on x86_64/aarch64: short l_type, short l_whence, off_t l_start, off_t l_len,
# pid_t l_pid (and padding to 32 bytes)
_FLOCK = struct.Struct("hhqqi4x")
_F_OFD_GETLK, _F_OFD_SETLK = fcntl.F_OFD_GETLK, fcntl.F_OFD_SETLK


def _range(start: int, end: int) -> tuple[int, int]:
    """FUSE's inclusive [start, end] as struct flock's (start, len); len 0: to the end."""
    check_int(start, "start", 0, OFFSET_MAX)
    check_int(end, "end", 0, OFFSET_MAX)
    if end < start:
        raise err(errno.EINVAL, "lock ends before it starts")
    return start, 0 if end == OFFSET_MAX else end - start + 1


class LockOps:
    """A part of `ExportFS` (its handles, `_handle`; `_lock_fds` set up in its init)."""

    def _lock_fd(self, owner: int, fh: int, lock_owner: int) -> int:
        handle = self._handle(owner, fh)
        fds = self._lock_fds.setdefault(fh, {})
        fd = fds.get(lock_owner)
        if fd is None:
            access = fcntl.fcntl(handle.fd, fcntl.F_GETFL) & os.O_ACCMODE
            # The handle's own open file, reopened: the same inode, the same mode.
            fd = fds[lock_owner] = os.open(proc_path(handle.fd), access | os.O_CLOEXEC)
        return fd

    def getlk(self, owner: int, fh: int, lock_owner: int, start: int, end: int,
              type_: int) -> tuple[int, int, int, int]:
        """The first lock of another owner that conflicts with this one:
        (start, end, type, pid), type F_UNLCK if none.

        Raises:
          OSError: ``EBADF``, ``EINVAL``.
        """
        if type_ not in (F_RDLCK, F_WRLCK):
            raise err(errno.EINVAL, "GETLK asks about a read or write lock")
        begin, length = _range(start, end)
        fd = self._lock_fd(owner, fh, lock_owner)
        got = _FLOCK.unpack(fcntl.fcntl(fd, _F_OFD_GETLK,
                                        _FLOCK.pack(type_, os.SEEK_SET, begin, length, 0)))
        kind, _, lstart, llen, pid = got
        if kind == F_UNLCK:
            return 0, 0, F_UNLCK, 0
        return lstart, OFFSET_MAX if llen == 0 else lstart + llen - 1, kind, max(pid, 0)

    def setlk(self, owner: int, fh: int, lock_owner: int, start: int, end: int, type_: int,
              flock: bool) -> None:
        """Take (F_RDLCK, F_WRLCK) or drop (F_UNLCK) a lock without waiting.

        Raises:
          OSError: ``EAGAIN`` (another owner's lock conflicts), ``EBADF`` (a
            write lock on a handle not open for writing), ``EINVAL``,
            ``ENOLCK``.
        """
        if type_ not in (F_RDLCK, F_WRLCK, F_UNLCK):
            raise err(errno.EINVAL, "bad lock type")
        fd = self._lock_fd(owner, fh, lock_owner)
        try:
            if flock:
                op = {F_RDLCK: fcntl.LOCK_SH, F_WRLCK: fcntl.LOCK_EX, F_UNLCK: fcntl.LOCK_UN}
                fcntl.flock(fd, op[type_] | fcntl.LOCK_NB)
            else:
                begin, length = _range(start, end)
                fcntl.fcntl(fd, _F_OFD_SETLK, _FLOCK.pack(type_, os.SEEK_SET, begin, length, 0))
        except OSError as exc:
            if exc.errno in (errno.EACCES, errno.EWOULDBLOCK):
                raise err(errno.EAGAIN, "another owner holds a conflicting lock") from None
            raise

    def release_locks(self, owner: int, fh: int, lock_owner: int) -> None:
        """Drop every lock `lock_owner` holds through any of `owner`'s handles of
        the inode `fh` is on (what closing one descriptor of a file does to a
        process's POSIX locks)."""
        nodeid = self._handle(owner, fh).nodeid
        for other in list(self._lock_fds):
            handle = self._handles.get(other)
            if handle is not None and handle.owner == owner and handle.nodeid == nodeid:
                fd = self._lock_fds[other].pop(lock_owner, None)
                if fd is not None:
                    os.close(fd)

    def _drop_locks(self, fh: int) -> None:
        """The handle `fh` is going: close its owners' descriptors (and locks)."""
        for fd in self._lock_fds.pop(fh, {}).values():
            os.close(fd)
