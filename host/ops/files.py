"""Handlers of attributes and handles: GETATTR, SETATTR, OPEN, CREATE, FLUSH, FSYNC, RELEASE.

A SETATTR, an OPEN with O_TRUNC and a CREATE that truncates are
modifications: each runs inside `daemon.modification`.  What the kernel
checks permissions for (SETATTR, OPEN, CREATE) runs as its caller
(host/linux/credentials.py).
"""

from __future__ import annotations

import errno
import os
from contextlib import AsyncExitStack

from host.backend import TIME_NOW
from host.ops.common import Daemon, Session, acting_as, caller_of, enter_together, is_dir
from host.ranges import ATTRS, resized_span
from protocol.fuse import (
    FATTR_ATIME,
    FATTR_ATIME_NOW,
    FATTR_FH,
    FATTR_GID,
    FATTR_MODE,
    FATTR_MTIME,
    FATTR_MTIME_NOW,
    FATTR_SIZE,
    FATTR_UID,
)
from protocol.messages import CreateOut, EmptyOut, FsReply, FsRequest, OpenOut


async def get_attr(d: Daemon, s: Session, r: FsRequest) -> FsReply:
    await d.before_unleased_reply(s, r.nodeid)
    st = d.fs.getattr(s.guest_id, r.nodeid)
    return FsReply(r.unique, 0, d.attr_out(st), d.lease_for(s, r.nodeid, is_dir=is_dir(st)))


async def set_attr(d: Daemon, s: Session, r: FsRequest) -> FsReply:
    op = r.op
    before = d.fs.getattr(s.guest_id, r.nodeid)  # refuse unknown nodeids before recalling
    if op.valid & FATTR_SIZE:
        changes = lambda size: resized_span(op.size, size)  # noqa: E731
    else:
        changes = lambda size: ATTRS  # noqa: E731  (mode, owner, times: no page changes)
    # A mount's kernel sends a truncate under FUSE_NOWRITE: a purge it owes may
    # be waiting for it to launder a page (docs/mount.md, R8).
    truncate = bool(op.valid & FATTR_SIZE) and s.caches_unleased
    new_size = op.size if op.valid & FATTR_SIZE else None
    async with d.modification(r.nodeid, s.guest_id, is_dir=is_dir(before), span=changes,
                              change=lambda: d.size_change(r.nodeid, new_size),
                              under_writeback=truncate):
        with acting_as(caller_of(r)):
            st = d.fs.setattr(
                s.guest_id, r.nodeid,
                size=op.size if op.valid & FATTR_SIZE else None,
                mode=op.mode & 0o7777 if op.valid & FATTR_MODE else None,
                atime_ns=_time(op.valid, FATTR_ATIME, FATTR_ATIME_NOW, op.atime, op.atimensec),
                mtime_ns=_time(op.valid, FATTR_MTIME, FATTR_MTIME_NOW, op.mtime, op.mtimensec),
                fh=op.fh if op.valid & FATTR_FH else None,
                uid=op.uid if op.valid & FATTR_UID else None,
                gid=op.gid if op.valid & FATTR_GID else None)
    return FsReply(r.unique, 0, d.attr_out(st), d.revoked(r.nodeid))


def _time(valid: int, given: int, now: int, sec: int, nsec: int) -> int | str | None:
    """A SETATTR time: TIME_NOW (FATTR_*_NOW), ns since the epoch, or None (not given)."""
    if valid & now:
        return TIME_NOW
    return sec * 1_000_000_000 + nsec if valid & given else None


def _writes(flags: int) -> bool:
    return (flags & os.O_ACCMODE) != os.O_RDONLY or bool(flags & os.O_TRUNC)


async def open_file(d: Daemon, s: Session, r: FsRequest) -> FsReply:
    flags = r.op.flags
    st = d.fs.getattr(s.guest_id, r.nodeid)
    if is_dir(st):
        raise OSError(errno.EISDIR, "use READDIR on directories")
    writing = _writes(flags)
    if writing:
        await d.open_for_write(r.nodeid, s.guest_id)
    else:
        await d.before_unleased_reply(s, r.nodeid)
    try:
        if flags & os.O_TRUNC:
            async with d.modification(r.nodeid, s.guest_id):
                with acting_as(caller_of(r)):
                    fh = d.fs.open(s.guest_id, r.nodeid, flags)
        else:
            with acting_as(caller_of(r)):
                fh = d.fs.open(s.guest_id, r.nodeid, flags)
    except BaseException:
        if writing:
            d.leases.close_for_write(r.nodeid, s.guest_id)
        raise
    if writing:
        s.write_handles[fh] = r.nodeid
        lease = d.revoked(r.nodeid)
    else:
        lease = d.lease_for(s, r.nodeid)
    return FsReply(r.unique, 0, OpenOut(fh), lease)


async def create_file(d: Daemon, s: Session, r: FsRequest) -> FsReply:
    op = r.op
    d.fs.getattr(s.guest_id, r.nodeid)
    # O_TRUNC on an existing file is a modification of that file too: its
    # recall runs at the same time as the name's (one wait, not two).
    existing = d.fs.peek(r.nodeid, op.name) if op.flags & os.O_TRUNC else None
    truncated = False
    async with AsyncExitStack() as stack:
        changes = [d.namespace_change(s.guest_id, (r.nodeid, op.name))]
        if existing is not None:
            changes.append(d.modification(existing, s.guest_id))
        await enter_together(stack, *changes)
        d.before_create(r.nodeid, op.name)
        # Truncated only inside that file's modification.
        with acting_as(caller_of(r)):
            nodeid, st, fh = d.fs.create(s.guest_id, r.nodeid, op.name, op.flags & ~os.O_TRUNC,
                                         op.mode & ~op.umask)
            if nodeid == existing and st.st_size:
                st = d.fs.setattr(s.guest_id, nodeid, size=0, fh=fh)
                truncated = True
    await d.open_for_write(nodeid, s.guest_id)
    s.write_handles[fh] = nodeid
    if op.flags & os.O_TRUNC and st.st_size and not truncated:
        # The name came to another non-empty file in between: a second wait.
        async with d.modification(nodeid, s.guest_id):
            with acting_as(caller_of(r)):
                st = d.fs.setattr(s.guest_id, nodeid, size=0, fh=fh)
    return FsReply(r.unique, 0, CreateOut(d.entry_out(nodeid, st), OpenOut(fh)), d.revoked(nodeid))


async def flush(d: Daemon, s: Session, r: FsRequest) -> FsReply:
    d.fs.flush(s.guest_id, r.op.fh, r.op.lock_owner)  # (its POSIX locks go: locks.py)
    return FsReply(r.unique, 0, EmptyOut())


async def fsync(d: Daemon, s: Session, r: FsRequest) -> FsReply:
    op = r.op
    nodeid = d.fs.nodeid_of_handle(s.guest_id, op.fh)
    mark = d.leases.flush_started(nodeid)
    await d.run_blocking(d.fs.fsync(s.guest_id, op.fh, bool(op.fsync_flags & 1)))
    d.flushed(nodeid, mark)
    return FsReply(r.unique, 0, EmptyOut())


async def release(d: Daemon, s: Session, r: FsRequest) -> FsReply:
    fh = r.op.fh
    d.fs.release(s.guest_id, fh)
    nodeid = s.write_handles.pop(fh, None)
    if nodeid is not None:
        d.leases.close_for_write(nodeid, s.guest_id)
    return FsReply(r.unique, 0, EmptyOut())
