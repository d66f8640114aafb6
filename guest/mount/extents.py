"""Forwarded requests of space and extents: FALLOCATE, LSEEK, COPY_FILE_RANGE.
FALLOCATE and COPY_FILE_RANGE change the destination's data like a WRITE: our
own pages of it are dropped before the reply goes back (R5), and a larger
file grows the kernel's i_size floor (R6)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from protocol import fuse
from protocol.messages import CopyFileRange, Fallocate, Lseek

FALLOC_FL_KEEP_SIZE = 0x01  # linux/falloc.h
FALLOC_FL_PUNCH_HOLE = 0x02

if TYPE_CHECKING:  # the mount imports these handlers: name its type only for checkers
    from guest.mount.core import GuestMount


async def fallocate(m: GuestMount, h, body) -> bytes:
    arg = fuse.FallocateIn.parse(bytes(body))
    reply = await m.ask(h, Fallocate(arg.fh, arg.offset, arg.length, arg.mode))
    await m._own_modification(h.nodeid, reply.lease)
    if not arg.mode & (FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE):
        m._grows_to(h.nodeid, arg.offset + arg.length)  # as fuse_file_fallocate does
    return b""


async def lseek(m: GuestMount, h, body) -> bytes:
    arg = fuse.LseekIn.parse(bytes(body))
    reply = await m.ask(h, Lseek(arg.fh, arg.offset, arg.whence))
    return fuse.LseekOut.build({"offset": reply.body.offset})


async def copy_file_range(m: GuestMount, h, body) -> bytes:
    arg = fuse.CopyFileRangeIn.parse(bytes(body))
    reply = await m.ask(h, CopyFileRange(arg.fh_in, arg.off_in, arg.nodeid_out, arg.fh_out,
                                         arg.off_out, arg.len, arg.flags))
    await m._own_modification(arg.nodeid_out, reply.lease)
    m._grows_to(arg.nodeid_out, arg.off_out + reply.body.size)
    return fuse.WriteOut.build({"size": reply.body.size})
