"""The reply cache: a retried non-idempotent request is carried out at most once.

A guest that loses its connection cannot know whether a WRITE it had sent was
carried out: the request may have landed and only its reply been lost.
Repeating it blindly could undo a later write of another guest (the retry
lands again on top of it) or append twice.  So a guest names itself in HELLO
with a `client_id` it keeps across reconnections, retries with the same
`unique`, and the daemon answers a (client_id, unique) it has seen from here:
with the reply of the first attempt, once that attempt has finished.

Kept per client, the last `per_client` requests (a guest cannot have more
outstanding than its connection's `max_in_flight`, so a retried request is
always among them), for at most `clients` clients (least recently used go
first).  Only for this boot of the daemon: after a restart the guest sees a
new boot id and fails such a retry instead (guest/client.py).
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict

from protocol.fuse import Opcode
from protocol.messages import FsRequest

# Requests whose repetition differs from doing them once.
_NOT_IDEMPOTENT = frozenset({Opcode.WRITE, Opcode.SETATTR, Opcode.CREATE, Opcode.MKDIR,
                             Opcode.UNLINK, Opcode.RMDIR, Opcode.RENAME})
NO_CLIENT_ID = bytes(16)


def needs_reply_cache(request: FsRequest) -> bool:
    """True for requests that must be carried out at most once.  (An OPEN with
    O_TRUNC is not among them: its reply names a handle of the session it was
    opened on, so the guest does not retry it.)"""
    return request.opcode in _NOT_IDEMPOTENT


class ReplyCache:
    """(client_id, unique) -> the future of the first attempt's reply."""

    def __init__(self, per_client: int, clients: int):
        self.per_client = per_client
        self.clients = clients
        self._by_client: OrderedDict[bytes, OrderedDict[int, asyncio.Future]] = OrderedDict()
        self.answered = 0  # retries answered from here

    def first_attempt(self, client_id: bytes, unique: int) -> asyncio.Future | None:
        """The future of an earlier attempt of this request, or None: then this is
        the first, and the caller must `record` it and resolve what it returns."""
        replies = self._by_client.get(client_id)
        if replies is None:
            return None
        self._by_client.move_to_end(client_id)
        earlier = replies.get(unique)
        if earlier is not None:
            self.answered += 1
        return earlier

    def record(self, client_id: bytes, unique: int) -> asyncio.Future:
        """Register the first attempt; resolve the returned future with its reply."""
        replies = self._by_client.get(client_id)
        if replies is None:
            replies = self._by_client[client_id] = OrderedDict()
            while len(self._by_client) > self.clients:
                self._by_client.popitem(last=False)
        self._by_client.move_to_end(client_id)
        future = asyncio.get_running_loop().create_future()
        replies[unique] = future
        while len(replies) > self.per_client:
            replies.popitem(last=False)
        return future
