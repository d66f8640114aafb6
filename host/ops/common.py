"""What every handler shares: its signature's types, and small helpers.

A handler is `async def handler(daemon, session, request) -> FsReply | None`:
it returns the reply (None for FORGET, which has none) or raises OSError,
which the daemon turns into an errno reply (host/server.py).
"""

from __future__ import annotations

import asyncio
import os
import stat
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING

from host.linux.credentials import Caller, acting_as
from host.session import Session
from protocol.messages import FsRequest

if TYPE_CHECKING:  # the daemon imports the handlers: name its type only for checkers
    from host.server import HostDaemon as Daemon
else:
    Daemon = object

__all__ = ["Daemon", "Session", "acting_as", "caller_of", "enter_together", "is_dir"]


def is_dir(st: os.stat_result) -> bool:
    return stat.S_ISDIR(st.st_mode)


async def enter_together(stack: AsyncExitStack, *managers) -> None:
    """Enter the async context managers `managers` at once, so that their waits
    (recalls) overlap instead of adding up, and push each one entered onto
    `stack`, which exits them.  If any fails to enter (or this is cancelled),
    the others still finish entering and are pushed, so that `stack` exits
    them too; the first error is raised."""
    entering = [asyncio.ensure_future(m.__aenter__()) for m in managers]
    try:
        await asyncio.wait(entering)
    except asyncio.CancelledError:
        for task in entering:
            task.cancel()
        while not all(task.done() for task in entering):
            try:
                await asyncio.wait(entering)
            except asyncio.CancelledError:
                continue
        error: BaseException | None = asyncio.CancelledError()
    else:
        error = None
    for manager, task in zip(managers, entering):
        if task.cancelled():
            error = error or asyncio.CancelledError()
        elif task.exception() is not None:
            error = error or task.exception()
        else:
            stack.push_async_exit(manager)
    if error is not None:
        raise error


def caller_of(r: FsRequest) -> Caller:
    """Who request `r` runs as on the host: its caller's uid, gid and groups.

    Use `with acting_as(caller_of(r)):` around the synchronous backend call
    (no await inside), or `await asyncio.to_thread(caller_of(r).run, fn, ...)`
    for a blocking call on a worker thread: credentials are per thread
    (host/linux/credentials.py)."""
    return Caller(r.uid, r.gid, r.groups)
