"""Forwarded requests of the namespace: LOOKUP, READDIR, MKDIR, UNLINK, RMDIR, RENAME."""

from __future__ import annotations

from typing import TYPE_CHECKING

from protocol import fuse, fusefast
from protocol.messages import Lookup, Mkdir, Readdir, Readdirplus, Rename, Rmdir, Unlink

if TYPE_CHECKING:  # the mount imports these handlers: name its type only for checkers
    from guest.mount.core import GuestMount


async def lookup(m: GuestMount, h, body) -> bytes:
    name = fusefast.lookup_name(body)
    m.stats.lookups += 1
    reply = await m.ask(h, Lookup(name))
    entry = reply.body
    m._size_fetched(entry.nodeid, entry.attr)
    granted = await m._attrs_granted(entry.nodeid, reply.lease)
    return m._entry_bytes(h.nodeid, name, entry, granted)


async def readdir(m: GuestMount, h, body) -> bytes:
    arg = fuse.ReadIn.parse(bytes(body))
    reply = await m.ask(h, Readdir(arg.fh, arg.offset, arg.size, arg.read_flags,
                                                     arg.lock_owner, arg.flags))
    m._accept(reply.lease)  # a lease on the directory lets its entries be cached
    return b"".join(fuse.Dirent.build({"ino": e.ino, "off": e.off, "namelen": len(e.name),
                                       "type": e.type, "name": e.name})
                    for e in reply.body.entries)


async def readdirplus(m: GuestMount, h, body) -> bytes:
    """Negotiated only where it saves round trips (ttl, always: an entry's
    attributes are valid without a lease of their own; local.py)."""
    arg = fuse.ReadIn.parse(bytes(body))
    reply = await m.ask(h, Readdirplus(arg.fh, arg.offset, arg.size, arg.read_flags,
                                       arg.lock_owner, arg.flags))
    m._accept(reply.lease)  # a lease on the directory lets its entries be cached
    out = []
    for e in reply.body.entries:
        m._size_fetched(e.entry.nodeid, e.entry.attr)
        d = e.dirent
        out.append(m._entry_bytes(h.nodeid, e.dirent.name, e.entry, False) + fuse.Dirent.build({
            "ino": d.ino, "off": d.off, "namelen": len(d.name), "type": d.type,
            "name": d.name}))
    return b"".join(out)


async def mkdir(m: GuestMount, h, body) -> bytes:
    arg = fuse.MkdirIn.parse(bytes(body))
    reply = await m.ask(h, Mkdir(arg.name, arg.mode & 0o7777, arg.umask))
    return m._entry_bytes(h.nodeid, arg.name, reply.body, False)


async def unlink(m: GuestMount, h, body) -> bytes:
    await m.ask(h, Unlink(fuse.UnlinkIn.parse(bytes(body)).name))
    return b""


async def rmdir(m: GuestMount, h, body) -> bytes:
    await m.ask(h, Rmdir(fuse.RmdirIn.parse(bytes(body)).name))
    return b""


async def rename(m: GuestMount, h, body) -> bytes:
    arg = fuse.RenameIn.parse(bytes(body))
    await m.ask(h, Rename(arg.newdir, arg.oldname, arg.newname))
    return b""
