"""FS_IOC_FIEMAP: a file's extent map (which os lacks), and the SEEK_DATA/SEEK_HOLE map.

Used to check that a layout seal (host/control/) keeps the map still; an
ioctl on a buffer, so fcntl.ioctl is enough (no ctypes).
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct

__all__ = ["Extent", "extents", "data_segments"]

FS_IOC_FIEMAP = 0xC020660B
FIEMAP_FLAG_SYNC = 0x1
FIEMAP_EXTENT_LAST = 0x1
_HEADER = struct.Struct("=QQIIII")  # fm_start, fm_length, fm_flags, fm_mapped_extents, fm_extent_count, reserved
_EXTENT = struct.Struct("=QQQQQIIII")  # logical, physical, length, 2 reserved, flags, 3 reserved

Extent = tuple  # (logical, physical, length, flags)


def extents(fd: int, *, sync: bool = False, max_extents: int = 4096) -> list[Extent]:
    """Every extent of open file `fd`: (logical, physical, length, flags), as
    FIEMAP reports them (with `sync`, the file is written back first, as
    FIEMAP_FLAG_SYNC does).  Raises OSError (EOPNOTSUPP where the file
    system has no FIEMAP)."""
    out: list[Extent] = []
    start = 0
    while True:
        buf = bytearray(_HEADER.size + max_extents * _EXTENT.size)
        _HEADER.pack_into(buf, 0, start, 0xFFFFFFFFFFFFFFFF - start,
                          FIEMAP_FLAG_SYNC if sync else 0, 0, max_extents, 0)
        fcntl.ioctl(fd, FS_IOC_FIEMAP, buf)
        mapped = _HEADER.unpack_from(buf, 0)[3]
        last = False
        for k in range(mapped):
            logical, physical, length, _r1, _r2, flags, *_ = _EXTENT.unpack_from(
                buf, _HEADER.size + k * _EXTENT.size)
            out.append((logical, physical, length, flags))
            last = bool(flags & FIEMAP_EXTENT_LAST)
            start = logical + length
        if last or mapped < max_extents:
            return out


def data_segments(fd: int) -> list[tuple[int, int]]:
    """The file's data as SEEK_DATA/SEEK_HOLE see it: [(start, end), ...]."""
    size = os.fstat(fd).st_size
    out, pos = [], 0
    while pos < size:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                break
            raise
        hole = os.lseek(fd, data, os.SEEK_HOLE)
        out.append((data, hole))
        pos = hole
    return out
