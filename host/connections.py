"""A connection's way in, and the budgets' verdicts on it.

A mixin of `HostDaemon`: accepting a connection (`accept`), its handshake
(HELLO, and AUTH where a token is set) with its timeout and its slots (per
address, and the oldest of the busiest address giving way to a newcomer),
registering the session, and what the budgets of `host/limits.py` decide
about a session (output stuck, a frame trickling, idle, descriptors refused).
It uses the daemon's state, set up by `HostDaemon.__init__`.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import logging
import os
import socket
import struct

from host.limits import SMALL_REPLY, FlowControl
from host.session import Session, printable
from protocol import auth, wire
from protocol.messages import Auth, AuthReply, Hello, HelloReply

log = logging.getLogger("cleanlease.host")


class Connections:
    """Mixin of `HostDaemon`: accepting connections and their handshake (see the module)."""

    # --- connections and the handshake -----------------------------------------

    def accept(self, transport: asyncio.Transport) -> Session:
        """A new connection.  It gets `handshake_timeout_ms` to finish HELLO (and
        AUTH).  Its peer address may have at most `handshakes_per_peer` under
        way (beyond, it is closed at once); when all `max_handshakes` slots
        are taken, the oldest handshake of the peer holding the most slots
        makes room for it, so peers that flood cannot lock a newcomer out."""
        cfg = self.config
        session = Session(cfg, self.stats, transport, clock=self.clock)
        session.flow = FlowControl(
            transport, output_bound=cfg.output_bound, input_bound=cfg.input_bound,
            output_timeout=cfg.output_timeout_ms / 1000.0,
            frame_timeout=cfg.frame_timeout_ms / 1000.0,
            on_stuck=functools.partial(self._output_stuck, session),
            on_slow_frame=functools.partial(self._slow_frame, session), small_reply=SMALL_REPLY)
        if session.peer != "unix" and not self.peers.handshake_slot(session.peer):
            self.stats.handshakes_per_peer_refused += 1
            self.throttled.warning("handshakes per address",
                                   "connection %s: its address has %d handshakes under way "
                                   "already, refusing another", peer_name(session), cfg.handshakes_per_peer)
            session.closed = True
            transport.abort()
            return session
        session.peer_slot = session.peer != "unix"
        if len(self._handshaking) >= cfg.max_handshakes and not self._evict_a_handshake(session):
            self.stats.handshakes_refused += 1
            self.throttled.warning("handshake slots full",
                                   "%d connections are still in their handshake: refusing another",
                                   len(self._handshaking))
            self._end_handshake(session)
            session.closed = True
            transport.abort()
            return session
        self._handshaking[session] = None
        session.handshake_timer = asyncio.get_running_loop().call_later(
            self.config.handshake_timeout_ms / 1000.0, self._handshake_expired, session)
        return session

    def _handshake_expired(self, session: Session) -> None:
        if session in self._handshaking:
            self.stats.handshakes_refused += 1
            self.throttled.warning("handshake timeout",
                                   "connection %s: no finished handshake in %d ms, closing",
                                   peer_name(session), self.config.handshake_timeout_ms)
            session.transport.abort()

    def _evict_a_handshake(self, newcomer: Session) -> bool:
        """Close the oldest handshake of the peer address holding the most slots,
        if it holds more than the newcomer's; False if none qualifies."""
        counts: dict[str, int] = {}
        for other in self._handshaking:
            counts[other.peer] = counts.get(other.peer, 0) + 1
        busiest = max(counts, key=counts.get, default=None)
        if busiest is None or counts[busiest] <= counts.get(newcomer.peer, 0):
            return False
        oldest = min((other for other in self._handshaking if other.peer == busiest),
                     key=lambda other: other.accepted_at)
        self.stats.handshakes_evicted += 1
        self.throttled.warning("handshake evicted",
                               "handshake slots full: closing the oldest handshake of %s "
                               "(it holds %d) for a connection from %s", printable(busiest), counts[busiest],
                               printable(newcomer.peer))
        self._end_handshake(oldest)
        oldest.transport.abort()
        return True

    def _end_handshake(self, session: Session) -> None:
        self._handshaking.pop(session, None)
        if session.handshake_timer is not None:
            session.handshake_timer.cancel()
        if session.peer_slot:
            session.peer_slot = False
            self.peers.handshake_over(session.peer)

    def _register(self, session: Session) -> None:
        """The handshake is over: `session` is served from now on."""
        self._end_handshake(session)
        self.sessions[session.guest_id] = session
        self.stats.sessions += 1
        log.info("guest %s connected as %d", session.name, session.guest_id)

    def _hello(self, session: Session, hello: Hello) -> None:
        cfg = self.config
        error = 0
        if hello.version != wire.PROTOCOL_VERSION:
            error = -errno.EPROTO
        elif len(self.sessions) >= cfg.max_sessions:
            error = -errno.EUSERS
        max_frame = max(wire.MIN_MAX_FRAME, min(cfg.max_frame, hello.max_frame))
        features = hello.features & wire.NEGOTIABLE_FEATURES
        nonce = bytes(wire.NONCE_SIZE)
        guest_id = 0
        if error == 0:
            guest_id = self._next_guest_id
            self._next_guest_id += 1
            # Only ever logged: never raw (a peer could forge log lines).
            session.guest_id, session.name = guest_id, printable(hello.name)
            session.client_id = hello.client_id
            session.caches_unleased = bool(features & wire.FEATURE_CACHES_UNLEASED)
            if cfg.token is not None:
                # The host decides, whatever the guest offered.
                features |= wire.FEATURE_AUTH
                nonce = session.host_nonce = auth.new_nonce()
        session.send(HelloReply(error, wire.PROTOCOL_VERSION, features, cfg.policy,
                                self.detector.kind, cfg.lease_term_ms, cfg.ttl_ms, max_frame,
                                guest_id, self.boot_id, nonce, self.granularity))
        if error:
            session.transport.close()
        elif cfg.token is None:
            self._register(session)

    def _auth(self, session: Session, message: Auth) -> None:
        """Check the guest's proof; answer with ours, or refuse and close."""
        token = self.config.token
        expected = auth.guest_proof(token, session.host_nonce, message.nonce)
        if not auth.proof_matches(expected, message.proof):
            self.stats.auth_failures += 1
            delay = self.peers.wrong_token_delay(session.peer)
            self.stats.wrong_token_delays_ms += int(delay * 1000)
            self.throttled.warning("wrong token",
                                   "connection %s (%s): wrong token, refusing it in %d ms",
                                   peer_name(session), session.name, delay * 1000)
            asyncio.get_running_loop().call_later(delay, self._refuse_token, session)
            return
        if len(self.sessions) >= self.config.max_sessions:
            session.send(AuthReply(-errno.EUSERS))
            session.transport.close()
            return
        session.send(AuthReply(0, auth.host_proof(token, message.nonce, session.host_nonce)))
        self._register(session)

    def _refuse_token(self, session: Session) -> None:
        session.send(AuthReply(-errno.EACCES))
        session.transport.close()

    # --- the budgets' verdicts (host/limits.py) -----------------------------------

    def _output_stuck(self, session: Session) -> None:
        self.stats.output_stuck += 1
        self.throttled.warning("output stuck",
                               "guest %s (%d): %d bytes of replies unread for %d ms, disconnecting",
                               session.name, session.guest_id,
                               session.transport.get_write_buffer_size(),
                               self.config.output_timeout_ms)
        reset(session.transport)

    def _slow_frame(self, session: Session) -> None:
        self.stats.slow_frames += 1
        self.throttled.warning("slow frame",
                               "connection %s, guest %s (%d): a frame not complete %d ms "
                               "after it began, disconnecting", peer_name(session), session.name, session.guest_id,
                               self.config.frame_timeout_ms)
        session.transport.abort()

    def _schedule_idle_sweep(self) -> None:
        period = max(0.05, self.config.idle_timeout_ms / 4000.0)
        self._idle_timer = asyncio.get_running_loop().call_later(period, self._idle_sweep)

    def _idle_sweep(self) -> None:
        """Close authenticated sessions that sent nothing for `idle_timeout_ms`,
        hold no open handle and no live lease term (a session holding leases
        must heartbeat within its term anyway; under a policy without leases,
        one that holds no node id either): they would hold a session slot for
        ever (EUSERS for newcomers)."""
        self._schedule_idle_sweep()
        now = self.clock()
        idle = self.config.idle_timeout_ms / 1000.0
        for session in list(self.sessions.values()):
            if session.closed or now - session.last_seen < idle:
                continue
            if self.fs.handles_of(session.guest_id) or session.conn.outstanding_requests:
                continue
            if session.witness_of and self._witnessed(session) is not None:
                continue  # a witness speaks only when its guest falls silent
            if self.leases.leasing:
                if session.lease_expiry() > now:
                    continue
            elif self.fs.inodes.held_by(session.guest_id):
                continue
            self.stats.idle_closed += 1
            self.throttled.info("idle session",
                                "guest %s (%d): nothing sent for %d ms, no handle, no live lease: "
                                "closing its session", session.name, session.guest_id,
                                self.config.idle_timeout_ms)
            session.transport.close()

    def _fd_refused(self, session: Session, exc: OSError) -> None:
        """A lookup or open was refused by the descriptor budget: counted, and
        logged at most once every 10 s."""
        self.stats.fd_refusals += 1
        self.throttled.warning("descriptor budget", "guest %s (%d): %s (%s; %d refusals so far)",
                               session.name, session.guest_id, os.strerror(exc.errno),
                               exc.strerror, self.stats.fd_refusals)


def reset(transport: asyncio.Transport) -> None:
    """Abort with a TCP reset: a plain close would leave the unsent replies to the
    kernel, which keeps trying to deliver them (and its FIN after them) to a
    peer that does not read."""
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    transport.abort()


def peer_name(session: Session) -> str:
    """Where a connection comes from, for logs (a Unix socket peer has no name)."""
    peer = session.transport.get_extra_info("peername")
    return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "unix"
