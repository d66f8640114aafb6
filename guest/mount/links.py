"""Forwarded requests of links and special files: SYMLINK, READLINK, LINK, MKNOD,
RENAME2.  A new name comes back as an entry the kernel may cache like MKDIR's;
a LINK also changed the target's attributes (its link count): its own copy is
dropped as after any modification of ours (R5)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from protocol import fuse
from protocol.messages import Link, Mknod, Readlink, Rename2, Symlink

if TYPE_CHECKING:  # the mount imports these handlers: name its type only for checkers
    from guest.mount.core import GuestMount


async def symlink(m: GuestMount, h, body) -> bytes:
    arg = fuse.SymlinkIn.parse(bytes(body))
    reply = await m.ask(h, Symlink(arg.name, arg.target))
    return m._entry_bytes(h.nodeid, arg.name, reply.body, False)


async def readlink(m: GuestMount, h, body) -> bytes:
    reply = await m.ask(h, Readlink())
    return reply.body.data


async def mknod(m: GuestMount, h, body) -> bytes:
    arg = fuse.MknodIn.parse(bytes(body))
    reply = await m.ask(h, Mknod(arg.name, arg.mode, arg.rdev, arg.umask))
    return m._entry_bytes(h.nodeid, arg.name, reply.body, False)


async def link(m: GuestMount, h, body) -> bytes:
    arg = fuse.LinkIn.parse(bytes(body))
    reply = await m.ask(h, Link(arg.oldnodeid, arg.newname))
    await m._own_modification(arg.oldnodeid, reply.lease)
    return m._entry_bytes(h.nodeid, arg.newname, reply.body, False)


async def rename2(m: GuestMount, h, body) -> bytes:
    arg = fuse.Rename2In.parse(bytes(body))
    await m.ask(h, Rename2(arg.newdir, arg.oldname, arg.newname, arg.flags))
    return b""
