"""The lease state machine: who may cache which inode, and when that ends.

This module is pure: no I/O, no clock, no event loop.  The daemon
(`host/server.py`) asks it what to do and performs the I/O itself (sending
INVALIDATEs, waiting for ACKs, fdatasync, cachestat, kernel marks).  All five
policies are decided here, so a reader finds every caching rule in one place.

Clean-lease, per host inode (see docs/design.md for the picture):

    CLEAN --first modification--> RECALLING --all ACKed or fenced--> DIRTY
      ^                                                                 |
      +------------ flushed and checked clean (arm first) --------------+

* CLEAN: reads are answered with a lease; the reader joins `holders`.
* The first modification (a guest WRITE/SETATTR/..., or a host-local
  pre-modify event) bumps `generation`, empties `holders` into a `Recall`
  and moves to RECALLING.  The modification waits until the daemon reports
  the recall finished (`recall_finished`), begins (`modification_begins`:
  from now on it is in flight, and no lease is granted and no re-arm happens
  until it has landed) and lands (`modification_landed`).
* RECALLING and DIRTY: reads are answered without a lease.  A modification
  during RECALLING must wait for the recall (`WAIT`); during DIRTY it goes
  ahead at once and sends nothing.
* DIRTY -> CLEAN: once every landed modification is known to be flushed
  (`flush_started`/`flush_finished` bracket an fdatasync), the daemon calls
  `rearm_begin`, arms its kernel detector, checks cachestat, and reports the
  result with `rearm_finish`.  Arming before the check means a host-local
  write racing the re-arm is caught either by the detector or by the check.

Open-lease (NFSv4 read delegation / SMB oplock / F_SETLEASE): a lease is
granted while nobody has the file open for write; an open for write recalls
every other holder before the open is answered.

Directories are never DIRTY: each namespace change in a directory recalls the
name from the directory's holders (INVAL_ENTRY) before it lands, and the
holders keep their lease on the rest of the directory.  From
`begin_namespace_change` until `namespace_change_landed` the directory's
names are in flux: no lease on it is granted and its entries may not be
cached (`names_changing`), so that a LOOKUP answered while a recall still
waits for a slow holder cannot put the old name back into a cache.

Terms: a guest serves from its cache only until its term, counted from the
last renewal the host gave it, has run out.  `term_end` is where the host
counts it to, with a margin for clocks that run at slightly different rates.

never / ttl / always grant no leases and recall nothing: what the guest
caches under them is decided by the guest's policy alone (guest/cache.py).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Callable

from host.ranges import ATTRS, WHOLE, RangeState, Span
from protocol.messages import Granularity, Policy


class InodeState(enum.Enum):
    CLEAN = "clean"
    RECALLING = "recalling"
    DIRTY = "dirty"


@dataclass(frozen=True)
class Grant:
    """A lease handed to one guest: cache `ino` until recalled (or the term ends)."""

    ino: int
    generation: int


@dataclass(frozen=True)
class Recall:
    """The daemon must invalidate `ino` at every guest in `holders` (generation
    `generation`) and wait for their ACKs, or fence them, before proceeding.

    Under range granularity only `span` is recalled (its INVALIDATE carries
    `span.invalidation`), except from the guests in `whole`, which cached
    unleased replies of pages nobody tracks: they drop the whole inode."""

    ino: int
    generation: int
    holders: frozenset[int]
    span: Span = WHOLE
    whole: frozenset[int] = frozenset()


class _Wait:
    """Sentinel: a recall for this inode is in progress; wait for it, then ask again."""

    def __repr__(self) -> str:
        return "WAIT"


WAIT = _Wait()


@dataclass
class InodeLeases:
    """Lease bookkeeping for one host inode."""

    is_dir: bool = False
    state: InodeState = InodeState.CLEAN
    generation: int = 0
    holders: set[int] = field(default_factory=set)
    # Open-lease: open-for-write counts, by guest id (host-local writers use -1).
    writers: dict[int, int] = field(default_factory=dict)
    # Modifications landed, and how many of them are known to be on disk.
    landed: int = 0
    flushed: int = 0
    # Modifications begun (their recall is over) and not landed yet: their
    # syscall may still be running on a worker thread.  No lease is granted
    # and no re-arm happens while there is one.
    in_flight: int = 0
    # Set by rearm_begin; a modification landing before rearm_finish voids it.
    rearm_at: int | None = None
    # Whether the detector is armed for this inode (a fanotify ignore mark
    # removed, a kernel read lease held); without it no lease is granted.
    armed: bool = True
    # Where a recall leads: DIRTY for clean-lease, back to CLEAN for open-lease.
    after_recall: InodeState = InodeState.DIRTY
    # Directories: namespace changes begun and not landed yet.
    names_changing: int = 0
    # Its node id is gone (forget_inode) but something kept the entry: it goes
    # as soon as that is over.
    gone: bool = False
    # Guests that were sent this inode's data or attributes without a lease
    # and whose cache keeps them anyway until it drops them (a mount's page
    # cache): recalled before the next modification, even in DIRTY.
    tainted: set[int] = field(default_factory=set)
    # Range granularity (a regular file under clean-lease): its dirty extents,
    # the span being recalled and the flights; `state` is then derived from
    # them (RECALLING while a span is recalled, DIRTY while any extent is).
    ranges: RangeState | None = None


HOST_LOCAL = -1  # the "guest id" of writers that do not come through the daemon

# The host and a guest may measure time at slightly different rates (NTP slews
# at most 500 ppm; a VM's clock can drift further), and the guest counts its
# term from when it sent a request while the host counts from when it received
# it.  The host therefore fences a silent guest only at `term_end`: the term
# stretched by CLOCK_RATE_MARGIN, plus CLOCK_MARGIN_S.  A guest whose clock
# stops altogether (a paused VM whose clock is paused with it) is outside what
# any margin covers: docs/design.md, "Terms and fencing".
CLOCK_RATE_MARGIN = 0.01
CLOCK_MARGIN_S = 0.05


def term_end(renewed_at: float, term_s: float) -> float:
    """The instant (host clock) after which a guest last renewed at `renewed_at`
    surely serves nothing from its cache any more."""
    return renewed_at + term_s * (1.0 + CLOCK_RATE_MARGIN) + CLOCK_MARGIN_S


def stall_bound_s(ack_timeout_s: float, term_s: float) -> float:
    """The longest a modification waits for its recall, however many holders
    are silent (they are waited for concurrently): invariant 3's bound."""
    return ack_timeout_s + term_end(0.0, term_s)


