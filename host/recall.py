"""Carrying out a recall: invalidate every holder, then wait for each ACK or fence.

The lease table (host/leases.py) decides *whom* to recall; this module does
it, over the sessions: one INVALIDATE or INVAL_ENTRY to each holder that is
connected, then a concurrent wait for each of them, so that however many are
silent the wait is at most ack timeout + term (+ the clock margin).  It also
keeps the holders whose connection was lost (`departed`): a lost connection
is not an ACK, since a guest that mounted the export may still serve its
kernel's pages, so such a holder is waited for until its term has surely run
out, and only then forgotten.

A holder with a witness (host/witness.py: a mount's watchdog, connected on
its own) is asked to purge at the ack timeout, or at once when its connection
was lost, and the wait ends at its report (PURGED) if that comes before the
end of its term.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from host.leases import LeaseTable, Recall
from host.session import HostConfig, HostStats, Session
from protocol import wire
from protocol.errors import ProtocolError
from protocol.messages import Invalidate

log = logging.getLogger("cleanlease.host")


@dataclass
class _Running:
    """A data recall under way: the holders whose ACK it still waits for, those
    whose lost connection it waits out (`departed`), and a future that resolves
    when it is over."""

    ino: int
    owed: set[int]
    over: asyncio.Future
    departed: set[int] = field(default_factory=set)


class Recaller:
    """Recalls over `sessions` (the daemon's, by guest id, those still connected)."""

    def __init__(self, config: HostConfig, stats: HostStats, leases: LeaseTable,
                 sessions: dict[int, Session], forget_guest: Callable[[int], None], *,
                 ask_witness: Callable[[Session, int], bool] = lambda session, reason: False,
                 clock: Callable[[], float] = time.monotonic):
        self.config = config
        self.clock = clock  # the daemon's (seconds); its timers are the running loop's
        self.stats = stats
        self.leases = leases
        self.sessions = sessions
        self.forget_guest = forget_guest  # a guest's term ran out: drop what it held
        self.ask_witness = ask_witness  # (session, wire.PURGE_*): False if it has no witness
        self.departed: dict[int, Session] = {}  # lost connections whose term runs on
        self._next_seq = 1
        self._running: dict[int, list[_Running]] = {}  # inode -> its data recalls now running
        # inode -> guest -> modifications of it that the guest sent while it owed
        # the ACK of a recall of it (`writing_while_owing`)
        self._owing_writers: dict[int, dict[int, int]] = {}
        self._changed: dict[int, asyncio.Future] = {}  # woken when who is owed changes

    def connection_lost(self, session: Session) -> None:
        """`session` (no longer in `sessions`) lost its connection.  Unless its term
        is over, it stays a silent holder until its term has surely run out: of
        what it holds, and of what a recall decided a moment ago, whose
        invalidations are not sent yet (so "holds nothing now" is no reason to
        forget it).  Its node ids stay known meanwhile (a lease is kept by node
        id, and a writer looking the file up again must find the same one)."""
        remaining = session.lease_expiry() - self.clock()
        if session.fenced or remaining <= 0:
            self.forget_guest(session.guest_id)
            return
        self.departed[session.guest_id] = session
        asyncio.get_running_loop().call_later(remaining, self._term_ran_out, session)
        self.ask_witness(session, wire.PURGE_DEPARTED)

    def _term_ran_out(self, session: Session) -> None:
        if self.departed.pop(session.guest_id, None) is session:
            self.forget_guest(session.guest_id)

    def purged(self, session: Session) -> None:
        """`session`'s witness reported it purged: it serves nothing any more.
        It is fenced (it must say HELLO again), every wait for it ends (they
        wait on `Session.purged`), and if its connection was lost it holds
        nothing any more."""
        self._fence(session)
        session.purged().set_result(None)
        self._term_ran_out(session)

    def _fence(self, session: Session) -> None:
        """`session` can serve nothing any more: its leases go, and its next
        frame of any kind is answered EKEYEXPIRED."""
        session.fenced = True
        self.leases.drop_holder(session.guest_id)

    def owes(self, ino: int, guest: int) -> bool:
        """Does `guest` owe the ACK of a data recall of `ino` now running?  Then
        its purge of `ino` may be waiting for a page lock its kernel holds for
        a READ of `ino`: such a READ must be answered, not held."""
        return any(guest in recall.owed for recall in self._running.get(ino, ()))

    def _poke(self, ino: int) -> None:
        changed = self._changed.pop(ino, None)
        if changed is not None and not changed.done():
            changed.set_result(None)

    def owing_writer_begins(self, ino: int, guest: int) -> None:
        """`guest` owes the ACK of a data recall of `ino` and sent a modification
        of it (a WRITE laundering its kernel's dirty pages, which the purge for
        that ACK waits for): until `owing_writer_ends`, others' waits for the
        remaining ACKs (`others_acked`) do not wait for `guest`."""
        counts = self._owing_writers.setdefault(ino, {})
        counts[guest] = counts.get(guest, 0) + 1
        self._poke(ino)

    def owing_writer_ends(self, ino: int, guest: int) -> None:
        counts = self._owing_writers[ino]
        counts[guest] -= 1
        if not counts[guest]:
            del counts[guest]
        if not counts:
            del self._owing_writers[ino]
        self._poke(ino)

    async def others_acked(self, ino: int, guest: int) -> None:
        """Return once no data recall of `ino` waits for anybody but `guest` and
        other owing writers (`owing_writer_begins`): every other holder has
        ACKed, been fenced, or outlived its term; or once `guest` owes nothing
        any more.  Two guests that both launder while recalled wait for
        everyone but each other (docs/mount.md, "Shared writable mappings")."""
        while self.owes(ino, guest):
            writing = self._owing_writers.get(ino, {})
            others = set()
            for recall in self._running.get(ino, ()):
                others |= recall.owed | recall.departed
            if not others - {guest} - writing.keys():
                return
            changed = self._changed.get(ino)
            if changed is None:
                changed = self._changed[ino] = asyncio.get_running_loop().create_future()
            await asyncio.shield(changed)

    async def running_over(self, ino: int) -> None:
        """Return once every data recall of `ino` running now is over."""
        runs = [r.over for r in self._running.get(ino, ())]
        if runs:
            await asyncio.wait(runs)

    async def carry_out(self, recall: Recall, make, *, data: bool = False) -> None:
        """Send one invalidation to each holder and wait for every ACK or fence.

        Invariant 2: this returns only when no holder can still serve the old
        data: it ACKed, or its term has surely run out (it was fenced, or its
        connection was lost that long ago).  The holders are waited for
        concurrently, so the wait is at most ack timeout + term (+ the clock
        margin) however many of them are silent (invariant 3).  With `data`
        (a recall of an inode's data), the holders that have not ACKed yet
        are known meanwhile (`owes`).
        """
        started = int(self.clock() * 1e9)
        self.stats.recalls += 1
        running = _Running(recall.ino, set(), asyncio.get_running_loop().create_future())
        if data:
            self._running.setdefault(recall.ino, []).append(running)
        try:
            waits = []
            for guest in recall.holders:
                session = self.sessions.get(guest)
                if session is not None and not session.closed and not session.fenced:
                    running.owed.add(guest)
                    waits.append(self._await_ack(session, self._send_invalidation(session, make),
                                                 running))
                elif (departed := self.departed.get(guest)) is not None:
                    self.stats.departed_waits += 1
                    # Asked at its connection's loss already; asked again where a
                    # wait for it begins (harmless: a witness purges once), so a
                    # PURGE also says that a recall now waits for its report.
                    self.ask_witness(departed, wire.PURGE_DEPARTED)
                    running.departed.add(guest)
                    waits.append(self._await_term_end(departed, running))
            await asyncio.gather(*waits)
        finally:
            if data:
                runs = self._running[recall.ino]
                runs.remove(running)
                if not runs:
                    del self._running[recall.ino]
                running.over.set_result(None)
                self._poke(recall.ino)
            waited = int(self.clock() * 1e9) - started
            self.stats.recall_wait_max_ns = max(self.stats.recall_wait_max_ns, waited)

    def _send_invalidation(self, session: Session, make) -> asyncio.Future:
        """Send `make(seq)` to `session`; returns the future of its ACK.  If it
        cannot be sent, the connection is closed: a lost one, never ACKed."""
        seq = self._next_seq
        self._next_seq += 1
        message = make(seq)
        ack = asyncio.get_running_loop().create_future()
        session.owe(seq, ack)  # from now on no reply renews this guest's term
        try:
            session.send(message)
        except ProtocolError:
            session.transport.abort()
        if isinstance(message, Invalidate):
            self.stats.invalidations_sent += 1
        else:
            self.stats.inval_entries_sent += 1
        return ack

    async def _await_ack(self, session: Session, ack: asyncio.Future, running: "_Running") -> None:
        """Wait for one holder's ACK: up to the ack timeout, or up to the end of
        its term if that is later.  A holder that has not ACKed by then is
        fenced: its term has surely run out, so it serves nothing any more.
        A lost connection is not an ACK: its future is never resolved."""
        # Its term stands still from the moment the invalidation was sent
        # (Session.renews), so this limit cannot move however busy it is.
        ack_timeout = self.config.ack_timeout_ms / 1000.0
        limit = max(ack_timeout, session.lease_expiry() - self.clock())
        purged = session.purged()
        try:
            if await _first(ack, purged, timeout=ack_timeout) is ack:
                return
            if not purged.done() and self.ask_witness(session, wire.PURGE_SILENT):
                # Its witness purges it now: the wait ends at its PURGED.
                log.warning("guest %s (%d) did not ACK in %d ms; asked its witness to purge it",
                            session.name, session.guest_id, self.config.ack_timeout_ms)
            if not purged.done():
                if await _first(ack, purged, timeout=limit - ack_timeout) is ack:
                    return
        finally:
            running.owed.discard(session.guest_id)
            self._poke(running.ino)
        if purged.done():
            return  # `purged` fenced it
        log.warning("guest %s (%d) did not ACK; fenced after its lease term", session.name,
                    session.guest_id)
        self.stats.fenced += 1
        self._fence(session)

    async def _await_term_end(self, session: Session, running: _Running) -> None:
        """A holder whose connection was lost: wait until its term has surely run
        out, or until its witness reports it purged."""
        remaining = session.lease_expiry() - self.clock()
        try:
            if remaining > 0:
                await _first(session.purged(), timeout=remaining)
        finally:
            running.departed.discard(session.guest_id)
            self._poke(running.ino)


async def _first(*futures: asyncio.Future, timeout: float) -> asyncio.Future | None:
    """The first of `futures` to be done within `timeout` seconds, or None.
    None of them is cancelled (asyncio.wait leaves them be)."""
    for future in futures:
        if future.done():
            return future
    if timeout > 0:
        await asyncio.wait(futures, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    for future in futures:
        if future.done():
            return future
    return None
