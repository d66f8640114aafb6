"""Handlers of the file system as a whole: STATFS (the export's own figures)
and FSYNCDIR (a directory's entries to stable storage)."""

from __future__ import annotations

import asyncio

from host.ops.common import Daemon, Session
from protocol.messages import EmptyOut, FsReply, FsRequest, StatfsOut


async def statfs(d: Daemon, s: Session, r: FsRequest) -> FsReply:
    v = d.fs.statfs(s.guest_id, r.nodeid)
    return FsReply(r.unique, 0, StatfsOut(v.f_blocks, v.f_bfree, v.f_bavail, v.f_files,
                                          v.f_ffree, v.f_bsize, v.f_namemax, v.f_frsize))


async def fsyncdir(d: Daemon, s: Session, r: FsRequest) -> FsReply:
    sync = d.fs.fsyncdir(s.guest_id, r.nodeid, bool(r.op.fsync_flags & 1))
    await asyncio.to_thread(sync)
    return FsReply(r.unique, 0, EmptyOut())
