"""Simulated connections: ordered byte streams between a guest node and the host node.

Each connection is two one-way streams.  A write is delivered, in order, to
the other end's asyncio protocol (`data_received`), in the receiving node's
context, after a seeded delay: usually a fraction of a millisecond,
sometimes a stall of up to `stall_max_s` (a congested link, a descheduled
vCPU); a write may arrive cut into pieces (the receiver's framing must
reassemble it).  The protocols are the project's own (`host.server`'s
`_GuestProtocol`, `guest.client`'s `_ClientProtocol`); only the transport
under them is simulated.

Endings, as a socket's:
* `close()`: what was written is still delivered, then the peer sees EOF
  (`eof_received`, then `connection_lost`); this end's `connection_lost`
  follows at once.
* `abort()` (and `Network.cut`, a failing network): what is still on its way
  is dropped, and both ends see `connection_lost`.
"""

from __future__ import annotations

import asyncio
import collections
import random

from workload.dst.loop import Node, VirtualLoop


class _End(asyncio.Transport):
    """One end of a connection, as its protocol sees it."""

    def __init__(self, conn: "Connection", node: Node):
        super().__init__()
        self.conn = conn
        self.node = node
        self.protocol: asyncio.Protocol | None = None
        self.peer: "_End | None" = None
        self.closing = False  # no more writes from this end
        self.lost = False  # connection_lost was called (or is scheduled)
        self.made = False  # connection_made was called
        self.bytes_written = 0
        self._last_delivery = 0.0  # in-order: no delivery before the previous one
        self._inbox: collections.deque = collections.deque()  # what is on its way to this end

    # --- the transport API ------------------------------------------------------

    def write(self, data) -> None:
        if self.closing or self.conn.cut_at is not None:
            return
        data = bytes(data)
        if not data:
            return
        self.bytes_written += len(data)
        for piece in self.conn.net.pieces(data):
            self._send(("data", piece))

    def close(self) -> None:
        if self.closing:
            return
        self.closing = True
        self._send(("eof", None))
        self._lose_soon()

    def abort(self) -> None:
        self.conn.cut()

    def is_closing(self) -> bool:
        return self.closing  # a cut is known only once noticed (connection_lost)

    def get_extra_info(self, name, default=None):
        return default  # like a Unix socket: no peer name

    def can_write_eof(self) -> bool:
        return False

    def set_write_buffer_limits(self, high=None, low=None) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    # --- delivery ---------------------------------------------------------------

    def _send(self, item) -> None:
        net = self.conn.net
        at = max(self._last_delivery, net.loop.now + net.delay())
        self._last_delivery = at
        # Timers due at the same instant may fire in any order: each firing
        # delivers the oldest item on its way, so the stream stays in order.
        self.peer._inbox.append(item)
        net.loop.call_global_at(at, self.peer._deliver, self.conn.epoch,
                                context=self.peer.node.context)

    def _deliver(self, epoch: int) -> None:
        if epoch != self.conn.epoch or self.lost:
            return  # cut while on its way
        kind, data = self._inbox.popleft()
        if kind == "connect":
            self.made = True
            self.protocol.connection_made(self)
        elif kind == "data":
            self.conn.net.bytes_delivered += len(data)
            self.protocol.data_received(data)
        else:  # eof
            keep_open = self.protocol.eof_received()
            if not keep_open:
                self.closing = True
                self._lose_soon()

    def _notice_cut(self, error: Exception) -> None:
        self.closing = True
        self.protocol.connection_lost(error)

    def _lose_soon(self, exc: Exception | None = None) -> None:
        if self.lost or not self.made:
            return
        self.lost = True
        self.node.loop.call_soon(self.protocol.connection_lost, exc, context=self.node.context)


class Connection:
    """A guest's connection to the host."""

    def __init__(self, net: "Network", guest: Node, host: Node):
        self.net = net
        self.guest_end = _End(self, guest)
        self.host_end = _End(self, host)
        self.guest_end.peer, self.host_end.peer = self.host_end, self.guest_end
        self.epoch = 0
        self.cut_at: float | None = None

    def cut(self, guest_notices_after: float | None = None) -> None:
        """The network fails: nothing more arrives, both ends see the loss, each
        after a seeded delay; `guest_notices_after` makes the guest's end learn
        it only that much later (a partition: no RST reaches it)."""
        if self.cut_at is not None:
            return
        self.cut_at = self.net.loop.now
        self.epoch += 1
        self.net.cuts += 1
        error = ConnectionResetError("simulated: connection cut")
        for end in (self.guest_end, self.host_end):
            if end.made and not end.lost:
                end.lost = True
                delay = self.net.delay()
                if end is self.guest_end and guest_notices_after is not None:
                    delay = guest_notices_after
                self.net.loop.call_global_at(self.net.loop.now + delay, end._notice_cut, error,
                                             context=end.node.context)
            else:
                end.closing = True

    @property
    def open(self) -> bool:
        return self.cut_at is None and not (self.guest_end.lost and self.host_end.lost)


class Network:
    """Every connection of one simulation, and its seeded delays.

    `listener` is what a guest's dial reaches: a callable returning the host
    side's protocol and node, or None while no host listens (it restarts).
    """

    def __init__(self, loop: VirtualLoop, rng: random.Random, *, stall_p: float = 0.01,
                 stall_max_s: float = 0.3, split_p: float = 0.1):
        self.loop = loop
        self.rng = rng
        self.stall_p = stall_p
        self.stall_max_s = stall_max_s
        self.split_p = split_p
        self.listener = None
        self.connections: list[Connection] = []
        self.cuts = 0
        self.bytes_delivered = 0

    def delay(self) -> float:
        if self.rng.random() < self.stall_p:
            return self.rng.uniform(0.01, self.stall_max_s)
        return self.rng.uniform(0.00005, 0.0005)

    def pieces(self, data: bytes) -> list[bytes]:
        if len(data) < 2 or self.rng.random() >= self.split_p:
            return [data]
        cut = self.rng.randrange(1, len(data))
        return [data[:cut], data[cut:]]

    async def dial(self, guest: Node, protocol_factory) -> Connection:
        """A guest connects (what `GuestClient(dial=...)` calls, in the guest's node).

        Raises ConnectionRefusedError while no host listens."""
        await asyncio.sleep(self.delay())
        accepted = self.listener() if self.listener is not None else None
        if accepted is None:
            raise ConnectionRefusedError("simulated: no host listening")
        host_protocol, host_node = accepted
        conn = Connection(self, guest, host_node)
        conn.host_end.protocol = host_protocol
        conn.guest_end.protocol = protocol_factory()
        conn.guest_end._send(("connect", None))  # the host side's connection_made, first in order
        conn.guest_end.made = True
        conn.guest_end.protocol.connection_made(conn.guest_end)
        self.connections.append(conn)
        return conn

    def cut_all_of(self, node: Node) -> None:
        for conn in self.connections:
            if conn.open and node in (conn.guest_end.node, conn.host_end.node):
                conn.cut()

    def prune(self) -> None:
        self.connections = [c for c in self.connections if c.open]
