"""`cleanlease backup SRC DEST [--since MARK]`: a consistent copy of one file.

Flush, freeze, read the changed ranges (or everything), take the new mark,
copy, thaw.  While frozen no modification of SRC lands, so DEST gets SRC's
content at the freeze instant; reads of SRC by others go on.  The copy reads
SRC through the export (each read is a pre-content event the daemon answers
at once) and writes DEST with copy_file_range where it can.
"""

from __future__ import annotations

import errno
import os
import time
from dataclasses import dataclass

from host.control.client import ControlClient, format_mark
from protocol.control import ChangesStatus

CHUNK = 64 << 20


@dataclass(frozen=True)
class BackupResult:
    bytes_copied: int
    size: int
    frozen_ns: int  # from the freeze request to the thaw's reply
    incremental: bool  # False: everything was copied (no mark, or the journal could not tell)
    why_full: str
    mark: str  # give it to the next --since
    ranges: tuple[tuple[int, int], ...]


def _copy(src: int, dst: int, offset: int, length: int) -> int:
    done = 0
    while done < length:
        n = min(CHUNK, length - done)
        try:
            got = os.copy_file_range(src, dst, n, offset + done, offset + done)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                raise
            data = os.pread(src, n, offset + done)
            got = os.pwrite(dst, data, offset + done) if data else 0
        if got == 0:
            break  # the end of SRC
        done += got
    return done


def backup(client: ControlClient, src: str, dest: str, since: str | None = None, *,
           max_hold_s: float = 0.0, after_freeze=None) -> BackupResult:
    """Back `src` up into `dest` (created if missing); see the module.
    `after_freeze()`, if given, is called once the freeze holds (tests take
    their reference snapshot there)."""
    client.flush(src)
    t0 = time.monotonic_ns()
    client.freeze(src, max_hold_s)
    try:
        if after_freeze is not None:
            after_freeze()
        ranges, why_full = None, "no --since mark"
        if since is not None:
            changes = client.changes(src, since)
            if changes.status is ChangesStatus.RANGES:
                ranges = changes.ranges
            else:
                why_full = client.last_message or changes.status.name.lower()
        new_mark = client.mark(src)
        fd_src = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
        try:
            size = os.fstat(fd_src).st_size
            flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC
            if ranges is None:
                flags |= os.O_TRUNC
            fd_dst = os.open(dest, flags, 0o600)
            try:
                copied = 0
                for offset, length in (ranges if ranges is not None else ((0, size),)):
                    length = min(length, size - offset)
                    if length > 0:
                        copied += _copy(fd_src, fd_dst, offset, length)
                os.ftruncate(fd_dst, size)
            finally:
                os.close(fd_dst)
        finally:
            os.close(fd_src)
    finally:
        client.thaw(src)
    frozen = time.monotonic_ns() - t0
    return BackupResult(copied, size, frozen, ranges is not None, why_full if ranges is None else "",
                        format_mark(new_mark.boot_id, new_mark.epoch),
                        tuple(ranges) if ranges is not None else ((0, size),))
