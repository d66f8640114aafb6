"""`ExportFS`'s links and special files: SYMLINK, READLINK, LINK, MKNOD, STATFS and
the directory sync of FSYNCDIR.

Confined like the rest (host/backend.py, invariant 1): a symlink's target is
data, stored and returned, never resolved by the daemon; a hard link is made
through the O_PATH fd's magic link (linkat with AT_SYMLINK_FOLLOW, as
virtiofsd does), which reaches exactly the inode the guest named and, for a
symlink, links the symlink itself; a special file is made, never opened.
"""

from __future__ import annotations

import errno
import os
import stat as _stat
from collections.abc import Callable

from host.exportfs.confined import OPATH, check_int, check_name, err, proc_path

PATH_MAX = 4096
# What MKNOD may make: FIFOs, sockets and empty regular files always; device
# nodes when the host kernel lets the caller (CAP_MKNOD, a mount without nodev).
# The daemon never opens any of them for data (host/backend.py).
MKNOD_TYPES = (_stat.S_IFIFO, _stat.S_IFSOCK, _stat.S_IFREG, _stat.S_IFCHR, _stat.S_IFBLK)


class LinkOps:
    """A part of `ExportFS` (it uses its inode store, `_store`)."""

    def symlink(self, owner: int, parent: int, name: bytes,
                target: bytes) -> tuple[int, os.stat_result]:
        """Make ``name`` in ``parent`` a symlink holding ``target``; count one lookup.

        Raises:
          OSError: ``EINVAL``/``ENAMETOOLONG`` (bad name), ``ENOENT`` (empty
            target), ``ENAMETOOLONG`` (target over PATH_MAX), ``EEXIST``,
            ``ESTALE``, ``EACCES``...
        """
        name = check_name(name)
        if not isinstance(target, (bytes, bytearray)) or b"\0" in target:
            raise err(errno.EINVAL, "target must be bytes without NUL")
        if not target:
            raise err(errno.ENOENT, "empty symlink target")
        if len(target) >= PATH_MAX:
            raise err(errno.ENAMETOOLONG)
        parent_fd = self._store.fd_of(owner, parent)
        os.symlink(bytes(target), name, dir_fd=parent_fd)
        return self._adopt_new(owner, parent_fd, name, _stat.S_IFLNK)

    def readlink(self, owner: int, nodeid: int) -> bytes:
        """The target of symlink ``nodeid``, as it was stored.

        Raises:
          OSError: ``EINVAL`` (not a symlink), ``ESTALE``.
        """
        opath = self._store.fd_of(owner, nodeid)
        # readlinkat(fd, "") reads the symlink an O_PATH fd holds (open(2), O_PATH).
        return os.readlink(b"", dir_fd=opath)

    def link(self, owner: int, nodeid: int, newparent: int,
             newname: bytes) -> tuple[int, os.stat_result]:
        """Give inode ``nodeid`` the name ``newname`` in ``newparent``; count one lookup.

        Raises:
          OSError: ``EINVAL``/``ENAMETOOLONG``, ``ESTALE``, ``EPERM`` (a
            directory), ``EEXIST``, ``EMLINK``, ``EXDEV``, ``EACCES``...
        """
        newname = check_name(newname)
        opath = self._store.fd_of(owner, nodeid)
        if _stat.S_ISDIR(os.stat(opath).st_mode):
            raise err(errno.EPERM, "cannot link a directory")
        new_fd = self._store.fd_of(owner, newparent)
        os.link(proc_path(opath), newname, dst_dir_fd=new_fd, follow_symlinks=True)
        fd = os.open(newname, OPATH, dir_fd=new_fd)
        return self._store.adopt(owner, fd)

    def mknod(self, owner: int, parent: int, name: bytes, mode: int,
              rdev: int = 0) -> tuple[int, os.stat_result]:
        """Make special file ``name`` (``mode`` carries its type) in ``parent``.

        Raises:
          OSError: ``EINVAL`` (bad name, mode, or a type MKNOD does not make),
            ``EEXIST``, ``EPERM`` (a device node the host does not allow),
            ``ESTALE``, ``EACCES``...
        """
        name = check_name(name)
        check_int(mode, "mode", 0, 0o177777)
        check_int(rdev, "rdev", 0, 2**32 - 1)
        kind = _stat.S_IFMT(mode)
        if kind not in MKNOD_TYPES:
            raise err(errno.EINVAL, "MKNOD makes FIFOs, sockets, regular files and devices")
        parent_fd = self._store.fd_of(owner, parent)
        os.mknod(name, mode, rdev if kind in (_stat.S_IFCHR, _stat.S_IFBLK) else 0,
                 dir_fd=parent_fd)
        return self._adopt_new(owner, parent_fd, name, kind)

    def statfs(self, owner: int, nodeid: int) -> os.statvfs_result:
        """statvfs(2) of the file system ``nodeid`` is on.

        Raises:
          OSError: ``ESTALE``...
        """
        return os.statvfs(self._store.fd_of(owner, nodeid))

    def fsyncdir(self, owner: int, nodeid: int, datasync: bool) -> Callable[[], None]:
        """A call that fsyncs directory ``nodeid``, to be run in a worker thread (it
        owns a directory fd opened now).

        Raises:
          OSError: ``ESTALE``, ``ENOTDIR`` now; ``EIO``... from the call.
        """
        opath = self._store.fd_of(owner, nodeid)
        fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=opath)

        def sync() -> None:
            try:
                (os.fdatasync if datasync else os.fsync)(fd)
            finally:
                os.close(fd)
        return sync

    def _adopt_new(self, owner: int, parent_fd: int, name: bytes,
                   kind: int) -> tuple[int, os.stat_result]:
        """Adopt what was just made at ``name``; if something else was renamed over
        it in between (another type), refuse (EEXIST) rather than hand it out."""
        fd = os.open(name, OPATH, dir_fd=parent_fd)
        try:
            if _stat.S_IFMT(os.stat(fd).st_mode) != kind:
                raise err(errno.EEXIST, "the new name was replaced before it was adopted")
        except BaseException:
            os.close(fd)
            raise
        return self._store.adopt(owner, fd)
