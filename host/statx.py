"""statx(2) through ctypes, for the one field os.stat lacks: an inode's birth time.

An inode number alone does not name a file for long: ext4 hands a freed number
to the next file created, at once.  The daemon tells guests which inode a name
leads to with (inode number, generation), FUSE's own pair (`fuse_entry_out`):
the generation it sends is the birth time, which a new inode never shares
with the one that had its number before (docs/design.md, "At most once").

Facts relied on (Linux 6.18, ext4): glibc (2.28+) has the `statx` wrapper;
`AT_EMPTY_PATH` with an empty path works on an O_PATH fd; ext4, xfs and btrfs
report `STATX_BTIME`; tmpfs does not (then the generation is 0, and the
guest's check falls back to the inode number).
"""

from __future__ import annotations

import ctypes
import os

__all__ = ["birth_time_ns"]

_AT_EMPTY_PATH = 0x1000
_STATX_BTIME = 0x800
_MASK_AT, _BTIME_AT = 0, 80  # offsets in struct statx: stx_mask, stx_btime {s64 sec, u32 nsec}
_STATX_SIZE = 256

_libc = ctypes.CDLL(None, use_errno=True)
_statx = getattr(_libc, "statx", None)
if _statx is not None:
    _statx.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_uint,
                       ctypes.c_void_p)
    _statx.restype = ctypes.c_int


def birth_time_ns(fd: int) -> int:
    """The birth time of the inode `fd` refers to (an O_PATH fd will do), in ns
    since the epoch; 0 where the file system does not report one.

    Raises:
      OSError: what statx(2) reports (EBADF...).
    """
    if _statx is None:
        return 0
    buf = ctypes.create_string_buffer(_STATX_SIZE)
    if _statx(fd, b"", _AT_EMPTY_PATH, _STATX_BTIME, buf) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    mask = int.from_bytes(buf.raw[_MASK_AT:_MASK_AT + 4], "little")
    if not mask & _STATX_BTIME:
        return 0
    sec = int.from_bytes(buf.raw[_BTIME_AT:_BTIME_AT + 8], "little", signed=True)
    nsec = int.from_bytes(buf.raw[_BTIME_AT + 8:_BTIME_AT + 12], "little")
    return sec * 1_000_000_000 + nsec
