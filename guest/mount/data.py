"""Forwarded requests of file data: READ (R4's taint) and WRITE (R5)."""

from __future__ import annotations

import asyncio
import errno
from typing import TYPE_CHECKING

from guest.mount.state import _Reply
from protocol import fuse, fusefast
from protocol.messages import Read, Write

if TYPE_CHECKING:  # the mount imports these handlers: name its type only for checkers
    from guest.mount.core import GuestMount


async def read(m: GuestMount, h, body) -> None:
    arg = fusefast.parse(fuse.ReadIn, body)
    m.stats.read_requests += 1
    cached = m.handles.get(arg.fh, False)
    nodeid = h.nodeid
    # Every READ is tracked, not only those of KEEP_CACHE handles: a DIRECT_IO
    # handle fills the page cache too through MAP_PRIVATE mmap and splice.
    st = m._inode(nodeid) if m.leases else None
    done = None
    if st is not None:
        done = m.loop.create_future()
        st.reads.add(done)
    try:
        chunks, leases = [], []
        offset, remaining = arg.offset, arg.size
        while remaining > 0:
            size = min(remaining, m.max_io)
            reply = await m.ask(h, Read(arg.fh, offset, size, arg.read_flags,
                                                        arg.lock_owner, arg.flags))
            data = reply.body.data
            chunks.append(data)
            leases.append(reply.lease)
            if len(data) < size:
                break  # end of file
            offset += size
            remaining -= size
        data = b"".join(chunks)
        if m.read_delay:
            await asyncio.sleep(m.read_delay)
        m.stats.kernel_reads += 1
        m.stats.kernel_read_bytes += len(data)
        if cached:
            m.stats.cached_reads += 1
            m.stats.cached_read_bytes += len(data)
        else:
            m.stats.direct_reads += 1
            m.stats.direct_read_bytes += len(data)
        unleased = st is not None and not all(m._accept(lease) for lease in leases)
        if len(data) < arg.size:
            m._may_shrink_to(nodeid, arg.offset + len(data))  # fuse_read_update_size
        # No await from the grant check to the reply: an INVALIDATE handled in
        # between would otherwise not be seen by the check.
        m.dev.reply(h.unique, 0, data)
        if st is not None:
            st.fill_seq += 1
            st.may_have_pages = True
            if unleased:
                # These pages are not covered by a lease: the kernel may keep
                # them only until we drop them (R4).  On a DIRECT_IO handle
                # too: a mapping of it reads through this same path into the
                # page cache, where other mappings of the file see it.
                st.tainted = True
                st.taint_seq += 1
                if cached:
                    m.stats.unleased_cached_replies += 1
                if not m.hold_purges:
                    m._schedule_purge(nodeid)
        return None
    finally:
        if st is not None:
            st.reads.discard(done)
            done.set_result(None)


async def write(m: GuestMount, h, body) -> bytes:
    arg = fusefast.write_in(body)
    data = arg.data if type(arg.data) is bytes else bytes(arg.data)
    if arg.size != len(data):
        raise _Reply(errno.EINVAL)
    m.stats.kernel_writes += 1
    m.stats.kernel_write_bytes += len(data)
    reply = await m.ask(h, Write(arg.fh, arg.offset, data, arg.write_flags,
                                                   arg.lock_owner, arg.flags))
    if arg.write_flags & fuse.FUSE_WRITE_CACHE:
        # A mapping's dirty pages written back (msync, munmap, fsync, close, or
        # laundered by a purge, which waits for this reply): R7, no page purge.
        m._grows_to(h.nodeid, arg.offset + reply.body.size)
        m.dev.reply(h.unique, 0, fuse.WriteOut.build({"size": reply.body.size}))
        m._written_back(h.nodeid, reply.lease)
        return None
    await m._own_modification(h.nodeid, reply.lease)
    m._grows_to(h.nodeid, arg.offset + reply.body.size)  # fuse_write_update_attr
    return fusefast.write_out(reply.body.size)
