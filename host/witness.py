"""Witnesses: a second connection per guest that can end a wait for it early.

A holder that does not ACK (stopped, wedged) or whose connection was lost
costs a writer up to the rest of its term: until then a mount's kernel may
still serve old pages, whatever the host does.  A mount has a watchdog, a
process of its own that holds the guest's /dev/fuse descriptor and can abort
the FUSE connection and purge every inode whatever the guest process does
(docs/mount.md, "When the term runs out").  With a *witness* connection to
the host, that watchdog can say when it has done so (PURGED), and the host
can ask it to (PURGE).  Such a report is as good as an ACK of every
invalidation the guest owes: after it, nothing of the guest is cached.  So:

* a silent holder with a witness is asked to purge at the ack timeout, and
  the wait ends at its PURGED, not at the end of its term;
* a holder whose connection was lost is asked at once (its watchdog has
  usually fired already: a mount voids itself when it loses the host);
* without a witness, or once the witness's own connection is gone, the wait
  is what it was: until the term has surely run out.

Binding (docs/protocol.md, section 8a): the witness's HELLO carries the same
client_id as its guest's (16 random bytes a guest never shows anyone else),
and its first request names the guest's id.  A client_id of zeros cannot be
witnessed.
"""

from __future__ import annotations

import errno
import hmac
import logging

from host.session import Session
from protocol import wire
from protocol.messages import Purge, Purged, Witness, WitnessReply

log = logging.getLogger("cleanlease.host")


class Witnesses:
    """Mixin of `HostDaemon`: binding witness connections and acting on them."""

    def _witness(self, session: Session, message: Witness) -> None:
        """Bind `session` as the witness of guest `message.guest_id`, or refuse and close."""
        target = self.sessions.get(message.guest_id)
        if target is None or target is session:
            error = -errno.ENOENT
        elif (target.client_id == bytes(wire.CLIENT_ID_SIZE)
              or not hmac.compare_digest(target.client_id, session.client_id)):
            error = -errno.EACCES
        elif target.witness is not None or target.witness_of or target.is_purged:
            error = -errno.EEXIST
        elif (session.conn.outstanding_requests or self.fs.handles_of(session.guest_id)
              or self.fs.inodes.held_by(session.guest_id)):
            error = -errno.EBUSY  # it was used as a guest already
        else:
            error = 0
        session.send(WitnessReply(error))
        if error:
            log.warning("connection %s: WITNESS of guest %d refused: %s", session.peer,
                        message.guest_id, errno.errorcode.get(-error, error))
            session.transport.close()
            return
        session.witness_of = target.guest_id
        target.witness = session
        self.stats.witnesses += 1
        log.info("guest %s (%d) has a witness (%d)", target.name, target.guest_id,
                 session.guest_id)

    def ask_witness(self, target: Session, reason: int) -> bool:
        """Ask `target`'s witness to purge it now.  False if it has none (any more)."""
        witness = target.witness
        if witness is None or witness.closed:
            return False
        self.stats.purges_asked += 1
        witness.send(Purge(reason))
        return True

    def _purged(self, witness: Session, message: Purged) -> None:
        """`witness` reports its guest purged: every wait for that guest ends."""
        target = self._witnessed(witness)
        if target is None or target.is_purged:
            return
        self.stats.witnessed_purges += 1
        log.warning("guest %s (%d): its witness purged it (%s, %d inodes); its waits are over",
                    target.name, target.guest_id, wire.PURGED_REASONS.get(message.reason, "?"),
                    message.inodes)
        self.recaller.purged(target)

    def _witnessed(self, witness: Session) -> Session | None:
        guest = witness.witness_of
        target = self.sessions.get(guest) or self.recaller.departed.get(guest)
        return target if target is not None and target.witness is witness else None

    def witness_lost(self, witness: Session) -> None:
        """A witness's connection went away: its guest is waited for as before."""
        target = self._witnessed(witness)
        if target is not None:
            target.witness = None

