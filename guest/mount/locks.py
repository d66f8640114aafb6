"""Forwarded requests of locks: GETLK, SETLK, SETLKW (POSIX record locks, and
flock(2) with FUSE_LK_FLOCK).  They are the host's (host/exportfs/locks.py),
so two mounts and host-local processes see each other's.  A SETLKW may wait
for ever: it has no request timeout, and an INTERRUPT (the caller got a
signal, or died) is passed on to the host, which ends it with EINTR unless it
took the lock first (host/ops/locks.py)."""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

from guest.mount.state import _Reply
from protocol import fuse
from protocol.messages import Getlk, Setlk, Setlkw

if TYPE_CHECKING:  # the mount imports these handlers: name its type only for checkers
    from guest.mount.core import GuestMount


def _op(cls, body):
    a = fuse.LkIn.parse(bytes(body))
    return cls(a.fh, a.owner, a.start, a.end, a.type, a.pid, a.lk_flags)


async def getlk(m: GuestMount, h, body) -> bytes:
    lk = (await m.ask(h, _op(Getlk, body))).body
    return fuse.LkOut.build({"start": lk.start, "end": lk.end, "type": lk.type, "pid": lk.pid})


async def setlk(m: GuestMount, h, body) -> bytes:
    await m.ask(h, _op(Setlk, body))
    return b""


async def setlkw(m: GuestMount, h, body) -> bytes:
    """Wait on the host; the kernel's INTERRUPT (local.py) is passed on to the
    host, whose answer (EINTR, or 0 if it took the lock first) ends this."""
    if h.unique in m.interrupted:  # interrupted before this task ran
        m.interrupted.discard(h.unique)
        raise _Reply(errno.EINTR)
    unique = m.client.new_unique()
    m.lock_waits[h.unique] = (h.nodeid, unique)
    try:
        await m.ask(h, _op(Setlkw, body), wait_forever=True, unique=unique)
    finally:
        m.lock_waits.pop(h.unique, None)
    return b""
