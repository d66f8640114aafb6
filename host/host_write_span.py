"""What a host-local modification caught by a pre-content event changes: its span.

Range granularity recalls only the pages a write changes (docs/design.md,
"Range granularity").  A fanotify pre-content event carries a page-aligned
range, but it is not always where the data lands (docs/kernel.md, "What the
event tells"): an `O_APPEND` write reports the fd's *position*, a truncate
the page of the new size.  So the event's range is trusted only for a
positioned write (`write`/`pwrite64`/`writev`/`pwritev` on an fd
without `O_APPEND`, read from ``/proc/<tid>/syscall`` and
``/proc/<tid>/fdinfo/<fd>`` while the thread is blocked on the event);
anything else changes, at most, everything from the event's page or the
current end of file, whichever comes first, to the end.  Both are computed
from the size in the step that decides (`host.ranges`).
"""

from __future__ import annotations

import os
import platform
from typing import Callable

from host.fanotify import syscall_line
from host.ranges import PAGE_SIZE, END, Span, written_span

# Positioned writes (write pwrite64 writev pwritev): the event's range is the
# bytes written.  Not pwritev2, whose RWF_APPEND flag appends whatever the fd.
_POSITIONED = {"x86_64": {1, 18, 20, 296}, "amd64": {1, 18, 20, 296},
               "aarch64": {64, 68, 66, 70}, "arm64": {64, 68, 66, 70}}.get(
    platform.machine(), set())


def _appends(tid: int, fd: int) -> bool | None:
    """Whether fd `fd` of thread `tid` has O_APPEND; None when that cannot be told."""
    try:
        with open(f"/proc/{tid}/fdinfo/{fd}", encoding="ascii") as f:
            for line in f:
                if line.startswith("flags:"):
                    return bool(int(line.split()[1], 8) & os.O_APPEND)
    except (OSError, ValueError):
        pass
    return None


def positioned_write(tid: int) -> bool:
    """Is thread `tid` (blocked on a pre-content event) in a write whose event
    range is where its bytes land: a positioned write call on an fd without
    O_APPEND?  False whenever that cannot be told (the safe side)."""
    fields = (syscall_line(tid) or "").split()
    if len(fields) < 7 or fields[0] in ("running", "-1"):
        return False
    try:
        nr, fd = int(fields[0]), int(fields[1], 16) & 0xFFFFFFFF
    except ValueError:
        return False
    return nr in _POSITIONED and _appends(tid, fd) is False


def event_span(offset: int, count: int, positioned: bool) -> Callable[[int], Span]:
    """The span (of the file's size then) a host-local modification with event
    range [offset, offset+count) changes: the written pages, and the tail if
    it reaches past the end, for a `positioned_write`; else everything from
    the event's page or the end of file, whichever is first."""
    if positioned:
        return lambda size: written_span(offset, count, size)
    return lambda size: Span(min(offset, size) // PAGE_SIZE if size >= 0 else -1, END)


def dirty_enough(offset: int, size: int) -> Span:
    """The span that, dirty already, lets any access raising an event at
    `offset` be answered at once without asking /proc what it is: from the
    event's page or the end of file, whichever is first, to the end (what
    any write, append, truncate, fallocate or shared mapping there changes)."""
    return Span(min(offset, size) // PAGE_SIZE, END)