class LeaseTable:
    """The leases of every inode, under one policy.

    `needs_arming` is True when a kernel detector must be armed before an
    inode may be leased (fanotify); with no detector, or one that only
    reports after the fact, inodes count as armed.
    """

    def __init__(self, policy: Policy, *, needs_arming: bool = False,
                 on_forgotten: Callable[[int], None] | None = None,
                 granularity: Granularity = Granularity.INODE):
        self.policy = policy
        # Range granularity applies to regular files under clean-lease only
        # (open-lease recalls at open, directories name by name).
        self.granularity = (granularity if policy is Policy.CLEAN_LEASE
                            else Granularity.INODE)
        self.needs_arming = needs_arming
        self._inodes: dict[int, InodeLeases] = {}
        # Called with a node id whose entry `forget_inode` let go of (the
        # detector drops its watch: issue 13, item 5).
        self._on_forgotten = on_forgotten

    # --- lookup ----------------------------------------------------------------

    def inode(self, ino: int, *, is_dir: bool = False) -> InodeLeases:
        leases = self._inodes.get(ino)
        if leases is None:
            # A directory has no pre-modification event to arm: its names are
            # recalled one by one (begin_namespace_change), so it counts as armed.
            leases = InodeLeases(is_dir=is_dir, armed=is_dir or not self.needs_arming)
            if not is_dir and self.granularity is Granularity.RANGE:
                leases.ranges = RangeState()
            self._inodes[ino] = leases
        elif is_dir and not leases.is_dir:
            # First met by a call that did not know it is a directory: a
            # directory has no pages, so it is never DIRTY.
            leases.is_dir = leases.armed = True
            leases.after_recall = InodeState.CLEAN
            leases.ranges = None
            if leases.state is InodeState.DIRTY:
                leases.state = InodeState.CLEAN
        return leases

    def peek(self, ino: int) -> InodeLeases | None:
        return self._inodes.get(ino)

    def ranged(self, ino: int) -> bool:
        """Is `ino` leased range by range (range granularity, a regular file)?"""
        leases = self._inodes.get(ino)
        return leases is not None and leases.ranges is not None

    def dirty_covers(self, ino: int, span: Span) -> bool:
        """Would a modification of `span` of `ino` land with nothing to recall
        (its pages are dirty already, or the whole inode is)?  Tainted guests
        aside: `begin_modification` decides."""
        leases = self._inodes.get(ino)
        if leases is None:
            return False
        if leases.ranges is None:
            return leases.state is InodeState.DIRTY
        return leases.ranges.recalling is None and leases.ranges.dirty_covers(span)

    def state_of(self, ino: int) -> InodeState:
        leases = self._inodes.get(ino)
        return leases.state if leases else InodeState.CLEAN

    def holders_of(self, ino: int) -> frozenset[int]:
        leases = self._inodes.get(ino)
        return frozenset(leases.holders) if leases else frozenset()

    @property
    def leasing(self) -> bool:
        return self.policy in (Policy.OPEN_LEASE, Policy.CLEAN_LEASE)

    # --- granting ----------------------------------------------------------------

    def grant(self, ino: int, guest: int, *, is_dir: bool = False,
              span: Span | None = None) -> Grant | None:
        """A guest read `ino` (data, attributes or entries): lease it, if the policy allows.

        Returns the Grant (and records `guest` as a holder) or None.  The
        caller must send the reply in the same step as it read the data, so
        that no modification can land between the read and the grant.
        Under range granularity `span` is the pages a READ reply carries:
        granted when they are clean, whatever the rest of the inode is; a
        reply without a span (attributes, an open) only when all of it is.
        """
        if not self.leasing:
            return None
        leases = self.inode(ino, is_dir=is_dir)
        if leases.ranges is not None:
            if not (leases.ranges.clean if span is None else leases.ranges.clean_for(span)):
                return None
        elif leases.state is not InodeState.CLEAN:
            return None
        if not leases.armed or leases.names_changing:
            return None
        if leases.in_flight and leases.ranges is None:  # (ranges: their flights, above)
            return None
        if self.policy is Policy.OPEN_LEASE and any(leases.writers.values()):
            return None
        leases.holders.add(guest)
        if leases.ranges is not None:
            leases.ranges.hold(guest, ATTRS if span is None else span)
        return Grant(ino, leases.generation)

    def read_while_recalling(self, ino: int) -> frozenset[int]:
        """The guests tainted since the last recall of `ino` began: at its end,
        those that read while it ran (they cached what the modification about
        to land replaces); at the end of a modification, also those that read
        while it was in flight.  Taken (they are no longer tainted): the caller
        recalls them once the modification has landed."""
        leases = self.inode(ino)
        late = frozenset(leases.tainted)
        leases.tainted.clear()
        return late

    def unleased(self, ino: int, guest: int) -> None:
        """`guest`, whose cache keeps what unleased replies carry (a mount), was
        just sent data or attributes of regular inode `ino` without a lease:
        it must be recalled before the next modification lands, like a holder."""
        if self.leasing:
            leases = self.inode(ino)
            if not leases.is_dir:
                leases.tainted.add(guest)

    # --- modifications -------------------------------------------------------------

    def begin_modification(self, ino: int, writer: int, *, is_dir: bool = False,
                           span: Span = WHOLE) -> Recall | _Wait | None:
        """`writer` is about to modify the data or attributes of regular inode `ino`.

        Returns a Recall the daemon must carry out first (then call
        `recall_finished`), WAIT if a recall is already in progress (wait for
        it, then call again), or None: go ahead.  The writer's own lease ends
        too (it is not in the Recall: it knows what it is doing).

        Under range granularity `span` is what the modification changes
        (`host.ranges.written_span`, computed in this same step): only it is
        recalled, and only if some of it is clean; holders keep the rest.
        """
        if not self.leasing:
            return None
        leases = self.inode(ino, is_dir=is_dir)
        if leases.ranges is not None:
            return self._begin_range_modification(leases, ino, writer, span)
        if leases.state is InodeState.RECALLING:
            return WAIT
        if self.policy is Policy.OPEN_LEASE:
            # The recall normally happened at open-for-write; a modification
            # without one (truncate by name, a host-local write) recalls here.
            if not leases.holders and not leases.tainted - {writer}:
                return None
            return self._start_recall(leases, ino, writer, next_state=InodeState.CLEAN)
        if leases.state is InodeState.DIRTY:
            if not leases.tainted - {writer}:
                return None
            # Guests that cached what unleased replies carried: recall them
            # too, and stay DIRTY.
            return self._start_recall(leases, ino, writer, next_state=InodeState.DIRTY)
        # A directory has no pages to flush: after its attributes change it is clean at once.
        after = InodeState.CLEAN if leases.is_dir else InodeState.DIRTY
        return self._start_recall(leases, ino, writer, next_state=after)

    def _start_recall(self, leases: InodeLeases, ino: int, writer: int,
                      next_state: InodeState) -> Recall:
        leases.generation += 1
        recalled = frozenset((leases.holders | leases.tainted) - {writer})
        leases.holders.clear()
        leases.tainted.clear()
        leases.state = InodeState.RECALLING
        leases.rearm_at = None
        leases.after_recall = next_state
        return Recall(ino, leases.generation, recalled)

    def _begin_range_modification(self, leases: InodeLeases, ino: int, writer: int,
                                  span: Span) -> Recall | _Wait | None:
        ranges = leases.ranges
        others_tainted = leases.tainted - {writer}
        if ranges.recalling is not None:
            # One recall at a time per inode.  A modification of pages that are
            # dirty already and not being recalled needs none: it goes ahead.
            if (not others_tainted and not ranges.recalling.overlaps(span)
                    and ranges.dirty_covers(span)):
                return None
            return WAIT
        if ranges.dirty_covers(span):
            if not others_tainted:
                return None  # nobody may cache these pages: nothing to send
            recalled = frozenset()  # only the tainted guests
        else:
            # Only the holders of some of it (or of the attributes); the others
            # keep their lease on what they hold.
            recalled = ranges.recall(span, leases.holders - {writer})
            ranges.recall(span, {writer} & leases.holders)  # it drops its own copy itself
            leases.holders -= {guest for guest in recalled | {writer}
                               if not ranges.holding(guest)}
        leases.generation += 1
        whole = frozenset(others_tainted)
        leases.tainted.clear()
        ranges.recalling = span
        leases.rearm_at = None
        self._derive_state(leases)
        return Recall(ino, leases.generation, recalled | whole, span, whole)

    @staticmethod
    def _derive_state(leases: InodeLeases) -> None:
        ranges = leases.ranges
        if ranges.recalling is not None:
            leases.state = InodeState.RECALLING
        elif ranges.dirty or ranges.flights:
            leases.state = InodeState.DIRTY
        else:
            leases.state = InodeState.CLEAN

    def recall_finished(self, ino: int) -> None:
        """Every holder of the Recall has ACKed or been fenced: the modification may land."""
        leases = self.inode(ino)
        if leases.ranges is not None:
            if leases.ranges.recalling is not None:
                leases.ranges.mark_dirty(leases.ranges.recalling, leases.landed)
                leases.ranges.recalling = None
            self._derive_state(leases)
            return
        if leases.state is InodeState.RECALLING:
            leases.state = leases.after_recall

    def modification_begins(self, ino: int, span: Span = WHOLE) -> None:
        """A modification of `ino` may land from now on (its recall is over), and
        will be reported with `modification_landed(ino, begun=True)`.  Until
        then no lease on `ino` is granted and it is not re-armed: the
        modification's system call may be running meanwhile (on a worker
        thread, or blocked on the inode's lock).  Under range granularity
        only `span` (the one `begin_modification` was given) is held so."""
        leases = self.inode(ino)
        leases.in_flight += 1
        if leases.ranges is not None:
            leases.ranges.flight_begins(span)
            self._derive_state(leases)

    def modification_landed(self, ino: int, *, begun: bool = False, span: Span = WHOLE) -> int:
        """A modification of `ino` has been applied (or failed, or was abandoned:
        the daemon cannot know the file is unchanged); `begun` if it was
        announced by `modification_begins`.  Returns the count landed so far.
        Under range granularity `span` is the one it was begun with: its
        extents wait for a flush again (a span not dirty yet becomes dirty:
        only a span nobody can hold may land unrecalled)."""
        leases = self.inode(ino)
        leases.landed += 1
        if begun and leases.in_flight:
            leases.in_flight -= 1
        leases.rearm_at = None
        if leases.ranges is not None:
            if begun:
                leases.ranges.flight_ends(span)
            leases.ranges.landed_in(span, leases.landed)
            self._derive_state(leases)
            return leases.landed
        if (self.policy is Policy.CLEAN_LEASE and leases.state is InodeState.CLEAN
                and not leases.is_dir):
            # Only reachable when a modification was reported after the fact
            # (inotify): the recall it should have caused is the caller's job.
            leases.state = InodeState.DIRTY
        return leases.landed

    # --- open-lease: opens for write ------------------------------------------------

    def open_for_write(self, ino: int, writer: int) -> Recall | _Wait | None:
        """`writer` opens `ino` for write.  Under open-lease, recall every other holder."""
        if self.policy is not Policy.OPEN_LEASE:
            return None
        leases = self.inode(ino)
        if leases.state is InodeState.RECALLING:
            return WAIT
        leases.writers[writer] = leases.writers.get(writer, 0) + 1
        if not leases.holders:
            return None
        return self._start_recall(leases, ino, writer, next_state=InodeState.CLEAN)

    def close_for_write(self, ino: int, writer: int) -> None:
        """`writer` closed one write handle of `ino`; leases resume when none is left."""
        if self.policy is not Policy.OPEN_LEASE:
            return
        leases = self.inode(ino)
        count = leases.writers.get(writer, 0) - 1
        if count > 0:
            leases.writers[writer] = count
        else:
            leases.writers.pop(writer, None)

    # --- directories ------------------------------------------------------------------

    def begin_namespace_change(self, directory: int, writer: int) -> Recall | None:
        """A name in `directory` is about to change: recall it from the holders.

        Holders keep their lease on the directory (they only drop the name),
        so the set is not emptied and the directory never turns DIRTY.  Until
        the matching `namespace_change_landed`, `names_changing(directory)`
        is true and no lease on the directory is granted.
        """
        if not self.leasing:
            return None
        leases = self.inode(directory, is_dir=True)
        leases.names_changing += 1
        leases.generation += 1
        holders = frozenset(leases.holders - {writer})
        if not holders:
            return None
        return Recall(directory, leases.generation, holders)

    def namespace_change_landed(self, directory: int) -> None:
        """The change begun by `begin_namespace_change` landed (or failed): over."""
        leases = self._inodes.get(directory)
        if leases is not None and leases.names_changing:
            leases.names_changing -= 1

    def names_changing(self, directory: int) -> bool:
        """A namespace change in `directory` is under way: a LOOKUP answered now
        must say that its entry may not be cached."""
        leases = self._inodes.get(directory)
        return leases is not None and leases.names_changing > 0

    # --- clean again --------------------------------------------------------------

    def flush_started(self, ino: int) -> int:
        """A flush of `ino` starts now; pass the returned mark to `flush_finished`."""
        return self.inode(ino).landed

    def flush_finished(self, ino: int, mark: int) -> None:
        """The flush begun at `mark` has completed: those modifications are on disk."""
        leases = self.inode(ino)
        leases.flushed = max(leases.flushed, mark)

    def wants_rearm(self, ino: int) -> bool:
        leases = self._inodes.get(ino)
        return (self.policy is Policy.CLEAN_LEASE and leases is not None
                and leases.state is InodeState.DIRTY)

    def rearm_candidates(self, ino: int) -> list[Span]:
        """Range granularity: the dirty spans of `ino` every landed modification
        of which is flushed and that no modification in flight covers.  The
        daemon must then arm its detector, check each span with cachestat, and
        report the clean ones with `rearmed`, with nothing in between that
        could land a write."""
        leases = self._inodes.get(ino)
        if leases is None or leases.ranges is None:
            return []
        return leases.ranges.rearm_candidates(leases.flushed)

    def rearmed(self, ino: int, clean: set[Span]) -> list[Span]:
        """Report the check of `rearm_candidates`: returns the spans that are
        clean again (granted from now on, on their own)."""
        leases = self.inode(ino)
        if leases.ranges is None:
            return []
        done = leases.ranges.rearmed(clean)
        if done:
            leases.armed = True
        self._derive_state(leases)
        return done

    def rearm_begin(self, ino: int) -> bool:
        """May `ino` become CLEAN?  True when DIRTY and every landed modification
        is flushed; the daemon must then arm its detector, check cachestat, and
        call `rearm_finish`.  With nothing in between that could land a write."""
        leases = self._inodes.get(ino)
        if leases is None or self.policy is not Policy.CLEAN_LEASE or leases.ranges is not None:
            return False
        if leases.state is not InodeState.DIRTY or leases.flushed < leases.landed:
            return False
        if leases.in_flight:
            return False  # its landing schedules the next flush
        leases.rearm_at = leases.landed
        return True

    def rearm_finish(self, ino: int, page_cache_clean: bool) -> bool:
        """Report the cachestat check.  Returns True if `ino` is CLEAN again."""
        leases = self.inode(ino)
        ok = (page_cache_clean and leases.state is InodeState.DIRTY and not leases.in_flight
              and leases.rearm_at is not None and leases.rearm_at == leases.landed)
        leases.rearm_at = None
        if ok:
            leases.state = InodeState.CLEAN
            leases.armed = True
        return ok

    def wants_arming(self, ino: int) -> bool:
        """True when `ino` would be leased but for its detector not being armed:
        the daemon should arm it (then check it is clean) so later reads are granted."""
        leases = self._inodes.get(ino)
        if not self.leasing or leases is None or leases.armed:
            return False
        if leases.state is not InodeState.CLEAN or leases.in_flight:
            return False
        return not (self.policy is Policy.OPEN_LEASE and any(leases.writers.values()))

    def set_armed(self, ino: int, armed: bool) -> None:
        """The daemon armed or disarmed its kernel detector for `ino`."""
        self.inode(ino).armed = armed

    # --- guests that go away -----------------------------------------------------------

    def drop_holder(self, guest: int) -> list[int]:
        """`guest` disconnected or was fenced: it holds nothing any more.

        Returns the inodes it held.  Its open-for-write counts go too.
        """
        held = []
        for ino, leases in self._inodes.items():
            if guest in leases.holders:
                leases.holders.discard(guest)
                held.append(ino)
            if leases.ranges is not None:
                leases.ranges.forget(guest)
            leases.tainted.discard(guest)
            leases.writers.pop(guest, None)
        for ino in held:
            if self._inodes[ino].gone:
                self.forget_inode(ino)
        return held

    def drop_writer(self, guest: int) -> None:
        """`guest`'s handles were closed: its open-for-write counts go (open-lease)."""
        for leases in self._inodes.values():
            leases.writers.pop(guest, None)

    def leased_inodes(self) -> list[int]:
        """Inodes some guest holds a lease on."""
        return [ino for ino, leases in self._inodes.items() if leases.holders]

    def forget_inode(self, ino: int) -> None:
        """The node id is gone: no guest references it any more.  Its entry goes,
        unless something is still under way on it (a recall, a namespace change)
        or a guest still holds it (one whose connection was lost, until its
        term ends: `drop_holder` then finishes the job)."""
        leases = self._inodes.get(ino)
        if leases is None:
            return
        if leases.holders:
            leases.gone = True
            return
        if leases.state is InodeState.RECALLING or leases.names_changing or leases.in_flight:
            return  # (not reachable while its writer holds the node id)
        del self._inodes[ino]
        if self._on_forgotten is not None:
            self._on_forgotten(ino)

    def drop_holder_of(self, ino: int, guest: int) -> None:
        """`guest` forgot node id `ino` (FORGET to zero): it caches nothing of it."""
        leases = self._inodes.get(ino)
        if leases is not None:
            leases.holders.discard(guest)
            if leases.ranges is not None:
                leases.ranges.forget(guest)
            leases.tainted.discard(guest)
            if leases.gone:
                self.forget_inode(ino)
