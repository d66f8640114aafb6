"""`ExportFS`'s space and extents: FALLOCATE (every mode the host file system
has, punch hole and zero range included), LSEEK (SEEK_DATA, SEEK_HOLE) and
COPY_FILE_RANGE, all on handles of one owner."""

from __future__ import annotations

import errno
import os

from host.exportfs.confined import OFF_MAX, check_int, err
from host.linux.fallocate import KNOWN_MODES, fallocate

SEEK_DATA = 3
SEEK_HOLE = 4


class ExtentOps:
    """A part of `ExportFS` (it uses its handles, `_handle`)."""

    def fallocate(self, owner: int, fh: int, offset: int, length: int, mode: int) -> None:
        """fallocate(2) on handle ``fh`` (open for writing).

        Raises:
          OSError: ``EBADF``, ``EINVAL`` (bad range or mode), ``EOPNOTSUPP``
            (a mode the host file system lacks), ``ENOSPC``, ``EFBIG``...
        """
        handle = self._handle(owner, fh)
        check_int(offset, "offset", 0, OFF_MAX)
        check_int(length, "length", 1, OFF_MAX)
        check_int(mode, "mode", 0, KNOWN_MODES)
        fallocate(handle.fd, mode, offset, length)

    def lseek(self, owner: int, fh: int, offset: int, whence: int) -> int:
        """The next data (SEEK_DATA) or hole (SEEK_HOLE) at or after ``offset``.

        Raises:
          OSError: ``EBADF``, ``EINVAL`` (another whence), ``ENXIO`` (past
            the end, or no data after ``offset``).
        """
        handle = self._handle(owner, fh)
        check_int(offset, "offset", 0, OFF_MAX)
        if whence not in (SEEK_DATA, SEEK_HOLE):
            raise err(errno.EINVAL, "LSEEK answers SEEK_DATA and SEEK_HOLE")
        # A duplicate shares the file offset; nothing here reads at the offset.
        return os.lseek(handle.fd, offset, whence)

    def copy_file_range(self, owner: int, fh_in: int, off_in: int, fh_out: int, off_out: int,
                        length: int, flags: int, max_length: int) -> int:
        """Copy up to ``length`` bytes (at most ``max_length`` in one call) from
        handle ``fh_in`` at ``off_in`` to ``fh_out`` at ``off_out``; returns
        how many were copied.

        Raises:
          OSError: ``EBADF``, ``EINVAL`` (flags, overlapping range of one
            file), ``EXDEV``, ``EFBIG``, ``ENOSPC``...
        """
        src, dst = self._handle(owner, fh_in), self._handle(owner, fh_out)
        check_int(off_in, "off_in", 0, OFF_MAX)
        check_int(off_out, "off_out", 0, OFF_MAX)
        check_int(length, "len", 0, 2**64 - 1)
        if flags != 0:
            raise err(errno.EINVAL, "copy_file_range flags must be 0")
        return os.copy_file_range(src.fd, dst.fd, min(length, max_length), off_in, off_out)

