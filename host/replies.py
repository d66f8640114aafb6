"""The reply cache: a retried non-idempotent request is carried out at most once.

A guest that loses its connection cannot know whether a WRITE it had sent was
carried out: the request may have landed and only its reply been lost.
Repeating it blindly could undo a later write of another guest (the retry
lands again on top of it) or append twice.  So a guest names itself in HELLO
with a `client_id` it keeps across reconnections, retries with the same
`unique`, and the daemon answers a (client_id, unique) it has seen from here:
with the reply of the first attempt, once that attempt has finished.

Kept: the last `per_client` requests of each client (a guest cannot have
more outstanding than its connection's `max_in_flight`, so a retried request
is always among them), and at most `total` in all, the oldest going first
whoever sent them.  So a retry is carried out at most once unless more than
`total` (65,536 by default) non-idempotent requests arrive from others between
the lost reply and the retry.  Only for this boot of the daemon: after a
restart the guest sees a new boot id and fails such a retry instead
(guest/client.py).
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict

from protocol.fuse import Opcode
from protocol.messages import FsRequest

# Requests whose repetition differs from doing them once.
# (A second SYMLINK, LINK or MKNOD says EEXIST, a second XATTR_CREATE EEXIST, a
# second REMOVEXATTR ENODATA, a second RENAME2 of two names exchanges them back.)
_NOT_IDEMPOTENT = frozenset({Opcode.WRITE, Opcode.SETATTR, Opcode.CREATE, Opcode.MKDIR,
                             Opcode.UNLINK, Opcode.RMDIR, Opcode.RENAME, Opcode.SYMLINK,
                             Opcode.LINK, Opcode.MKNOD, Opcode.RENAME2, Opcode.SETXATTR,
                             Opcode.REMOVEXATTR, Opcode.FALLOCATE, Opcode.COPY_FILE_RANGE})
NO_CLIENT_ID = bytes(16)


def needs_reply_cache(request: FsRequest) -> bool:
    """True for requests that must be carried out at most once.  (An OPEN with
    O_TRUNC is not among them: its reply names a handle of the session it was
    opened on, so the guest does not retry it.)"""
    return request.opcode in _NOT_IDEMPOTENT


class ReplyCache:
    """(client_id, unique) -> the future of the first attempt's reply."""

    def __init__(self, per_client: int, total: int = 65536):
        self.per_client = per_client
        self.total = total
        self._replies: OrderedDict[tuple[bytes, int], asyncio.Future] = OrderedDict()
        self._per_client: dict[bytes, int] = {}
        self.answered = 0  # retries answered from here

    def first_attempt(self, client_id: bytes, unique: int) -> asyncio.Future | None:
        """The future of an earlier attempt of this request, or None: then this is
        the first, and the caller must `record` it and resolve what it returns
        (with the reply, or with None if it was not carried out after all)."""
        earlier = self._replies.get((client_id, unique))
        if earlier is not None:
            self.answered += 1
        return earlier

    def forget(self, client_id: bytes, unique: int) -> None:
        """The attempt recorded for (client_id, unique) was not carried out."""
        if self._replies.pop((client_id, unique), None) is not None:
            self._uncount(client_id)

    def record(self, client_id: bytes, unique: int) -> asyncio.Future:
        """Register the first attempt; resolve the returned future with its reply."""
        future = asyncio.get_running_loop().create_future()
        self._replies[(client_id, unique)] = future
        count = self._per_client[client_id] = self._per_client.get(client_id, 0) + 1
        if count > self.per_client:
            self._drop_oldest_of(client_id)
        while len(self._replies) > self.total:
            (oldest_client, _), _ = self._replies.popitem(last=False)
            self._uncount(oldest_client)
        return future

    def __len__(self) -> int:
        return len(self._replies)

    def _drop_oldest_of(self, client_id: bytes) -> None:
        for key in self._replies:  # oldest first (a linear scan at worst: fine at these sizes)
            if key[0] == client_id:
                del self._replies[key]
                self._uncount(client_id)
                return

    def _uncount(self, client_id: bytes) -> None:
        count = self._per_client[client_id] - 1
        if count:
            self._per_client[client_id] = count
        else:
            del self._per_client[client_id]
