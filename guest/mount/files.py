"""Forwarded requests of attributes and handles: GETATTR, SETATTR, OPEN, CREATE,
FLUSH, FSYNC, RELEASE."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from guest.fuse_device import FUSE_GETATTR_FH
from protocol import fuse, fusefast
from protocol.messages import Create, Flush, Fsync, Getattr, Open, Release, Setattr

if TYPE_CHECKING:  # the mount imports these handlers: name its type only for checkers
    from guest.mount.core import GuestMount


async def get_attr(m: GuestMount, h, body) -> bytes:
    arg = fusefast.parse(fuse.GetattrIn, body)
    fh = arg.fh if arg.getattr_flags & FUSE_GETATTR_FH else 0
    m.stats.getattrs += 1
    st = m.inodes.get(h.nodeid)
    # R4: the READs in flight now may carry data older than the read(2) that
    # sent this GETATTR; it must not find their pages.
    earlier_reads = list(st.reads) if st is not None else []
    reply = await m.ask(h, Getattr(fh, arg.getattr_flags))
    m._size_fetched(h.nodeid, reply.body.attr)
    if m.leases and st is not None:
        await m._drain_and_purge(h.nodeid, earlier_reads)
    granted = await m._attrs_granted(h.nodeid, reply.lease)
    if m.leases and arg.getattr_flags & FUSE_GETATTR_FH:
        # A GETATTR with a file handle comes from read(2) (fuse_cache_read_iter),
        # which then reads up to the kernel's i_size, whatever this reply says.
        await m._repair_size(h.nodeid, fh, reply.body.attr.size)
    return m._attr_bytes(h.nodeid, reply.body, granted)


async def set_attr(m: GuestMount, h, body) -> bytes:
    a = fuse.SetattrIn.parse(bytes(body))
    # FATTR_ATIME_NOW / MTIME_NOW go to the host as they are: "now" is the host's
    # clock, and its own permission rule (the owner, or anyone who may write).
    op = Setattr(valid=a.valid, fh=a.fh, size=a.size, atime=a.atime, mtime=a.mtime,
                 ctime=a.ctime, atimensec=a.atimensec, mtimensec=a.mtimensec,
                 ctimensec=a.ctimensec, mode=a.mode, uid=a.uid, gid=a.gid,
                 lock_owner=a.lock_owner)
    reply = await m.ask(h, op)
    m._size_fetched(h.nodeid, reply.body.attr)
    # A truncate is sent under FUSE_NOWRITE: no page purge then (R7).
    await m._own_modification(h.nodeid, reply.lease, pages=not a.valid & fuse.FATTR_SIZE)
    return m._attr_bytes(h.nodeid, reply.body, False)


def writes(flags: int) -> bool:
    return (flags & os.O_ACCMODE) != os.O_RDONLY or bool(flags & os.O_TRUNC)


async def open_file(m: GuestMount, h, body) -> bytes:
    arg = fusefast.parse(fuse.OpenIn, body)
    writing = writes(arg.flags)
    reply = await m.ask(h, Open(arg.flags, arg.open_flags))
    granted = False
    if writing:
        await m._own_modification(h.nodeid, reply.lease)
    elif m._accept(reply.lease):
        st = m.inodes.get(h.nodeid)
        if st is not None and (st.tainted or st.reads):
            await m._drain_and_purge(h.nodeid, list(st.reads))
        granted = m._accept(reply.lease) and not (st is not None and st.tainted)
    return m._opened(reply.body.fh, m._open_flags(writing, granted))


async def create_file(m: GuestMount, h, body) -> bytes:
    arg = fuse.CreateIn.parse(bytes(body))
    # The kernel's mode carries the file type (S_IFREG); the protocol's is the
    # permission bits, as open(2) takes them.
    reply = await m.ask(
        h, Create(arg.name, arg.flags, arg.mode & 0o7777, arg.umask, arg.open_flags))
    entry, opened = reply.body.entry, reply.body.open
    m._size_fetched(entry.nodeid, entry.attr)
    await m._own_modification(entry.nodeid, reply.lease)
    flags = m._open_flags(True, False)
    return m._entry_bytes(h.nodeid, arg.name, entry, False) + m._opened(opened.fh, flags)


async def flush(m: GuestMount, h, body) -> bytes:
    arg = fusefast.parse(fuse.FlushIn, body)
    await m.ask(h, Flush(arg.fh, arg.lock_owner))
    return b""


async def fsync(m: GuestMount, h, body) -> bytes:
    arg = fusefast.parse(fuse.FsyncIn, body)
    await m.ask(h, Fsync(arg.fh, arg.fsync_flags))
    return b""


async def release(m: GuestMount, h, body) -> bytes:
    arg = fusefast.parse(fuse.ReleaseIn, body)
    m.handles.pop(arg.fh, None)
    await m.ask(h, Release(arg.fh, arg.flags, arg.release_flags,
                                             arg.lock_owner))
    return b""
