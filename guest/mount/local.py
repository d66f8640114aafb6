"""Requests the mount answers itself, without the host."""

from __future__ import annotations

import errno
import logging
from typing import TYPE_CHECKING

from construct import Int64ul, Struct

from guest.fuse_device import (
    FUSE_ASYNC_READ,
    FUSE_AUTO_INVAL_DATA,
    FUSE_BIG_WRITES,
    FUSE_DIRECT_IO_ALLOW_MMAP,
    FUSE_DO_READDIRPLUS,
    FUSE_FLOCK_LOCKS,
    FUSE_HANDLE_KILLPRIV_V2,
    FUSE_INIT_EXT,
    FUSE_MAX_PAGES,
    FUSE_PARALLEL_DIROPS,
    FUSE_POSIX_LOCKS,
    FUSE_READDIRPLUS_AUTO,
    BatchForgetIn,
    ForgetOne,
)
from protocol import fuse, fusefast
from protocol.fuse import Opcode
from protocol.messages import Policy

InterruptIn = Struct("unique" / Int64ul)  # fuse_interrupt_in

if TYPE_CHECKING:  # the mount imports these handlers: name its type only for checkers
    from guest.mount.core import GuestMount

log = logging.getLogger("cleanlease.mount")


def _init(m: GuestMount, h, body) -> None:
    arg = fuse.InitIn.parse(bytes(body[: fuse.InitIn.sizeof()]).ljust(fuse.InitIn.sizeof(), b"\0"))
    if arg.major != fuse.KERNEL_MAJOR:
        log.error("kernel FUSE major %d; only 7 is spoken", arg.major)
        m.dev.reply(h.unique, -errno.EPROTO)
        return
    wanted = FUSE_ASYNC_READ | FUSE_BIG_WRITES | FUSE_AUTO_INVAL_DATA | FUSE_PARALLEL_DIROPS
    # HANDLE_KILLPRIV_V2: the host clears setuid/setgid (it writes, truncates and
    # chowns as the caller); the kernel's own way would chmod as the caller.
    wanted |= FUSE_MAX_PAGES | FUSE_HANDLE_KILLPRIV_V2
    # Locks are the host's (host/exportfs/locks.py): guests and host-local processes
    # see each other's.
    wanted |= FUSE_POSIX_LOCKS | FUSE_FLOCK_LOCKS
    if m.policy in (Policy.TTL, Policy.ALWAYS):
        # READDIRPLUS saves the LOOKUPs after a listing only where an entry's
        # attributes may be cached without a lease of their own; under the lease
        # policies its attributes would be fetched again by GETATTR.
        wanted |= FUSE_DO_READDIRPLUS | FUSE_READDIRPLUS_AUTO
    # Shared mappings of FOPEN_DIRECT_IO files (every writable one under the
    # lease policies) use the page cache and are written back by WRITE
    # (docs/mount.md, "Shared writable mappings").
    flags2 = 0
    if arg.flags & FUSE_INIT_EXT:
        wanted |= FUSE_INIT_EXT
        flags2 = arg.flags2 & FUSE_DIRECT_IO_ALLOW_MMAP
    out = fuse.InitOut.build({
        "major": fuse.KERNEL_MAJOR, "minor": min(arg.minor, fuse.KERNEL_MINOR),
        "max_readahead": arg.max_readahead, "flags": arg.flags & wanted,
        "max_background": 16, "congestion_threshold": 12, "max_write": m.max_io,
        "time_gran": 1, "max_pages": m.max_pages, "map_alignment": 0, "flags2": flags2,
        "max_stack_depth": 0, "request_timeout": 0})
    m.dev.reply(h.unique, 0, out)
    if not arg.flags & FUSE_AUTO_INVAL_DATA and m.leases:
        log.warning("kernel lacks FUSE_AUTO_INVAL_DATA: reads of unleased cached files "
                    "are not re-checked (docs/mount.md, R4)")
    if not m.initialized.done():
        m.initialized.set_result(arg.minor)


def _forget(m: GuestMount, h, body) -> None:
    nlookup = fusefast.parse(fuse.ForgetIn, body).nlookup
    m._forgotten(h.nodeid, nlookup)
    m.client.forget(h.nodeid, nlookup)


def _batch_forget(m: GuestMount, h, body) -> None:
    count = BatchForgetIn.parse(bytes(body[:8])).count
    size = ForgetOne.sizeof()
    for i in range(count):
        one = ForgetOne.parse(bytes(body[8 + i * size: 8 + (i + 1) * size]))
        m._forgotten(one.nodeid, one.nlookup)
        m.client.forget(one.nodeid, one.nlookup)


def _opendir(m: GuestMount, h, body) -> None:
    # The host reads directories by node id; no handle is needed.
    m.dev.reply(h.unique, 0, fusefast.open_out(0, 0))


def _empty(m: GuestMount, h, body) -> None:
    m.dev.reply(h.unique, 0)  # RELEASEDIR, ACCESS (default_permissions checks modes)


def _interrupt(m: GuestMount, h, body) -> None:
    # A SETLKW waiting for another owner's lock ends (the caller got a signal,
    # or died): the host ends its wait, and answers EINTR, or 0 if it took the
    # lock first, which the kernel then releases with the caller's files.  Every
    # other request runs to completion and is answered normally.
    target = InterruptIn.parse(bytes(body[:8])).unique
    waiting = m.lock_waits.get(target)
    if waiting is not None:
        m.client.interrupt(*waiting)
    elif target in m.interruptible:  # its task has not run yet
        m.interrupted.add(target)


def _destroy(m: GuestMount, h, body) -> None:
    m.dev.reply(h.unique, 0)
    m.request_stop("the kernel sent DESTROY")


LOCAL = {
    Opcode.INIT: _init,
    Opcode.FORGET: _forget,
    Opcode.BATCH_FORGET: _batch_forget,
    Opcode.OPENDIR: _opendir,
    Opcode.RELEASEDIR: _empty,
    Opcode.ACCESS: _empty,
    Opcode.INTERRUPT: _interrupt,
    Opcode.DESTROY: _destroy,
}

