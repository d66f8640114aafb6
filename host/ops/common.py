"""What every handler shares: its signature's types, and small helpers.

A handler is `async def handler(daemon, session, request) -> FsReply | None`:
it returns the reply (None for FORGET, which has none) or raises OSError,
which the daemon turns into an errno reply (host/server.py).
"""

from __future__ import annotations

import os
import stat
from typing import TYPE_CHECKING

from host.session import Session

if TYPE_CHECKING:  # the daemon imports the handlers: name its type only for checkers
    from host.server import HostDaemon as Daemon
else:
    Daemon = object

__all__ = ["Daemon", "Session", "is_dir"]


def is_dir(st: os.stat_result) -> bool:
    return stat.S_ISDIR(st.st_mode)
