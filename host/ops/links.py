"""Handlers of links and special files: SYMLINK, READLINK, LINK, MKNOD, RENAME2.

Each new name runs inside `daemon.namespace_change`, like MKDIR; a LINK also
changes the target's link count, an attribute, so it runs inside
`daemon.modification` of the target too (its holders drop their attributes).
Each runs as its caller (host/linux/credentials.py).
"""

from __future__ import annotations

from host.control.holds import METADATA_CHANGE
from host.ops.common import Daemon, Session, acting_as, caller_of
from protocol.messages import BytesOut, EmptyOut, FsReply, FsRequest


async def symlink(d: Daemon, s: Session, r: FsRequest) -> FsReply:
    op = r.op
    d.fs.getattr(s.guest_id, r.nodeid)
    async with d.namespace_change(s.guest_id, (r.nodeid, op.name)):
        with acting_as(caller_of(r)):
            nodeid, st = d.fs.symlink(s.guest_id, r.nodeid, op.name, op.target)
    return FsReply(r.unique, 0, d.entry_out(nodeid, st))


async def readlink(d: Daemon, s: Session, r: FsRequest) -> FsReply:
    # A symlink's target changes only by a namespace change (a new inode), so
    # the kernel may keep it as long as the entry: no lease of its own.
    return FsReply(r.unique, 0, BytesOut(d.fs.readlink(s.guest_id, r.nodeid)))


async def mknod(d: Daemon, s: Session, r: FsRequest) -> FsReply:
    op = r.op
    d.fs.getattr(s.guest_id, r.nodeid)
    async with d.namespace_change(s.guest_id, (r.nodeid, op.name)):
        with acting_as(caller_of(r)):
            nodeid, st = d.fs.mknod(s.guest_id, r.nodeid, op.name,
                                    (op.mode & ~0o7777) | (op.mode & 0o7777 & ~op.umask), op.rdev)
    return FsReply(r.unique, 0, d.entry_out(nodeid, st))


async def link(d: Daemon, s: Session, r: FsRequest) -> FsReply:
    op = r.op
    d.fs.getattr(s.guest_id, r.nodeid)
    d.fs.getattr(s.guest_id, op.oldnodeid)  # refuse unknown nodeids before recalling
    async with d.namespace_change(s.guest_id, (r.nodeid, op.newname)):
        async with d.modification(op.oldnodeid, s.guest_id, change=METADATA_CHANGE):
            with acting_as(caller_of(r)):
                nodeid, st = d.fs.link(s.guest_id, op.oldnodeid, r.nodeid, op.newname)
    return FsReply(r.unique, 0, d.entry_out(nodeid, st), d.revoked(nodeid))


async def rename2(d: Daemon, s: Session, r: FsRequest) -> FsReply:
    op = r.op
    d.fs.getattr(s.guest_id, r.nodeid)
    d.fs.getattr(s.guest_id, op.newdir)
    # RENAME_EXCHANGE changes both names; NOREPLACE, like RENAME, both too
    # (the old one goes, the new one appears).
    async with d.namespace_change(s.guest_id, (r.nodeid, op.oldname), (op.newdir, op.newname)):
        with acting_as(caller_of(r)):
            d.fs.rename(s.guest_id, r.nodeid, op.oldname, op.newdir, op.newname, op.flags)
    return FsReply(r.unique, 0, EmptyOut())
