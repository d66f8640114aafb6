"""Handlers of locks: GETLK, SETLK, SETLKW (POSIX record locks, and flock(2)
with FUSE_LK_FLOCK), on the host (host/exportfs/locks.py), so that guests and
host-local processes see each other's locks.

SETLKW waits by trying again (every few ms, backing off to 50 ms) rather than
in a blocking fcntl on a worker thread: a wait must end when the request is
cancelled (its session lost), and a thread blocked in fcntl cannot be told to
stop.  An INTERRUPT naming a waiting SETLKW (its caller got a signal, or
died) ends it with EINTR, unless it took the lock first.  Taking a lock is
not a modification: no lease is recalled.
"""

from __future__ import annotations

import asyncio
import errno

from host.ops.common import Daemon, Session
from protocol.fuse import FUSE_LK_FLOCK
from protocol.messages import EmptyOut, FsReply, FsRequest, LkOut

_FIRST_WAIT_S, _LONGEST_WAIT_S = 0.002, 0.05
_EARLY_INTERRUPTS = 64  # INTERRUPTs kept for requests not seen yet, per session


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
    """Take the lock, trying again until no other owner's conflicts.

    Raises OSError EINTR once an INTERRUPT names this request (`interrupt`)
    while it waits; the lock is then not taken."""
    op = r.op
    if r.unique in s.interrupted_early:
        del s.interrupted_early[r.unique]
        raise OSError(errno.EINTR, "interrupted before it was carried out")
    stop = asyncio.get_running_loop().create_future()
    s.lock_waits[r.unique] = stop
    wait = _FIRST_WAIT_S
    try:
        while True:
            try:
                d.fs.setlk(s.guest_id, op.fh, op.owner, op.start, op.end, op.type,
                           bool(op.lk_flags & FUSE_LK_FLOCK))
                return FsReply(r.unique, 0, EmptyOut())
            except OSError as exc:
                if exc.errno != errno.EAGAIN:
                    raise
            await asyncio.wait({stop}, timeout=wait)
            if stop.done():
                raise OSError(errno.EINTR, "interrupted: its caller gave up waiting")
            wait = min(wait * 2, _LONGEST_WAIT_S)
    finally:
        if s.lock_waits.get(r.unique) is stop:
            del s.lock_waits[r.unique]


async def interrupt(d: Daemon, s: Session, r: FsRequest) -> None:
    """End the SETLKW `r.op.unique` of this session if it is waiting (no reply).
    One not seen yet is remembered (the last few), and ends before it starts;
    for one already answered there is nothing to do, but it is remembered all
    the same (the host cannot tell the two apart): a guest must not reuse the
    `unique` of a request it interrupted (ours never reuse one)."""
    stop = s.lock_waits.get(r.op.unique)
    if stop is not None:
        if not stop.done():
            stop.set_result(None)
        return None
    s.interrupted_early[r.op.unique] = None
    while len(s.interrupted_early) > _EARLY_INTERRUPTS:
        del s.interrupted_early[next(iter(s.interrupted_early))]
    return None
