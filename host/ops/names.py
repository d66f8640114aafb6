"""Handlers of the namespace: LOOKUP, FORGET, READDIR, MKDIR, UNLINK, RMDIR, RENAME.

Every change of a name runs inside `daemon.namespace_change`, which recalls
the name from the directory's other holders before it lands and keeps the
directory's names uncacheable until it has; and runs as its caller
(host/linux/credentials.py).
"""

from __future__ import annotations

from host.ops.common import Daemon, Session, acting_as, caller_of, is_dir
from protocol.messages import DirEntry, EmptyOut, FsReply, FsRequest, ReaddirOut


async def lookup(d: Daemon, s: Session, r: FsRequest) -> FsReply:
    # Not held back like a READ (`before_unleased_reply`): a mount's kernel
    # holds the directory's lock during a lookup, and a purge of a name in it
    # that the guest owes would wait for that lock.
    nodeid, st = d.fs.lookup(s.guest_id, r.nodeid, r.op.name)
    # While a name in the directory is being recalled, the entry may not be cached.
    cacheable = not d.leases.names_changing(r.nodeid)
    return FsReply(r.unique, 0, d.entry_out(nodeid, st, cacheable=cacheable),
                   d.lease_for(s, nodeid, is_dir=is_dir(st)))


async def forget(d: Daemon, s: Session, r: FsRequest) -> None:
    d.fs.forget(s.guest_id, r.nodeid, r.op.nlookup)
    if d.fs.inodes.lookup_count(s.guest_id, r.nodeid) == 0:
        # The guest dropped the inode (a kernel evicts its pages with it): it
        # holds no lease on it any more, and the node id may be gone for good.
        d.leases.drop_holder_of(r.nodeid, s.guest_id)
    return None  # FORGET has no reply


async def readdir(d: Daemon, s: Session, r: FsRequest) -> FsReply:
    op = r.op
    entries = d.fs.readdir(s.guest_id, r.nodeid)
    out, used = [], 0
    for index, (name, ino, dtype) in enumerate(entries[op.offset:], start=op.offset + 1):
        size = 24 + len(name) + (8 - len(name) % 8) % 8
        if used + size > min(op.size, s.conn.max_frame - 64):
            break
        out.append(DirEntry(ino, index, dtype, name))
        used += size
    return FsReply(r.unique, 0, ReaddirOut(tuple(out)), d.lease_for(s, r.nodeid, is_dir=True))


async def mkdir(d: Daemon, s: Session, r: FsRequest) -> FsReply:
    op = r.op
    d.fs.getattr(s.guest_id, r.nodeid)
    async with d.namespace_change(s.guest_id, (r.nodeid, op.name)):
        with acting_as(caller_of(r)):
            nodeid, st = d.fs.mkdir(s.guest_id, r.nodeid, op.name, op.mode & ~op.umask)
    return FsReply(r.unique, 0, d.entry_out(nodeid, st))


async def unlink(d: Daemon, s: Session, r: FsRequest) -> FsReply:
    d.fs.getattr(s.guest_id, r.nodeid)
    async with d.namespace_change(s.guest_id, (r.nodeid, r.op.name)):
        with acting_as(caller_of(r)):
            d.fs.unlink(s.guest_id, r.nodeid, r.op.name)
    return FsReply(r.unique, 0, EmptyOut())


async def rmdir(d: Daemon, s: Session, r: FsRequest) -> FsReply:
    d.fs.getattr(s.guest_id, r.nodeid)
    async with d.namespace_change(s.guest_id, (r.nodeid, r.op.name)):
        with acting_as(caller_of(r)):
            d.fs.rmdir(s.guest_id, r.nodeid, r.op.name)
    return FsReply(r.unique, 0, EmptyOut())


async def rename(d: Daemon, s: Session, r: FsRequest) -> FsReply:
    op = r.op
    d.fs.getattr(s.guest_id, r.nodeid)
    d.fs.getattr(s.guest_id, op.newdir)
    async with d.namespace_change(s.guest_id, (r.nodeid, op.oldname), (op.newdir, op.newname)):
        with acting_as(caller_of(r)):
            d.fs.rename(s.guest_id, r.nodeid, op.oldname, op.newdir, op.newname)
    return FsReply(r.unique, 0, EmptyOut())
