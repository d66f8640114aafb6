"""What a host-local writer held in a pre-content event is about to change.

The event gives a page-aligned range (docs/kernel.md, "What the event
tells"): exact for pwrite, fallocate and mmap, but for a write() it is the
fd's position (wrong under O_APPEND) and for a truncate the page of the new
size.  So the blocked thread's system call (`/proc/<tid>/syscall`, still the
same while it waits for us) decides:

* pwrite64 / write (not O_APPEND): [offset, offset + count), exact; a layout
  change if it reaches past the end of the file or into a hole (SEEK_HOLE);
  a write that starts past the end changes the bytes from the end on (the
  gap reads as zeros: that matters after an `open(O_TRUNC)`, which raises no
  event);
* pwritev, writev, pwritev2: the event's range (the iovec's length is in
  the writer's memory), layout as above;
* an O_APPEND write: from the end of the file on, a layout change;
* truncate, ftruncate: from the smaller of the event's page and the current
  size on, a layout change;
* fallocate: its range, a layout change (every mode);
* mmap of a shared writable mapping: its range, a layout change (a store
  into a hole allocates), and the journal cannot follow it any more;
* anything else that may modify (copy_file_range's destination, sendfile,
  splice, unknown): everything, a layout change.
"""

from __future__ import annotations

import os
import platform

from host import fanotify
from host.control.holds import UNKNOWN_CHANGE, Change
from host.control.journal import EVERYTHING

_NR = {
    "x86_64": dict(write=1, pwrite64=18, writev=20, pwritev=296, pwritev2=328, truncate=76,
                   ftruncate=77, fallocate=285),
    "aarch64": dict(write=64, pwrite64=68, writev=66, pwritev=70, pwritev2=287, truncate=45,
                    ftruncate=46, fallocate=47),
}
_NR["amd64"], _NR["arm64"] = _NR["x86_64"], _NR["aarch64"]
NR = _NR.get(platform.machine(), {})
_BY_NR = {nr: name for name, nr in NR.items()}


def _fd_flags_pos(tid: int, fd: int) -> tuple[int, int] | None:
    try:
        with open(f"/proc/{tid}/fdinfo/{fd}", encoding="ascii") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        return int(fields["flags"].strip(), 8), int(fields["pos"].strip())
    except (OSError, ValueError, KeyError):
        return None


def _layout(event_fd: int, start: int, end: int) -> bool:
    try:
        hole = os.lseek(event_fd, start, os.SEEK_HOLE)
    except OSError as exc:
        return True  # ENXIO: at or past the end; anything else: the safe side
    return hole < end


def host_change(tid: int, event_fd: int, access: fanotify.Access,
                offset: int | None, count: int | None, line: str | None = None) -> Change:
    """The Change the thread `tid`, blocked on a pre-content event whose fd
    is `event_fd` and range `offset`/`count`, is about to make (`line`: its
    `/proc/<tid>/syscall`, if already read)."""
    has_range = offset is not None and count is not None
    if access is fanotify.Access.MMAP_WRITE:
        return Change(offset, offset + count, True) if has_range else UNKNOWN_CHANGE
    fields = (line or fanotify.syscall_line(tid) or "-1").split()
    try:
        nr = int(fields[0])
        args = [int(a, 16) for a in fields[1:7]]
    except (ValueError, IndexError):
        return UNKNOWN_CHANGE
    name = _BY_NR.get(nr)
    if name in ("pwrite64", "write"):
        fd, n = args[0] & 0xFFFFFFFF, args[2]
        if name == "pwrite64":
            start = args[3]
        else:
            got = _fd_flags_pos(tid, fd)
            if got is None:
                return UNKNOWN_CHANGE
            flags, start = got
            if flags & os.O_APPEND:
                return Change(_size(event_fd), EVERYTHING, True)
        return Change(min(start, _size(event_fd)), start + n, _layout(event_fd, start, start + n))
    if name in ("writev", "pwritev", "pwritev2") and has_range:
        got = _fd_flags_pos(tid, args[0] & 0xFFFFFFFF) if name == "writev" else None
        if got is not None and got[0] & os.O_APPEND:
            return Change(_size(event_fd), EVERYTHING, True)
        return Change(min(offset, _size(event_fd)), offset + count,
                      _layout(event_fd, offset, offset + count))
    if name in ("truncate", "ftruncate"):
        start = min(args[1], _size(event_fd))  # (path or fd, length)
        return Change(start, EVERYTHING, True)
    if name == "fallocate" and has_range:
        return Change(offset, offset + count, True)
    return UNKNOWN_CHANGE


def _size(fd: int) -> int:
    try:
        return os.fstat(fd).st_size
    except OSError:
        return 0
