"""Handlers of locks: GETLK, SETLK, SETLKW (POSIX record locks, and flock(2)
with FUSE_LK_FLOCK), on the host (host/exportfs/locks.py), so that guests and
host-local processes see each other's locks.

SETLKW waits by trying again (every few ms, backing off to 50 ms) rather than
in a blocking fcntl on a worker thread: a wait must end when the request is
cancelled (its session lost), and a thread blocked in fcntl cannot be told to
stop.  Taking a lock is not a modification: no lease is recalled.
"""

from __future__ import annotations

import asyncio
import errno

from host.ops.common import Daemon, Session
from protocol.fuse import FUSE_LK_FLOCK
from protocol.messages import EmptyOut, FsReply, FsRequest, LkOut

_FIRST_WAIT_S, _LONGEST_WAIT_S = 0.002, 0.05


async def getlk(d: Daemon, s: Session, r: FsRequest) -> FsReply:
    op = r.op
    start, end, kind, pid = d.fs.getlk(s.guest_id, op.fh, op.owner, op.start, op.end, op.type)
    return FsReply(r.unique, 0, LkOut(start, end, kind, pid))


async def setlk(d: Daemon, s: Session, r: FsRequest) -> FsReply:
    op = r.op
    d.fs.setlk(s.guest_id, op.fh, op.owner, op.start, op.end, op.type,
               bool(op.lk_flags & FUSE_LK_FLOCK))
    return FsReply(r.unique, 0, EmptyOut())


async def setlkw(d: Daemon, s: Session, r: FsRequest) -> FsReply:
    op = r.op
    wait = _FIRST_WAIT_S
    while True:
        try:
            d.fs.setlk(s.guest_id, op.fh, op.owner, op.start, op.end, op.type,
                       bool(op.lk_flags & FUSE_LK_FLOCK))
            return FsReply(r.unique, 0, EmptyOut())
        except OSError as exc:
            if exc.errno != errno.EAGAIN:
                raise
        await asyncio.sleep(wait)
        wait = min(wait * 2, _LONGEST_WAIT_S)
