"""Forwarded requests of extended attributes: SETXATTR, GETXATTR, LISTXATTR,
REMOVEXATTR.  The host answers the whole value; the kernel's size probe
(size 0: fuse_getxattr_out) and ERANGE (a buffer too small) are answered here.
A change drops our own copy of the inode's attributes (R5)."""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

from guest.mount.state import _Reply
from protocol import fuse
from protocol.messages import Getxattr, Listxattr, Removexattr, Setxattr

if TYPE_CHECKING:  # the mount imports these handlers: name its type only for checkers
    from guest.mount.core import GuestMount


def _sized(value: bytes, size: int) -> bytes:
    if size == 0:
        return fuse.GetxattrOut.build({"size": len(value)})
    if len(value) > size:
        raise _Reply(errno.ERANGE)
    return value


async def setxattr(m: GuestMount, h, body) -> bytes:
    arg = fuse.SetxattrIn.parse(bytes(body))
    if arg.size != len(arg.value):
        raise _Reply(errno.EINVAL)
    reply = await m.ask(h, Setxattr(arg.name, bytes(arg.value), arg.flags))
    await m._own_modification(h.nodeid, reply.lease)
    return b""


async def getxattr(m: GuestMount, h, body) -> bytes:
    arg = fuse.GetxattrIn.parse(bytes(body))
    reply = await m.ask(h, Getxattr(arg.name, arg.size))
    return _sized(reply.body.data, arg.size)


async def listxattr(m: GuestMount, h, body) -> bytes:
    arg = fuse.ListxattrIn.parse(bytes(body))
    reply = await m.ask(h, Listxattr(arg.size))
    return _sized(reply.body.data, arg.size)


async def removexattr(m: GuestMount, h, body) -> bytes:
    reply = await m.ask(h, Removexattr(fuse.RemovexattrIn.parse(bytes(body)).name))
    await m._own_modification(h.nodeid, reply.lease)
    return b""
