"""`ExportFS`'s extended attributes: SETXATTR, GETXATTR, LISTXATTR, REMOVEXATTR.

Through the O_PATH fd's magic link, which reaches the inode itself.  A
symlink's own attributes are not reachable that way without following it,
so a symlink has none here: set/remove give ``EPERM`` (what Linux gives for
``user.*`` on a symlink), get gives ``ENODATA``, list gives none.
"""

from __future__ import annotations

import errno
import os
import stat as _stat

from host.exportfs.confined import check_int, err, proc_path

XATTR_NAME_MAX = 255
XATTR_SIZE_MAX = 65536
XATTR_CREATE = 1
XATTR_REPLACE = 2


def _check_xattr_name(name: object) -> bytes:
    if not isinstance(name, (bytes, bytearray)) or not name or b"\0" in name:
        raise err(errno.EINVAL, "an attribute name is non-empty bytes without NUL")
    if len(name) > XATTR_NAME_MAX:
        raise err(errno.ERANGE, "attribute name too long")
    return bytes(name)


class XattrOps:
    """A part of `ExportFS` (it uses its inode store, `_store`)."""

    def _xattr_path(self, owner: int, nodeid: int) -> str | None:
        """The magic link of ``nodeid``, or None for a symlink."""
        opath = self._store.fd_of(owner, nodeid)
        if _stat.S_ISLNK(os.stat(opath).st_mode):
            return None
        return proc_path(opath)

    def setxattr(self, owner: int, nodeid: int, name: bytes, value: bytes, flags: int) -> None:
        """Raises OSError: ``EINVAL``, ``ERANGE``, ``E2BIG``, ``EEXIST``
        (XATTR_CREATE), ``ENODATA`` (XATTR_REPLACE), ``EPERM``, ``ENOTSUP``..."""
        name = _check_xattr_name(name)
        check_int(flags, "flags", 0, XATTR_CREATE | XATTR_REPLACE)
        if len(value) > XATTR_SIZE_MAX:
            raise err(errno.E2BIG)
        path = self._xattr_path(owner, nodeid)
        if path is None:
            raise err(errno.EPERM, "no extended attributes on a symlink here")
        os.setxattr(path, name, bytes(value), flags)

    def getxattr(self, owner: int, nodeid: int, name: bytes) -> bytes:
        """The whole value.  Raises OSError: ``ENODATA``, ``EINVAL``, ``ENOTSUP``..."""
        name = _check_xattr_name(name)
        path = self._xattr_path(owner, nodeid)
        if path is None:
            raise err(errno.ENODATA)
        return os.getxattr(path, name)

    def listxattr(self, owner: int, nodeid: int) -> bytes:
        """Every name, each followed by a NUL (as listxattr(2) gives them)."""
        path = self._xattr_path(owner, nodeid)
        if path is None:
            return b""
        return b"".join(os.fsencode(n) + b"\0" for n in os.listxattr(path))

    def removexattr(self, owner: int, nodeid: int, name: bytes) -> None:
        """Raises OSError: ``ENODATA``, ``EPERM``, ``ENOTSUP``..."""
        name = _check_xattr_name(name)
        path = self._xattr_path(owner, nodeid)
        if path is None:
            raise err(errno.EPERM, "no extended attributes on a symlink here")
        os.removexattr(path, name)
