"""READDIRPLUS: a directory's entries with each one's attributes, as a LOOKUP of
every name would give them (and counting one lookup of each, as the kernel
does for every entry it is sent).

The reply carries one lease trailer, the directory's, as READDIR's: the
entries' names may be cached under it, their attributes under no lease of
their own (a guest of a lease policy gives them no validity; docs/mount.md).
A name that vanished between the listing and its lookup is left out, as if
it had gone a moment earlier.
"""

from __future__ import annotations

from host.ops.common import Daemon, Session
from protocol.messages import DirEntry, DirEntryPlus, FsReply, FsRequest, ReaddirplusOut

_ENTRY_OUT = 128  # fuse_entry_out, before each fuse_dirent


async def readdirplus(d: Daemon, s: Session, r: FsRequest) -> FsReply:
    op = r.op
    entries = d.fs.readdir(s.guest_id, r.nodeid)
    cacheable = not d.leases.names_changing(r.nodeid)
    room = min(op.size, s.conn.max_frame - 64)
    out, used = [], 0
    for index, (name, ino, dtype) in enumerate(entries[op.offset:], start=op.offset + 1):
        size = _ENTRY_OUT + 24 + len(name) + (8 - len(name) % 8) % 8
        if used + size > room:
            break
        try:
            nodeid, st = d.fs.lookup(s.guest_id, r.nodeid, name)
        except OSError:  # gone (or replaced by something unreachable) meanwhile
            continue
        out.append(DirEntryPlus(d.entry_out(nodeid, st, cacheable=cacheable),
                                DirEntry(ino, index, dtype, name)))
        used += size
    return FsReply(r.unique, 0, ReaddirplusOut(tuple(out)),
                   d.lease_for(s, r.nodeid, is_dir=True))
