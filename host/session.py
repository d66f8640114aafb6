"""One guest's session as the daemon sees it, and the daemon's configuration and counters.

A `Session` exists from the moment a connection is accepted; it serves file
requests once its handshake (HELLO, and AUTH where a token is set) is over.
It knows its own liveness: from when its term was last renewed, and so until
when it may still serve from its cache (`lease_expiry`), and whether a reply
may renew it now (`renews`).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from host.leases import term_end
from host.limits import FlowControl
from protocol import wire
from protocol.connection import Connection, Role, State
from protocol.messages import Granularity, Policy


def printable(text: str, limit: int = 80) -> str:
    """`text` from a peer, safe for one log line: every character outside
    printable ASCII (newlines, escapes, anything a terminal would act on) is
    written as a Python escape, and at most `limit` characters are kept."""
    escaped = text.encode("unicode_escape").decode("ascii")
    return escaped if len(escaped) <= limit else escaped[:limit] + "..."


def peer_address(transport: asyncio.BaseTransport) -> str:
    """The peer's address without its port, the key of per-peer limits; every
    Unix-socket peer is "unix" (only the daemon's own user can connect)."""
    peer = transport.get_extra_info("peername")
    if isinstance(peer, tuple) and peer:
        return str(peer[0])
    return "unix"


@dataclass
class HostConfig:
    export: str
    policy: Policy = Policy.CLEAN_LEASE
    lease_term_ms: int = 2000
    ack_timeout_ms: int = 500
    clean_after_ms: int = 20
    # What an invalidation of a regular file recalls under clean-lease: the
    # whole inode, or only the pages that change (docs/design.md, "Range granularity").
    granularity: Granularity = Granularity.RANGE
    ttl_ms: int = 1000
    max_frame: int = wire.DEFAULT_MAX_FRAME
    max_in_flight: int = 256
    max_sessions: int = 64
    max_handles_per_guest: int = 1024
    # With a token, every connection must prove it knows it (protocol/auth.py)
    # before anything else is served.
    token: bytes | None = None
    # A connection that has not finished HELLO (and AUTH) by then is closed, so
    # that silent or slow peers cannot hold sockets; at most max_handshakes may
    # be that far at once, at most handshakes_per_peer of them from one address.
    handshake_timeout_ms: int = 5000
    max_handshakes: int = 64
    handshakes_per_peer: int = 8
    # host/limits.py, FlowControl: a session's unsent output, and its requests
    # in flight, in bytes; a session whose output stays over its bound this
    # long is disconnected; a started frame must be complete this long after.
    output_bound: int = 1 << 20
    input_bound: int = 16 << 20
    output_timeout_ms: int = 5000
    frame_timeout_ms: int = 10000
    # An authenticated session that sends nothing for this long, has no open
    # handle and no live lease term (host/server.py, `_idle_sweep`) is closed.
    idle_timeout_ms: int = 60000
    # A wrong token is refused after this delay, doubled per recent failure of
    # the same peer address, at most wrong_token_max_delay_ms.
    wrong_token_delay_ms: int = 100
    wrong_token_max_delay_ms: int = 2000
    # Node ids one guest may hold; None: a quarter of the descriptor budget
    # (host/limits.py, FdBudget).  max_handles_per_guest is capped the same way.
    max_nodeids_per_guest: int | None = None
    # The descriptor limit to budget; None: RLIMIT_NOFILE's soft limit now.
    fd_limit: int | None = None


@dataclass
class HostStats:
    sessions: int = 0
    auth_failures: int = 0
    handshakes_refused: int = 0  # too many at once, or not finished in time
    requests: int = 0
    errors: int = 0
    protocol_errors: int = 0
    invalidations_sent: int = 0
    inval_entries_sent: int = 0
    acks: int = 0
    recalls: int = 0
    fenced: int = 0
    flushes: int = 0
    rearms: int = 0
    rearm_refused: int = 0
    bytes_to_guests: int = 0
    host_local_events: int = 0
    recall_wait_max_ns: int = 0  # the longest a recall has taken (there were `recalls`)
    # Holders whose connection was lost while they held a lease: a recall
    # waited for their term to run out (a mount's kernel keeps its pages).
    departed_waits: int = 0
    renewals_withheld: int = 0  # replies sent with LEASE_NOT_RENEWED (an ACK was owed)
    noreply_errors: int = 0  # requests without a reply (FORGET) that failed
    # Replies to guests that cache unleased replies (mounts) held back until a
    # recall and the modifications behind it were over (docs/design.md,
    # "Readers during a recall").
    unleased_reads_held: int = 0
    # Guests recalled again once a modification landed: they were sent the
    # inode without a lease while its recall ran, and could not be held back
    # (they owed its ACK, or asked by LOOKUP).
    late_recalls: int = 0
    writes_inside_recall: int = 0  # modifications by a guest owing that recall's ACK
    # host/limits.py: what the budgets did
    output_paused: int = 0  # times a session's output went over its bound (reading paused)
    output_stuck: int = 0  # sessions disconnected for staying over it
    slow_frames: int = 0  # sessions disconnected for a frame not complete in time
    idle_closed: int = 0  # authenticated sessions closed for idleness
    handshakes_per_peer_refused: int = 0  # a peer address held all its handshake slots
    handshakes_evicted: int = 0  # the oldest handshake of the busiest peer, for a newcomer
    wrong_token_delays_ms: int = 0  # total delay before refusing wrong tokens
    fd_refusals: int = 0  # EMFILE/ENFILE from the descriptor budget
    unsupported_noreply: int = 0  # unknown opcodes without NEED_REPLY (no reply sent)
    # host/witness.py: witness connections bound, PURGEs sent, PURGEDs that ended waits
    witnesses: int = 0
    purges_asked: int = 0
    witnessed_purges: int = 0

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        del d["recall_wait_max_ns"]
        d["recall_wait_ns"] = {"count": self.recalls, "max": self.recall_wait_max_ns}
        return d


class Session:
    """One connected guest: its connection, its handles' write modes, its liveness."""

    def __init__(self, config: HostConfig, stats: HostStats, transport: asyncio.Transport, *,
                 clock=time.monotonic):
        self.config = config
        self.stats = stats
        self.transport = transport
        self.conn = Connection(Role.HOST, max_frame=config.max_frame,
                               max_in_flight=config.max_in_flight)
        self.guest_id = 0
        self.name = "?"
        self.client_id = bytes(16)
        # Its cache keeps what unleased replies carry (HELLO: FEATURE_CACHES_UNLEASED).
        self.caches_unleased = False
        self.noreply_error_logged = False
        self.last_seen = clock()
        # The latest instant from which the host renewed this guest's term: the
        # arrival of a request (or HEARTBEAT) whose reply renewed it.  No reply
        # renews while an invalidation is owed (`acks`), so while the host waits
        # for an ACK, this, and the instant it may fence at, stand still.
        self.renewed_at = self.last_seen
        self.fenced = False
        self.closed = False
        self.write_handles: dict[int, int] = {}  # fh -> nodeid, for open-lease
        self.acks: dict[int, asyncio.Future] = {}
        # SETLKWs waiting (unique -> a future an INTERRUPT resolves), and the
        # INTERRUPTs that came before the request they name was seen (a few).
        self.lock_waits: dict[int, asyncio.Future] = {}
        self.interrupted_early: dict[int, None] = {}
        self._owing: asyncio.Future | None = None  # when_owing
        self.host_nonce = b""  # the AUTH challenge sent in the HELLO reply
        self.handshake_timer: asyncio.TimerHandle | None = None
        self.peer = peer_address(transport)
        self.peer_slot = False  # holds one of its peer's handshake slots (host/limits.py)
        self.accepted_at = self.last_seen
        self.flow: FlowControl | None = None  # set by the daemon (host/limits.py)
        self.unsupported_logged = False
        self.draining = False  # frames left for the next turn (HostDaemon._drain)
        # host/witness.py.  A guest's witness: the connection of a process of its
        # own (a mount's watchdog) that can purge the guest's kernel caches.
        self.witness: "Session | None" = None
        self.witness_of = 0  # this connection is the witness of that guest id
        self._purged: asyncio.Future | None = None

    def purged(self) -> asyncio.Future:
        """A future that resolves once this guest's witness has reported that its
        caches are purged (PURGED): it serves nothing from then on."""
        if self._purged is None:
            self._purged = asyncio.get_running_loop().create_future()
        return self._purged

    @property
    def is_purged(self) -> bool:
        return self._purged is not None and self._purged.done()

    def send(self, message) -> None:
        """Write `message`; dropped if the connection has failed or is closing (the
        guest is gone, or about to be: nothing it could still use is lost)."""
        if self.closed or self.transport.is_closing() or self.conn.state in (State.ERROR,
                                                                              State.CLOSED):
            return
        data = self.conn.send(message)
        self.stats.bytes_to_guests += len(data)
        self.transport.write(data)

    def owe(self, seq: int, ack: asyncio.Future) -> None:
        """An invalidation `seq` is being sent to this guest; `ack` resolves on its
        ACK.  From now on no reply renews its term (`renews`), and whoever
        waits in `when_owing` is woken."""
        self.acks[seq] = ack
        if self._owing is not None:
            self._owing.set_result(None)
            self._owing = None

    def when_owing(self) -> asyncio.Future:
        """A future that resolves when this guest next starts to owe an ACK (`owe`)."""
        if self._owing is None:
            self._owing = asyncio.get_running_loop().create_future()
        return self._owing

    def lease_expiry(self) -> float:
        """The instant after which this guest surely serves nothing from its cache,
        clock margins included (host/leases.py, `term_end`)."""
        return term_end(self.renewed_at, self.config.lease_term_ms / 1000.0)

    def renews(self, received_at: float) -> bool:
        """May a reply to a frame received at `received_at` renew this guest's term?

        Not while an invalidation sent to it is unACKed, nor once it is fenced.
        When it may, the term is counted from `received_at` from now on."""
        if self.fenced or self.acks:
            return False
        if received_at > self.renewed_at:
            self.renewed_at = received_at
        return True
