"""Handlers of file data: READ (which may grant a lease) and WRITE (a modification).

A WRITE's pwrite runs on a worker thread (`daemon.run_blocking`) inside its
`daemon.modification`: the inode is leased to nobody and not re-armed until
it has returned.
"""

from __future__ import annotations

from host.ops.common import Daemon, Session, caller_of
from host.ranges import Span, written_span
from protocol.fuse import FUSE_WRITE_CACHE
from protocol.messages import FsReply, FsRequest, ReadOut, WriteOut


async def read(d: Daemon, s: Session, r: FsRequest) -> FsReply:
    op = r.op
    limit = s.conn.max_frame - 64  # room for the headers and the lease trailer
    nodeid = d.fs.nodeid_of_handle(s.guest_id, op.fh)
    await d.before_unleased_reply(s, nodeid)
    data = d.fs.read(s.guest_id, op.fh, op.offset, min(op.size, limit))
    return FsReply(r.unique, 0, ReadOut(data),
                   d.lease_for(s, nodeid, span=Span.of_bytes(op.offset, max(op.size, 1))))


async def write(d: Daemon, s: Session, r: FsRequest) -> FsReply:
    op = r.op
    nodeid = d.fs.nodeid_of_handle(s.guest_id, op.fh)
    changes = lambda size: written_span(op.offset, len(op.data), size)  # noqa: E731
    # FUSE_WRITE_CACHE: the guest's kernel writes back its own dirty pages (a
    # shared mapping) and keeps them (docs/mount.md, R7).
    keeps = bool(op.write_flags & FUSE_WRITE_CACHE) and s.caches_unleased
    async with d.modification(nodeid, s.guest_id, span=changes, change=lambda: d.data_change(
            nodeid, op.offset, len(op.data)), keeps_pages=keeps, under_writeback=keeps) as m:
        write = d.fs.write_call(s.guest_id, op.fh, op.offset, op.data)  # its own dup of the fd
        # On a worker: a host process inside write(2) may hold the inode's lock.  As
        # the caller, on that worker's thread: the host kernel then clears
        # setuid/setgid on a write by a caller without CAP_FSETID.
        written = await d.run_blocking(caller_of(r).run, write)
    return FsReply(r.unique, 0, WriteOut(written), d.revoked(nodeid, m.first))
