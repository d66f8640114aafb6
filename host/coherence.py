"""The daemon's side of the clean-lease state machine: grants, recalls, modifications.

`host/leases.py` decides (pure code); this mixin of `HostDaemon` performs what
it decides, with the I/O: it grants leases in replies (`lease_for`), holds
back replies to guests that cache unleased ones while a recall runs
(`before_unleased_reply`), runs every modification inside one context
manager (`modification`: the recall, the landing, its publication on every
exit) and every namespace change inside another (`namespace_change`), takes
host-local changes from the detector, and brings dirty inodes back to CLEAN
(flush, arm, then the cachestat check: `try_rearm`).

It uses the daemon's state (`self.leases`, `self.recaller`, `self.fs`,
`self.detector`, `self.config`, `self.stats`, `self._recall_over`,
`self._modifying`, ...), set up by `HostDaemon.__init__`.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import stat as stat_module
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass

from host import cachestat, statx
from host.leases import HOST_LOCAL, WAIT, InodeState, Recall
from host.ranges import ATTRS, WHOLE, Span
from host.session import Session
from protocol.messages import (
    LEASE_FIRST_DIRTY,
    LEASE_GRANTED,
    NO_LEASE,
    Attr,
    AttrOut,
    EntryOut,
    InvalEntry,
    Invalidate,
    LeaseGrant,
    Policy,
)

log = logging.getLogger("cleanlease.host")


class FailedModification(OSError):
    """A modification failed after its recall had started (EFBIG, ENOSPC, EIO...).

    The recall happened and the inode's generation moved on, so the error
    reply must still carry it (`lease`): the writer then drops any grant of an
    older generation still on its way, as after a successful modification."""

    def __init__(self, exc: OSError, lease: LeaseGrant):
        super().__init__(exc.errno, exc.strerror)
        self.lease = lease


@dataclass
class Modification:
    """What `HostDaemon.modification` yields: the inode, and whether this is the
    first dirtying modification (it started a recall)."""

    nodeid: int
    first: bool
    # What it was begun with (range granularity; WHOLE otherwise).
    span: Span = WHOLE


class Coherence:
    """Mixin of `HostDaemon`: leases granted, recalled and re-armed (see the module)."""

    def lease_for(self, session: Session, nodeid: int, *, is_dir: bool = False,
                  span: Span | None = None) -> LeaseGrant:
        """Grant `session` a lease on `nodeid` if the policy allows; the reply must
        be sent in the same step (no await in between).  `span`: the pages a
        READ reply carries (range granularity grants them on their own)."""
        grant = self.leases.grant(nodeid, session.guest_id, is_dir=is_dir, span=span)
        if grant is None:
            if session.caches_unleased and not is_dir:
                self.leases.unleased(nodeid, session.guest_id)
            if self.leases.wants_arming(nodeid):
                self._arm(nodeid)
            return NO_LEASE
        self.detector.watch(nodeid, is_dir)
        return LeaseGrant(nodeid, grant.generation, self.config.lease_term_ms, LEASE_GRANTED)

    async def before_unleased_reply(self, session: Session, nodeid: int) -> None:
        """Call before reading what a reply about regular inode `nodeid` carries
        (data, attributes), and build that reply in the step this returns in.
        Only for requests a guest's kernel sends holding no lock but the pages'
        of `nodeid` (READ, GETATTR, a read-only OPEN; not LOOKUP, sent with the
        directory locked).

        A guest whose cache keeps unleased replies (a mount) is held back while
        a recall of `nodeid` runs, and then until every modification that was
        waiting for it or was in flight has landed: its reply then carries the
        new bytes, and no writer has to recall it for them.  But only while it
        owes no ACK at all: a purge its kernel carries out for an ACK may wait
        for the page lock it holds for this very READ (or for a notifier
        thread busy with such a purge).  So a guest that owes one is answered
        at once, and one held back is answered as soon as it starts to owe one
        (`Session.when_owing`); it is then tainted, and recalled again once the
        modification has landed if the recall was still running.  Other guests
        return at once.
        """
        if not (session.caches_unleased and self.leases.leasing):
            return
        if nodeid in self._host_local_recalls:
            # The kernel lands a host-local write only after its event is
            # answered: a reader held until then would read the old bytes at
            # the worst moment.  Answered now, it is recalled again right
            # after the event is answered (`host_local_modify`).
            return
        counted = landing_waited = False
        while not session.acks and not session.closed:
            if (over := self._recall_over.get(nodeid)) is not None:
                waits = [over]
                landing_waited = False  # that recall's writers land next
            elif not landing_waited and (landing := self._modifying.get(nodeid)):
                waits = list(landing)
                landing_waited = True  # once per recall: later writers hold nobody back
            else:
                return
            if not counted:
                counted = True
                self.stats.unleased_reads_held += 1
            for event in waits:
                if session.acks:
                    break  # it owes an ACK now: answer at once
                await asyncio.wait({event, session.when_owing()},
                                   return_when=asyncio.FIRST_COMPLETED)

    async def run_blocking(self, call, *args):
        """Run `call(*args)` (a system call that may block: a write waiting for
        an inode lock a host process holds) on a worker thread, and return its
        result; the event loop serves everyone else meanwhile.  Cancelling the
        caller does not abandon the call: this returns (raising CancelledError)
        only once the call is over, so a modification's end is never counted
        while its write may still land."""
        if self._run_inline is not None:
            return await self._run_inline(functools.partial(call, *args))
        future = asyncio.get_running_loop().run_in_executor(self._workers, call, *args)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            while not future.done():
                try:
                    await asyncio.shield(future)
                except asyncio.CancelledError:
                    continue
                except BaseException:
                    break
            raise

    def restart_grace_left(self) -> float:
        """Seconds until no lease a predecessor on this export granted can be
        live (host/boot.py); 0 once that is so."""
        return max(0.0, self._grace_until - self.clock())

    async def _after_restart_grace(self) -> None:
        """Wait until no lease a predecessor on this export granted can be live."""
        remaining = self.restart_grace_left()
        if remaining > 0:
            await asyncio.sleep(remaining)

    def _arm(self, nodeid: int) -> None:
        """A clean inode its detector does not watch yet was read: arm it, then, if
        it may have been written unseen, check it is clean (invariant 4).  This
        reply grants nothing, since its data was read before the arming; the
        next read is granted."""
        unseen = self.detector.may_have_missed_writes(nodeid)
        if not self.detector.arm(nodeid):
            return
        if (self.leases.policy is Policy.CLEAN_LEASE and unseen
                and not self._page_cache_clean(nodeid)):
            self.detector.disarm(nodeid)
            self.modified(nodeid)  # dirty when first seen: flush, then re-arm as after a write
            return
        self.leases.set_armed(nodeid, True)

    def _page_cache_clean(self, nodeid: int) -> bool:
        try:
            if not stat_module.S_ISREG(os.stat(self.fs.inodes.host_fd(nodeid)).st_mode):
                return True  # no pages: a symlink's target changes only by a namespace change
            return cachestat.is_clean(self.fs.writable_fd(nodeid))
        except OSError:
            return False

    def revoked(self, nodeid: int, first_dirty: bool = False) -> LeaseGrant:
        """The trailer of a reply to a modification: no lease, and the inode's
        current generation, so the writer drops its own copy and any grant it
        receives later for an older generation."""
        leases = self.leases.peek(nodeid)
        return LeaseGrant(nodeid, leases.generation if leases else 0, 0,
                          LEASE_FIRST_DIRTY if first_dirty else 0)

    def entry_out(self, nodeid: int, st: os.stat_result, *, cacheable: bool = True) -> EntryOut:
        """The entry of a LOOKUP (or CREATE, MKDIR) reply.  With `cacheable`
        false its entry validity is 0: a guest (the kernel of a mount, or the
        library client) must not cache the name.  Its `generation` is the
        inode's birth time (host/statx.py): with the inode number it names
        the file, since ext4 gives a freed inode number to the next file."""
        valid = self._validity_s()
        try:
            generation = statx.birth_time_ns(self.fs.inodes.host_fd(nodeid))
        except OSError:
            generation = 0
        return EntryOut(nodeid, generation, valid if cacheable else 0, valid, 0, 0,
                        Attr.from_stat(st))

    def attr_out(self, st: os.stat_result) -> AttrOut:
        return AttrOut(self._validity_s(), 0, Attr.from_stat(st))

    def _validity_s(self) -> int:
        """How long a kernel guest may trust entries and attributes (FUSE timeouts)."""
        policy = self.config.policy
        if policy is Policy.NEVER:
            return 0
        if policy is Policy.TTL:
            return max(1, self.config.ttl_ms // 1000)
        return 86400  # always, and the lease policies: until invalidated

    # --- modifications: the first dirtying write path ----------------------------

    @asynccontextmanager
    async def modification(self, nodeid: int, writer: int, *, is_dir: bool = False,
                           span=None, change=None, keeps_pages: bool = False,
                           under_writeback: bool = False):
        """`async with d.modification(nodeid, writer) as m:` carry out one modification.

        `span(size)`, if given, says what the modification changes when the
        file is `size` bytes long (`host.ranges.written_span`, ...); under
        range granularity it is asked in the step that decides, so no size
        change can come between, and only that span is recalled.  Without
        it the whole inode is.

        `keeps_pages`: the writer's kernel keeps what it writes (a WRITE of its
        own dirty pages); from the landing on it counts as sent unleased data,
        recalled before the next modification lands (docs/mount.md, R7).
        `under_writeback`: the writer's kernel may be laundering pages of
        `nodeid` for a recall it owes, or holding their writeback back until
        this is answered (a WRITE of its dirty pages; a truncate, sent under
        FUSE_NOWRITE): it may then land inside that recall (R8,
        `_inside_own_recall`).

        On entry, waits until no other guest can serve its copy of `nodeid`
        (`_modify`); `m.first` says whether this modification started the
        recall.  From then until the body exits the modification is *in
        flight*: no lease on `nodeid` is granted and it is not re-armed, so the
        body may await (its system call on a worker: `run_blocking`).  Every exit of
        the body, success, an errno or a cancellation, counts the modification
        as landed and schedules the flush that leads back to CLEAN
        (`modified`), since after the recall the daemon cannot know the file
        is unchanged.  An OSError from the body is raised again as a
        FailedModification carrying the trailer (`revoked`) that publishes the
        inode's new generation to the writer.

        `keeps_pages`: the writer's kernel keeps what it writes (a WRITE of its
        own dirty pages); from the landing on it counts as sent unleased data,
        recalled before the next modification lands (docs/mount.md, R7).

        First of all it passes the control gate (host/control/holds.py): while
        an administrator freezes the file, or seals it and `change` (a
        `holds.Change`, or a callable returning one, called only then; None:
        anything) may change its layout, it waits there, before any recall.
        """
        await self._after_restart_grace()  # before it can hold readers back (_landing)
        landing = await self.pass_control_gate(nodeid, change, is_dir=is_dir)
        with self._landing(nodeid, landing):
            inside = (await self._inside_own_recall(nodeid, writer, span) if under_writeback
                      else None)
            try:
                if inside is not None:
                    first, late, chosen = False, frozenset(), inside
                else:
                    first, late, chosen = await self._modify(nodeid, writer, is_dir=is_dir,
                                                             span=span)
                self.leases.modification_begins(nodeid, chosen)
                if keeps_pages:
                    self.leases.unleased(nodeid, writer)
                try:
                    yield Modification(nodeid, first, chosen)
                except OSError as exc:
                    raise FailedModification(exc, self.revoked(nodeid, first)) from exc
                else:
                    # Guests that cache unleased replies and were sent `nodeid`
                    # while its recall ran, or while this modification was in
                    # flight, without being held back (`before_unleased_reply`), may
                    # hold the bytes it just replaced: purge them before the writer
                    # learns it is done, and wait for any other such purge still
                    # running (a concurrent modification's), which may cover a
                    # reply sent before this one landed.  Not inside a recall
                    # the writer owes: that one ends only after this reply.
                    taken = self.leases.read_while_recalling(nodeid)
                    late |= taken - {writer}
                    if keeps_pages or (inside is not None and writer in taken):
                        # The writer's kernel may keep what it wrote, or pages
                        # it read while it owed the recall: recalled next time.
                        self.leases.unleased(nodeid, writer)
                    if late:
                        await self._recall_late(nodeid, late)
                    if inside is None:
                        await self.recaller.running_over(nodeid)
                finally:
                    self.modified(nodeid, begun=True, span=chosen)
            finally:
                if inside is not None:
                    self.recaller.owing_writer_ends(nodeid, writer)

    async def _inside_own_recall(self, nodeid: int, writer: int, span) -> Span | None:
        """A modification of `nodeid` by `writer`, a guest that owes the ACK of the
        recall now running on it, lands inside that recall, without waiting
        for its end: the guest's purge for that ACK may be what sent it (a
        WRITE laundering dirty pages of a shared mapping; a truncate, under
        whose FUSE_NOWRITE such a laundering waits), and the recall's end waits
        for that purge.  It still waits until no other holder can serve its
        old copy (`Recaller.others_acked`).  Under range granularity only a
        modification within the span being recalled may (a laundering is:
        the purge drops only that span); another waits as usual.  Returns
        the span it lands on if it does so: the caller then lands it with no
        recall of its own, and must call `owing_writer_ends` on every exit;
        None otherwise."""
        if (writer == HOST_LOCAL or self.leases.state_of(nodeid) is not InodeState.RECALLING
                or not self.recaller.owes(nodeid, writer)):
            return None
        chosen = WHOLE
        if self.leases.ranged(nodeid):
            recalling = self.leases.peek(nodeid).ranges.recalling
            chosen = span(self._size_now(nodeid)) if span is not None else WHOLE
            if recalling is None or not recalling.covers(chosen):
                return None
        self.recaller.owing_writer_begins(nodeid, writer)
        try:
            await self.recaller.others_acked(nodeid, writer)
        except BaseException:
            self.recaller.owing_writer_ends(nodeid, writer)
            raise
        if self.recaller.owes(nodeid, writer) and \
                self.leases.state_of(nodeid) is InodeState.RECALLING:
            if self.leases.ranged(nodeid):
                recalling = self.leases.peek(nodeid).ranges.recalling
                if recalling is None or not recalling.covers(chosen):
                    self.recaller.owing_writer_ends(nodeid, writer)
                    return None
            self.stats.writes_inside_recall += 1
            return chosen
        self.recaller.owing_writer_ends(nodeid, writer)  # it ACKed meanwhile: as usual
        return None

    @contextmanager
    def _landing(self, nodeid: int, gate: list | None = None):
        """While inside, a modification of `nodeid` waits for its recall or is
        landing: readers held back by `before_unleased_reply` wait for it (and
        so do a freeze's drain and the next writer a thaw lets go: every
        future in `gate` is set on exit too)."""
        done = asyncio.get_running_loop().create_future()
        self._modifying.setdefault(nodeid, set()).add(done)
        try:
            yield
        finally:
            landing = self._modifying[nodeid]
            landing.discard(done)
            if not landing:
                del self._modifying[nodeid]
            done.set_result(None)
            for landed in gate or ():
                if not landed.done():
                    landed.set_result(None)

    async def _recall_late(self, nodeid: int, guests: frozenset[int]) -> None:
        self.stats.late_recalls += len(guests)
        leases = self.leases.peek(nodeid)
        generation = leases.generation if leases else 0
        await self.recaller.carry_out(Recall(nodeid, generation, guests), lambda seq: Invalidate(
            seq, nodeid, 0, 0, generation), data=True)

    async def _modify(self, nodeid: int, writer: int, *, is_dir: bool = False,
                      span=None) -> tuple[bool, frozenset[int], Span]:
        """Return once `writer` may modify `nodeid`: every other guest's copy is gone
        (of the span it changes, under range granularity: `modification`).

        Returns (first, late, span): first is True if this modification started
        a recall; span is what it was decided on; late are the guests that cache
        unleased replies and were sent `nodeid` while the recall ran without
        being held back (`before_unleased_reply`: they owed an ACK).  Must be
        followed, with no await in between, by the modification and
        `modified(nodeid)`, or by `modification_begins(nodeid)`; and then by a
        recall of `late`.
        """
        chosen = [WHOLE]

        def decide():
            if span is not None and not is_dir and self.leases.ranged(nodeid):
                chosen[0] = span(self._size_now(nodeid))  # this step: no size change between
            return self.leases.begin_modification(nodeid, writer, is_dir=is_dir,
                                                  span=chosen[0])
        late = await self._recall_for(nodeid, decide)
        if late is not None:
            if not self.leases.ranged(nodeid):
                self.detector.disarm(nodeid)  # (a partly clean inode stays armed)
            return True, late - {writer}, chosen[0]
        if self.leases.policy is Policy.OPEN_LEASE:
            self.detector.disarm(nodeid)  # see open_for_write
        return False, frozenset(), chosen[0]

    def _size_now(self, nodeid: int) -> int:
        """The file's size now; -1 when it cannot be told (`written_span` and
        `resized_span` then give the whole inode)."""
        try:
            return os.fstat(self.fs.inodes.host_fd(nodeid)).st_size
        except OSError:
            return -1

    def modified(self, nodeid: int, *, begun: bool = False, span: Span = WHOLE) -> None:
        """A modification of `nodeid` has landed (`begun`: announced by
        `modification_begins`; `span`: what it changed, range granularity):
        schedule the flush that cleans it."""
        self.leases.modification_landed(nodeid, begun=begun, span=span)
        if self.leases.policy is Policy.CLEAN_LEASE:
            self._schedule_flush(nodeid)

    async def open_for_write(self, nodeid: int, writer: int) -> None:
        await self._recall_for(nodeid, lambda: self.leases.open_for_write(nodeid, writer))
        if self.leases.policy is Policy.OPEN_LEASE:
            # Drop the daemon's kernel read lease before it opens the file for
            # write itself: breaking its own lease would block it for
            # lease-break-time (docs/kernel.md).
            self.detector.disarm(nodeid)

    async def _recall_for(self, nodeid: int, decide) -> frozenset[int] | None:
        """Ask the lease table (`decide()`) until no recall of `nodeid` is in progress,
        and carry out the Recall it answers, if any.  None if there was none.
        Else every other copy of `nodeid` is gone (invariant 2) but those of the
        guests returned (`LeaseTable.read_while_recalling`), and the caller
        must land its modification, or announce it (`modification_begins`), in
        this same step (no await in between).

        The recall ends (`recall_finished`) in the caller's own step, right
        before the modification lands: ended any earlier, in the recall's task,
        a reply or a re-arm could slip in between and grant a lease on the old
        data that nobody would recall.  The invalidations and waits run as the
        daemon's own task: a caller cancelled while it waits does not cut them
        short; the recall then ends when they do, and, since the daemon cannot
        know what the caller did, counts as a modification (a flush follows)."""
        await self._after_restart_grace()
        while (decision := decide()) is WAIT:
            await asyncio.shield(self._recall_over[nodeid])
        if not isinstance(decision, Recall):
            return None
        over = self._recall_over[nodeid] = asyncio.get_running_loop().create_future()
        waits = self._spawn(self._invalidate(decision))

        def end(cancelled: bool) -> None:
            self._recall_over.pop(nodeid, None)
            self.leases.recall_finished(nodeid)
            if cancelled:
                self.modified(nodeid, span=decision.span)
            over.set_result(None)  # the writers WAITing behind it ask again

        try:
            await asyncio.shield(waits)
        except BaseException:
            waits.add_done_callback(lambda _: end(cancelled=True))
            raise
        end(cancelled=False)
        return self.leases.read_while_recalling(nodeid)

    async def _invalidate(self, recall: Recall) -> None:
        """Carry out `recall`: INVALIDATE its span at its holders, the whole
        inode at its `whole` guests (range granularity), all at once."""
        def message(offset: int, length: int):
            return lambda seq: Invalidate(seq, recall.ino, offset, length, recall.generation)
        ranged = recall.holders - recall.whole
        if not recall.whole or not ranged:
            whole = bool(recall.whole) or recall.span.is_whole
            await self.recaller.carry_out(recall, message(*((0, 0) if whole else
                                                             recall.span.invalidation)), data=True)
            return
        await asyncio.gather(
            self.recaller.carry_out(Recall(recall.ino, recall.generation, ranged),
                                    message(*recall.span.invalidation), data=True),
            self.recaller.carry_out(Recall(recall.ino, recall.generation, recall.whole),
                                    message(0, 0), data=True))

    def before_create(self, parent: int, name: bytes) -> None:
        """CREATE may open an existing file for write: under open-lease, drop the
        kernel lease of whatever inode has that name now (see open_for_write)."""
        if self.leases.policy is not Policy.OPEN_LEASE:
            return
        nodeid = self.fs.peek(parent, name)
        if nodeid is not None:
            self.detector.disarm(nodeid)

    @asynccontextmanager
    async def namespace_change(self, writer: int, *names: tuple[int, bytes]):
        """`async with d.namespace_change(writer, (directory, name), ...):` change
        names (one, or a RENAME's two).

        On entry, waits until no other guest may serve any of the `names` from
        its cache.  The recalls of all of them run at once, so a RENAME
        between two directories waits at most one term for their silent
        holders, not one per directory.  From entry until every exit of the
        body (the change landed, failed or was cancelled), each directory's
        names are in flux: no lease on it is granted and LOOKUPs in it say
        that their entry may not be cached (`entry_out`), so that a lookup
        answered while a recall still waits for a slow holder cannot cache
        the old name.
        """
        await self._after_restart_grace()
        begun, recalls = [], []
        try:
            for directory, name in names:
                decision = self.leases.begin_namespace_change(directory, writer)
                begun.append(directory)
                if isinstance(decision, Recall):
                    recalls.append(self.recaller.carry_out(decision, functools.partial(
                        InvalEntry, parent=directory, name=name, generation=decision.generation)))
            if recalls:
                await asyncio.shield(self._spawn(_all(recalls)))
            yield
        finally:
            for directory in begun:
                self.leases.namespace_change_landed(directory)

    # --- host-local changes, reported by the detector ---------------------------------

    async def host_local_modify(self, nodeid: int, span=None) -> None:
        """A process on the host is modifying (or has modified) `nodeid`;
        `span(size)`: what it changes, as for `modification` (a pre-content
        event's range; None: the whole inode).

        Returns once no guest can serve its old copy.  A pre-content detector
        answers the kernel only after this returns, so the write lands after
        the recall; an after-the-fact detector calls it to shorten the window.
        In DIRTY there is nothing to recall but tainted guests; the cachestat
        check before the next re-arm sees what the write dirtied.
        """
        self.stats.host_local_events += 1
        await self._after_restart_grace()
        self._host_local_recalls[nodeid] = self._host_local_recalls.get(nodeid, 0) + 1
        try:
            first, late, chosen = await self._modify(nodeid, HOST_LOCAL, span=span)
        finally:
            if self._host_local_recalls[nodeid] == 1:
                del self._host_local_recalls[nodeid]
            else:
                self._host_local_recalls[nodeid] -= 1
        if first:
            self.modified(nodeid, span=chosen)
        if late:
            # The kernel lands the write when it will: recall them at once, and
            # keep them tainted, so that a guest modification that comes next
            # waits for them too (this recall runs beside it).
            for guest in late:
                self.leases.unleased(nodeid, guest)
            self._spawn(self._recall_late(nodeid, late))

    def host_local_modification(self, nodeid: int) -> None:
        """After the fact: recall the leases on `nodeid` if it was clean."""
        if self.leases.state_of(nodeid) is InodeState.CLEAN:
            self._spawn(self.host_local_modify(nodeid))

    def host_local_namespace_change(self, directory: int, name: bytes) -> None:
        """After the fact: a name in `directory` changed on the host."""
        self.stats.host_local_events += 1
        self._spawn(self._recall_host_local_name(directory, name))

    async def _recall_host_local_name(self, directory: int, name: bytes) -> None:
        async with self.namespace_change(HOST_LOCAL, (directory, name)):
            pass  # the change has landed already: only its recall is left to do

    def host_local_overflow(self) -> None:
        """Events were lost: recall every lease, since any inode may have changed."""
        for nodeid in self.leases.leased_inodes():
            self.host_local_modification(nodeid)

    # --- clean again ---------------------------------------------------------------

    def _schedule_flush(self, nodeid: int) -> None:
        handle = self._flush_timers.pop(nodeid, None)
        if handle is not None:
            handle.cancel()
        loop = asyncio.get_running_loop()
        self._flush_timers[nodeid] = loop.call_later(
            self.config.clean_after_ms / 1000.0, lambda: self._spawn(self._idle_flush(nodeid)))

    async def _idle_flush(self, nodeid: int) -> None:
        self._flush_timers.pop(nodeid, None)
        try:
            sync = self.fs.flush_inode(nodeid)
        except OSError:
            return  # gone (unlinked and forgotten): nothing to re-arm
        mark = self.leases.flush_started(nodeid)
        try:
            await self.run_blocking(sync)
        except OSError as exc:  # EIO from writeback: stay DIRTY, try again later
            log.warning("flush of node %d failed: %s; will retry", nodeid, exc)
            self._schedule_flush(nodeid)
            return
        self.stats.flushes += 1
        self.leases.flush_finished(nodeid, mark)
        self.try_rearm(nodeid)

    def flushed(self, nodeid: int, mark: int) -> None:
        """A guest's FSYNC covering modifications up to `mark` has completed."""
        self.leases.flush_finished(nodeid, mark)
        self.try_rearm(nodeid)

    def try_rearm(self, nodeid: int) -> bool:
        """DIRTY -> CLEAN if flushed and the page cache is clean.  Arm first, then check
        (invariant 4): a write racing us is seen by the detector or by cachestat."""
        if self.leases.ranged(nodeid):
            return self._try_rearm_ranges(nodeid)
        if not self.leases.rearm_begin(nodeid):
            return False
        armed = self.detector.arm(nodeid) is not False  # None: a detector that cannot fail
        try:
            clean = armed and cachestat.is_clean(self.fs.writable_fd(nodeid))
        except OSError:
            clean = False
        if self.leases.rearm_finish(nodeid, clean):
            self.stats.rearms += 1
            return True
        self.stats.rearm_refused += 1
        self.detector.disarm(nodeid)
        self._schedule_flush(nodeid)
        return False

    def _try_rearm_ranges(self, nodeid: int) -> bool:
        """Range granularity: each flushed dirty span on its own, the same way:
        arm (the detector is armed for the whole inode), then cachestat of the
        span.  Nothing is disarmed when a span stays dirty: the rest of the
        inode may be leased, and its host writes must still raise events."""
        spans = self.leases.rearm_candidates(nodeid)
        if not spans:
            return False
        clean: set[Span] = set()
        if self.detector.arm(nodeid) is not False:
            try:
                fd = self.fs.writable_fd(nodeid)
                for span in spans:
                    if span == ATTRS:
                        clean.add(span)  # no pages: flushed is all it needs
                        continue
                    offset, length = span.invalidation
                    if cachestat.cachestat(fd, offset, length).clean:
                        clean.add(span)
            except OSError:
                pass
        done = self.leases.rearmed(nodeid, clean)
        self.stats.rearms += len(done)
        self.stats.rearm_refused += len(spans) - len(done)
        if len(done) < len(spans):
            self._schedule_flush(nodeid)
        return bool(done)


async def _all(coroutines) -> None:
    await asyncio.gather(*coroutines)
