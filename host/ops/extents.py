"""Handlers of space and extents: FALLOCATE, LSEEK, COPY_FILE_RANGE.

FALLOCATE (any mode: allocating, punching a hole, zeroing a range...) and
COPY_FILE_RANGE change the data of their destination: each runs inside
`daemon.modification` of it, like a WRITE, as its caller (the host kernel
then clears setuid/setgid as for a write).  LSEEK only reads the layout.
"""

from __future__ import annotations

from host.control.holds import Change
from host.ops.common import Daemon, Session, acting_as, caller_of
from protocol.messages import EmptyOut, FsReply, FsRequest, LseekOut, WriteOut


async def fallocate(d: Daemon, s: Session, r: FsRequest) -> FsReply:
    op = r.op
    nodeid = d.fs.nodeid_of_handle(s.guest_id, op.fh)
    # Every mode may change the layout (allocate, punch, zero, collapse...).
    async with d.modification(nodeid, s.guest_id,
                              change=Change(op.offset, op.offset + op.length, True)) as m:
        with acting_as(caller_of(r)):
            d.fs.fallocate(s.guest_id, op.fh, op.offset, op.length, op.mode)
    return FsReply(r.unique, 0, EmptyOut(), d.revoked(nodeid, m.first))


async def lseek(d: Daemon, s: Session, r: FsRequest) -> FsReply:
    op = r.op
    return FsReply(r.unique, 0, LseekOut(d.fs.lseek(s.guest_id, op.fh, op.offset, op.whence)))


async def copy_file_range(d: Daemon, s: Session, r: FsRequest) -> FsReply:
    op = r.op
    d.fs.nodeid_of_handle(s.guest_id, op.fh_in)  # EBADF before any recall
    nodeid = d.fs.nodeid_of_handle(s.guest_id, op.fh_out)
    # One call copies at most what one WRITE may carry: the reply's size says how
    # much, and the kernel asks again for the rest, as for a short write.
    limit = min(s.conn.max_frame, 1 << 30)
    async with d.modification(nodeid, s.guest_id, change=lambda: d.data_change(
            nodeid, op.off_out, min(op.len, limit))) as m:
        with acting_as(caller_of(r)):
            copied = d.fs.copy_file_range(s.guest_id, op.fh_in, op.off_in, op.fh_out,
                                          op.off_out, op.len, op.flags, limit)
    return FsReply(r.unique, 0, WriteOut(copied), d.revoked(nodeid, m.first))
