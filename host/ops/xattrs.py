"""Handlers of extended attributes: SETXATTR, GETXATTR, LISTXATTR, REMOVEXATTR.

A change is an attribute change: it runs inside `daemon.modification` (every
other holder drops its copy first; POSIX ACLs live here and change what the
mode bits mean).  GETXATTR and LISTXATTR answer the whole value; the guest
answers the kernel's size probe and ERANGE itself.
"""

from __future__ import annotations

import errno

from host.control.holds import METADATA_CHANGE
from host.ops.common import Daemon, Session, acting_as, caller_of, is_dir
from protocol.messages import BytesOut, EmptyOut, FsReply, FsRequest

_REPLY_ROOM = 64  # headers and the lease trailer


def _fits(s: Session, value: bytes) -> BytesOut:
    if len(value) > s.conn.max_frame - _REPLY_ROOM:
        raise OSError(errno.E2BIG, "the value does not fit in one frame of this connection")
    return BytesOut(value)


async def setxattr(d: Daemon, s: Session, r: FsRequest) -> FsReply:
    op = r.op
    st = d.fs.getattr(s.guest_id, r.nodeid)
    async with d.modification(r.nodeid, s.guest_id, is_dir=is_dir(st), change=METADATA_CHANGE):
        with acting_as(caller_of(r)):
            d.fs.setxattr(s.guest_id, r.nodeid, op.name, op.value, op.flags)
    return FsReply(r.unique, 0, EmptyOut(), d.revoked(r.nodeid))


async def removexattr(d: Daemon, s: Session, r: FsRequest) -> FsReply:
    st = d.fs.getattr(s.guest_id, r.nodeid)
    async with d.modification(r.nodeid, s.guest_id, is_dir=is_dir(st), change=METADATA_CHANGE):
        with acting_as(caller_of(r)):
            d.fs.removexattr(s.guest_id, r.nodeid, r.op.name)
    return FsReply(r.unique, 0, EmptyOut(), d.revoked(r.nodeid))


async def getxattr(d: Daemon, s: Session, r: FsRequest) -> FsReply:
    with acting_as(caller_of(r)):
        value = d.fs.getxattr(s.guest_id, r.nodeid, r.op.name)
    return FsReply(r.unique, 0, _fits(s, value))


async def listxattr(d: Daemon, s: Session, r: FsRequest) -> FsReply:
    with acting_as(caller_of(r)):
        names = d.fs.listxattr(s.guest_id, r.nodeid)
    return FsReply(r.unique, 0, _fits(s, names))
