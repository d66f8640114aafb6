"""Forwarded requests of the file system as a whole: STATFS (the export's own
figures, so df tells the truth) and FSYNCDIR."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from protocol import fuse
from protocol.messages import Fsyncdir, Statfs

if TYPE_CHECKING:  # the mount imports these handlers: name its type only for checkers
    from guest.mount.core import GuestMount


async def statfs(m: GuestMount, h, body) -> bytes:
    reply = await m.ask(h, Statfs())
    return fuse.StatfsOut.build(dataclasses.asdict(reply.body))


async def fsyncdir(m: GuestMount, h, body) -> bytes:
    arg = fuse.FsyncIn.parse(bytes(body))
    await m.ask(h, Fsyncdir(arg.fh, arg.fsync_flags))
    return b""
