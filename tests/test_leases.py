"""host/leases.py: the pure lease state machine, policy by policy, plus stateful
hypothesis machines that drive random reads, modifications, flushes, re-arms
and drops from several guests and hold the table to its invariants."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from host.leases import HOST_LOCAL, WAIT, Grant, InodeState, LeaseTable, Recall
from protocol.messages import Policy

F, G, D = 10, 11, 20  # two regular files and a directory
A, B, C = 1, 2, 3  # guest ids

CLEAN, RECALLING, DIRTY = InodeState.CLEAN, InodeState.RECALLING, InodeState.DIRTY


def dirty(t: LeaseTable, ino: int = F, writer: int = C) -> Recall:
    """Drive `ino` CLEAN -> RECALLING -> DIRTY with one landed modification."""
    recall = t.begin_modification(ino, writer)
    assert isinstance(recall, Recall)
    t.recall_finished(ino)
    t.modification_landed(ino)
    assert t.state_of(ino) is DIRTY
    return recall


def flush(t: LeaseTable, ino: int = F) -> None:
    t.flush_finished(ino, t.flush_started(ino))


# --- clean-lease --------------------------------------------------------------------


def test_clean_lease_grants_in_clean_and_records_holders():
    t = LeaseTable(Policy.CLEAN_LEASE)
    assert t.leasing
    assert t.state_of(F) is CLEAN and t.holders_of(F) == frozenset()
    assert t.grant(F, A) == Grant(F, 0)
    assert t.grant(F, B) == Grant(F, 0)
    assert t.grant(F, A) == Grant(F, 0)  # a second read is harmless
    assert t.holders_of(F) == {A, B}
    assert t.holders_of(G) == frozenset() and t.peek(G) is None


def test_first_modification_recalls_every_holder_but_the_writer():
    t = LeaseTable(Policy.CLEAN_LEASE)
    for guest in (A, B, C):
        t.grant(F, guest)
    t.grant(G, A)
    recall = t.begin_modification(F, B)
    assert recall == Recall(F, 1, frozenset({A, C}))
    assert t.inode(F).generation == 1
    assert t.holders_of(F) == frozenset()  # the writer's own lease ended too
    assert t.state_of(F) is RECALLING
    assert t.holders_of(G) == {A} and t.state_of(G) is CLEAN  # other inodes untouched


def test_first_modification_by_a_host_local_writer():
    t = LeaseTable(Policy.CLEAN_LEASE)
    t.grant(F, A)
    assert t.begin_modification(F, HOST_LOCAL) == Recall(F, 1, frozenset({A}))


def test_first_modification_with_no_holders_still_recalls_and_bumps():
    t = LeaseTable(Policy.CLEAN_LEASE)
    assert t.begin_modification(F, A) == Recall(F, 1, frozenset())
    assert t.state_of(F) is RECALLING


def test_wait_while_recalling_and_no_grant():
    t = LeaseTable(Policy.CLEAN_LEASE)
    t.grant(F, A)
    t.begin_modification(F, B)
    assert t.begin_modification(F, C) is WAIT
    assert t.begin_modification(F, B) is WAIT
    assert t.grant(F, A) is None and t.grant(F, C) is None
    assert t.holders_of(F) == frozenset()
    assert t.inode(F).generation == 1
    assert not t.rearm_begin(F)  # nothing to re-arm before the recall is over
    t.recall_finished(F)
    assert t.state_of(F) is DIRTY


def test_dirty_writes_send_nothing_and_no_grant():
    t = LeaseTable(Policy.CLEAN_LEASE)
    t.grant(F, A)
    dirty(t, F, B)
    for writer in (A, B, C, HOST_LOCAL):
        assert t.begin_modification(F, writer) is None
        assert t.modification_landed(F) >= 2
    assert t.inode(F).generation == 1  # only the first modification bumps it
    assert t.grant(F, A) is None and t.grant(F, B) is None
    assert t.holders_of(F) == frozenset()
    assert t.wants_rearm(F)
    t.recall_finished(F)  # late and harmless
    assert t.state_of(F) is DIRTY


def test_rearm_only_after_every_landed_modification_is_flushed():
    t = LeaseTable(Policy.CLEAN_LEASE)
    t.grant(F, A)
    dirty(t)
    assert not t.rearm_begin(F)  # landed 1, flushed 0
    mark = t.flush_started(F)
    assert mark == 1
    assert t.begin_modification(F, B) is None
    assert t.modification_landed(F) == 2  # lands while the flush runs
    t.flush_finished(F, mark)
    assert not t.rearm_begin(F)  # the flush covered 1 of 2
    assert t.grant(F, A) is None
    flush(t)
    t.flush_finished(F, 1)  # an older flush finishing late does not go backwards
    assert t.rearm_begin(F)
    assert t.rearm_finish(F, True)
    assert t.state_of(F) is CLEAN and not t.wants_rearm(F)
    assert t.grant(F, A) == Grant(F, 1)  # the new generation
    assert t.begin_modification(F, B) == Recall(F, 2, frozenset({A}))


def test_modification_between_rearm_begin_and_finish_voids_the_rearm():
    """Invariant 4: arm first, then check; a write landing in between is seen."""
    t = LeaseTable(Policy.CLEAN_LEASE)
    dirty(t)
    flush(t)
    assert t.rearm_begin(F)
    assert t.begin_modification(F, HOST_LOCAL) is None  # the detector fired: DIRTY, go ahead
    t.modification_landed(F)
    assert not t.rearm_finish(F, True)  # even though cachestat said clean
    assert t.state_of(F) is DIRTY and t.grant(F, A) is None
    assert not t.rearm_begin(F)  # the new modification is not flushed yet
    flush(t)
    assert t.rearm_begin(F) and t.rearm_finish(F, True)


def test_rearm_finish_false_stays_dirty():
    t = LeaseTable(Policy.CLEAN_LEASE)
    dirty(t)
    flush(t)
    assert t.rearm_begin(F)
    assert not t.rearm_finish(F, False)
    assert t.state_of(F) is DIRTY and t.grant(F, A) is None and t.wants_rearm(F)
    assert not t.rearm_finish(F, True)  # a finish without a begin changes nothing
    assert t.state_of(F) is DIRTY
    assert t.rearm_begin(F) and t.rearm_finish(F, True)
    assert t.state_of(F) is CLEAN


def test_rearm_of_unknown_or_clean_inode():
    t = LeaseTable(Policy.CLEAN_LEASE)
    assert not t.rearm_begin(F) and not t.wants_rearm(F)
    t.grant(F, A)
    assert not t.rearm_begin(F)
    assert not t.rearm_finish(F, True)
    assert t.state_of(F) is CLEAN and t.holders_of(F) == {A}


def test_first_modification_voids_a_rearm_in_progress():
    t = LeaseTable(Policy.CLEAN_LEASE)
    dirty(t)
    flush(t)
    assert t.rearm_begin(F)
    assert t.rearm_finish(F, True)
    t.grant(F, A)
    assert t.rearm_finish(F, True) is False  # nothing in progress any more
    assert t.state_of(F) is CLEAN and t.holders_of(F) == {A}


def test_needs_arming_no_grant_until_armed():
    t = LeaseTable(Policy.CLEAN_LEASE, needs_arming=True)
    assert t.grant(F, A) is None
    assert not t.inode(F).armed and t.holders_of(F) == frozenset()
    t.set_armed(F, True)
    assert t.grant(F, A) == Grant(F, 0)
    t.set_armed(F, False)  # the detector lost its mark: no new leases
    assert t.grant(F, B) is None and t.holders_of(F) == {A}
    t.set_armed(F, True)
    dirty(t, F, B)
    t.set_armed(F, False)  # the daemon disarms while DIRTY
    flush(t)
    assert t.rearm_begin(F) and t.rearm_finish(F, True)
    assert t.inode(F).armed  # re-arming arms it
    assert t.grant(F, A) == Grant(F, 1)
    # without needs_arming, every inode counts as armed
    assert LeaseTable(Policy.CLEAN_LEASE).grant(F, A) == Grant(F, 0)


def test_needs_arming_under_open_lease():
    """Open-lease's detector is a kernel read lease: no grant until the daemon holds one."""
    t = LeaseTable(Policy.OPEN_LEASE, needs_arming=True)
    assert t.grant(F, A) is None and t.wants_arming(F)
    t.set_armed(F, True)
    assert not t.wants_arming(F)
    assert t.grant(F, A) == Grant(F, 0)


@pytest.mark.parametrize("policy", [Policy.CLEAN_LEASE, Policy.OPEN_LEASE])
def test_directories_count_as_armed(policy):
    t = LeaseTable(policy, needs_arming=True)
    assert t.grant(D, A, is_dir=True) == Grant(D, 0)
    assert not t.wants_arming(D)


def test_wants_arming():
    t = LeaseTable(Policy.CLEAN_LEASE, needs_arming=True)
    assert not t.wants_arming(F)  # never seen: nothing to arm yet
    assert t.grant(F, A) is None
    assert t.wants_arming(F)  # a read was refused for want of arming
    t.set_armed(F, True)
    assert not t.wants_arming(F)
    dirty(t)
    t.set_armed(F, False)
    assert not t.wants_arming(F)  # DIRTY: re-arming is rearm_begin's business
    flush(t)
    assert t.rearm_begin(F) and t.rearm_finish(F, True)
    assert not t.wants_arming(F) and t.inode(F).armed
    o = LeaseTable(Policy.OPEN_LEASE, needs_arming=True)
    o.open_for_write(F, B)
    assert not o.wants_arming(F)  # a writer has it open: no lease to arm for
    o.close_for_write(F, B)
    assert o.wants_arming(F)
    for policy in (Policy.NEVER, Policy.TTL, Policy.ALWAYS):
        n = LeaseTable(policy, needs_arming=True)
        n.inode(F)
        assert not n.wants_arming(F)


def test_leased_inodes():
    t = LeaseTable(Policy.CLEAN_LEASE)
    assert t.leased_inodes() == []
    t.grant(F, A)
    t.grant(D, B, is_dir=True)
    t.grant(G, A)
    t.begin_modification(G, B)
    assert sorted(t.leased_inodes()) == [F, D]
    t.drop_holder(A)
    assert t.leased_inodes() == [D]


def test_failed_rearm_keeps_the_inode_unarmed():
    t = LeaseTable(Policy.CLEAN_LEASE, needs_arming=True)
    t.set_armed(F, True)
    dirty(t)
    t.set_armed(F, False)
    flush(t)
    assert t.rearm_begin(F) and not t.rearm_finish(F, False)
    assert not t.inode(F).armed


def test_drop_holder():
    t = LeaseTable(Policy.CLEAN_LEASE)
    t.grant(F, A)
    t.grant(G, A)
    t.grant(G, B)
    assert sorted(t.drop_holder(A)) == [F, G]
    assert t.holders_of(F) == frozenset() and t.holders_of(G) == {B}
    assert t.drop_holder(A) == []
    assert t.begin_modification(G, C) == Recall(G, 1, frozenset({B}))
    assert t.drop_holder(B) == []  # a recall already took it


def test_forget_inode():
    t = LeaseTable(Policy.CLEAN_LEASE)
    t.grant(F, A)
    t.forget_inode(F)
    # A holder (one whose connection was lost, say) keeps the entry until it goes.
    assert t.holders_of(F) == {A}
    t.drop_holder_of(F, A)
    assert t.peek(F) is None and t.holders_of(F) == frozenset() and t.state_of(F) is CLEAN
    t.forget_inode(F)  # twice is fine
    t.grant(G, A)
    t.grant(G, B)
    t.forget_inode(G)
    t.drop_holder(A)
    assert t.holders_of(G) == {B}
    t.drop_holder(B)
    assert t.peek(G) is None


# --- directories ------------------------------------------------------------------------


@pytest.mark.parametrize("policy", [Policy.CLEAN_LEASE, Policy.OPEN_LEASE])
def test_namespace_change_recalls_the_name_but_keeps_the_holders(policy):
    t = LeaseTable(policy)
    for guest in (A, B, C):
        assert t.grant(D, guest, is_dir=True) == Grant(D, 0)
    assert t.inode(D).is_dir
    assert t.begin_namespace_change(D, B) == Recall(D, 1, frozenset({A, C}))
    assert t.holders_of(D) == {A, B, C}  # they keep the rest of the directory
    assert t.state_of(D) is CLEAN
    # Until the change has landed, the directory's names are in flux: no grant.
    assert t.names_changing(D) and t.grant(D, A, is_dir=True) is None
    t.namespace_change_landed(D)
    assert not t.names_changing(D)
    assert t.grant(D, A, is_dir=True) == Grant(D, 1)
    assert t.begin_namespace_change(D, HOST_LOCAL) == Recall(D, 2, frozenset({A, B, C}))


def test_namespace_change_with_no_other_holder_sends_nothing_but_bumps():
    t = LeaseTable(Policy.CLEAN_LEASE)
    assert t.begin_namespace_change(D, A) is None
    t.namespace_change_landed(D)
    t.grant(D, A, is_dir=True)
    assert t.begin_namespace_change(D, A) is None
    assert t.inode(D).generation == 2
    assert t.holders_of(D) == {A}


def test_directory_attribute_change_recalls_then_is_clean():
    t = LeaseTable(Policy.CLEAN_LEASE)
    t.grant(D, A, is_dir=True)
    assert t.begin_modification(D, B) == Recall(D, 1, frozenset({A}))
    assert t.state_of(D) is RECALLING
    t.recall_finished(D)
    assert t.state_of(D) is CLEAN  # no pages to flush
    assert t.grant(D, A, is_dir=True) == Grant(D, 1)


def test_directory_stays_clean_after_its_attribute_change_lands():
    t = LeaseTable(Policy.CLEAN_LEASE)
    t.grant(D, A, is_dir=True)
    t.begin_modification(D, B)  # e.g. SETATTR (chmod) on a directory: server.modification()
    t.recall_finished(D)
    t.modification_landed(D)  # ... then server.modified()
    assert t.state_of(D) is CLEAN  # a directory is never DIRTY
    assert t.grant(D, A, is_dir=True) == Grant(D, 1)


def test_directory_first_seen_by_a_modification_is_still_a_directory():
    t = LeaseTable(Policy.CLEAN_LEASE)
    t.begin_modification(D, A)  # e.g. SETATTR on the root before any grant on it
    t.recall_finished(D)
    assert t.grant(D, A, is_dir=True) == Grant(D, 1)


# --- open-lease ---------------------------------------------------------------------------


def test_open_lease_open_for_write_recalls_other_holders():
    t = LeaseTable(Policy.OPEN_LEASE)
    for guest in (A, B, C):
        t.grant(F, guest)
    assert t.open_for_write(F, B) == Recall(F, 1, frozenset({A, C}))
    assert t.state_of(F) is RECALLING and t.holders_of(F) == frozenset()
    assert t.open_for_write(F, C) is WAIT  # and C's open is not counted
    assert t.begin_modification(F, B) is WAIT
    assert t.grant(F, A) is None
    t.recall_finished(F)
    assert t.state_of(F) is CLEAN  # open-lease never goes DIRTY
    assert t.inode(F).writers == {B: 1}
    assert t.grant(F, A) is None  # a writer has it open


def test_open_lease_grants_resume_after_the_last_writer_closes():
    t = LeaseTable(Policy.OPEN_LEASE)
    assert t.open_for_write(F, A) is None  # nobody to recall
    assert t.open_for_write(F, A) is None
    assert t.open_for_write(F, HOST_LOCAL) is None
    assert t.inode(F).writers == {A: 2, HOST_LOCAL: 1}
    assert t.begin_modification(F, A) is None
    t.modification_landed(F)
    assert t.state_of(F) is CLEAN
    t.close_for_write(F, A)
    t.close_for_write(F, HOST_LOCAL)
    assert t.grant(F, B) is None  # A still has one handle
    t.close_for_write(F, A)
    assert t.inode(F).writers == {}
    assert t.grant(F, B) == Grant(F, 0)
    t.close_for_write(F, A)  # one close too many is harmless
    assert t.inode(F).writers == {}


def test_open_lease_writer_that_holds_a_lease():
    t = LeaseTable(Policy.OPEN_LEASE)
    t.grant(F, A)
    recall = t.open_for_write(F, A)
    assert recall == Recall(F, 1, frozenset())  # its own lease ends, nobody else to tell
    t.recall_finished(F)
    assert t.holders_of(F) == frozenset() and t.grant(F, B) is None


def test_open_lease_modification_without_an_open_recalls():
    t = LeaseTable(Policy.OPEN_LEASE)
    t.grant(F, A)
    t.grant(F, B)
    assert t.begin_modification(F, HOST_LOCAL) == Recall(F, 1, frozenset({A, B}))
    t.recall_finished(F)
    t.modification_landed(F)
    assert t.state_of(F) is CLEAN
    assert t.grant(F, A) == Grant(F, 1)  # no writer open: leases resume at once
    assert t.begin_modification(F, A) == Recall(F, 2, frozenset())
    assert not t.wants_rearm(F) and not t.rearm_begin(F)


def test_open_lease_drop_holder_drops_its_writes():
    t = LeaseTable(Policy.OPEN_LEASE)
    t.open_for_write(F, A)
    t.grant(G, A)
    assert t.drop_holder(A) == [G]
    assert t.inode(F).writers == {}
    assert t.grant(F, B) == Grant(F, 0)


def test_clean_lease_ignores_opens_for_write():
    t = LeaseTable(Policy.CLEAN_LEASE)
    t.grant(F, A)
    assert t.open_for_write(F, B) is None
    t.close_for_write(F, B)
    assert t.holders_of(F) == {A} and t.inode(F).writers == {}
    assert t.grant(F, C) == Grant(F, 0)


# --- never / ttl / always ---------------------------------------------------------------


@pytest.mark.parametrize("policy", [Policy.NEVER, Policy.TTL, Policy.ALWAYS])
def test_non_lease_policies_grant_and_recall_nothing(policy):
    t = LeaseTable(policy, needs_arming=True)
    assert not t.leasing
    assert t.grant(F, A) is None and t.grant(D, A, is_dir=True) is None
    assert t.begin_modification(F, B) is None
    t.modification_landed(F)
    assert t.open_for_write(F, B) is None
    t.close_for_write(F, B)
    assert t.begin_namespace_change(D, B) is None
    assert not t.wants_rearm(F) and not t.rearm_begin(F)
    assert t.holders_of(F) == frozenset() and t.state_of(F) is CLEAN
    assert t.drop_holder(A) == []


# --- stateful: random interleavings from several guests -------------------------------------

GUESTS = (A, B, C)
WRITERS = GUESTS + (HOST_LOCAL,)
FILES = (F, G)


class CleanLeaseMachine(RuleBasedStateMachine):
    """A model of what the daemon does, next to the table, checking that:

    * a guest is never a holder of an inode that is not CLEAN;
    * generations never decrease;
    * every holder present at a modification is in exactly one Recall for it
      (its lease is "live" from the grant until a Recall names it; a Recall
      naming a guest whose lease is not live is a double recall);
    * no modification lands while a guest other than the writer holds a live lease;
    * re-arming succeeds exactly when every landed modification is flushed,
      the page cache is clean and nothing landed since rearm_begin.

    Like the daemon, a modification lands in the same step as its go-ahead.
    """

    policy = Policy.CLEAN_LEASE
    needs_arming = False

    def __init__(self):
        super().__init__()
        self.t = LeaseTable(self.policy, needs_arming=self.needs_arming)
        self.t.inode(D, is_dir=True)
        self.live: dict[int, set[int]] = {ino: set() for ino in FILES + (D,)}
        self.generation = {ino: 0 for ino in FILES + (D,)}
        self.recalling: dict[int, int] = {}  # ino -> the writer waiting for its recall
        self.landed = {ino: 0 for ino in FILES}
        self.flushed = {ino: 0 for ino in FILES}
        self.flushes: list[tuple[int, int]] = []
        self.armed = {ino: not self.needs_arming for ino in FILES}
        self.names_changing = 0  # namespace changes in D begun and not landed
        # Guests (mounts) sent an inode's data without a lease, whose cache keeps it.
        self.tainted: dict[int, set[int]] = {ino: set() for ino in FILES}

    # --- reads -------------------------------------------------------------------

    @rule(guest=st.sampled_from(GUESTS), ino=st.sampled_from(FILES))
    def read(self, guest, ino):
        state = self.t.state_of(ino)
        grant = self.t.grant(ino, guest)
        expect = state is CLEAN and self.armed[ino] and not self.has_open_writers(ino)
        assert (grant is not None) == expect, (state, self.armed[ino])
        if grant is not None:
            assert grant == Grant(ino, self.t.inode(ino).generation)
            self.live[ino].add(guest)

    @rule(guest=st.sampled_from(GUESTS))
    def read_dir(self, guest):
        grant = self.t.grant(D, guest, is_dir=True)
        if self.names_changing:
            # A LOOKUP/READDIR answered while a name is being recalled must not
            # let the old name back into a cache.
            assert grant is None and self.t.names_changing(D)
            return
        assert grant == Grant(D, self.t.inode(D).generation)
        self.live[D].add(guest)

    def has_open_writers(self, ino) -> bool:
        return False  # clean-lease does not count opens

    @rule(guest=st.sampled_from(GUESTS), ino=st.sampled_from(FILES))
    def unleased_read_by_a_mount(self, guest, ino):
        """A mount read `ino` and got no lease: its page cache keeps the bytes.
        (During RECALLING the daemon makes such a read wait: `settled`.)"""
        if self.t.state_of(ino) is RECALLING or self.t.grant(ino, guest) is not None:
            if self.t.holders_of(ino) and guest in self.t.holders_of(ino):
                self.live[ino].add(guest)
            return
        self.t.unleased(ino, guest)
        self.tainted[ino].add(guest)

    # --- modifications ---------------------------------------------------------------

    def _recalled(self, ino, writer, recall: Recall) -> None:
        assert recall.ino == ino
        assert recall.generation == self.generation[ino] + 1
        assert recall.holders == (self.live[ino] | self.tainted[ino]) - {writer}
        for guest in recall.holders:  # each live holder is named once, then its lease is gone
            assert guest in self.live[ino] or guest in self.tainted[ino]
            self.live[ino].discard(guest)
        self.live[ino].discard(writer)  # the writer's own lease ends silently
        self.tainted[ino].clear()  # recalled: their copies will be gone
        assert self.t.holders_of(ino) == frozenset()
        self.recalling[ino] = writer

    def _land(self, ino, writer) -> None:
        assert not (self.live[ino] - {writer}), "a modification lands under a live lease"
        assert not (self.tainted[ino] - {writer}), "a modification lands over a cached copy"
        self.landed[ino] += 1
        assert self.t.modification_landed(ino) == self.landed[ino]

    @rule(writer=st.sampled_from(WRITERS), ino=st.sampled_from(FILES))
    def modify(self, writer, ino):
        state = self.t.state_of(ino)
        decision = self.t.begin_modification(ino, writer)
        if state is RECALLING:
            assert decision is WAIT
            return  # the writer waits for the recall, then asks again (another rule)
        if isinstance(decision, Recall):
            self._recalled(ino, writer, decision)
            return
        assert decision is None
        assert self.t.inode(ino).generation == self.generation[ino]
        self._land(ino, writer)

    @precondition(lambda self: self.recalling)
    @rule(data=st.data())
    def finish_recall(self, data):
        ino = data.draw(st.sampled_from(sorted(self.recalling)))
        writer = self.recalling.pop(ino)
        self.t.recall_finished(ino)
        assert self.t.state_of(ino) is DIRTY
        self._land(ino, writer)

    @rule(writer=st.sampled_from(WRITERS))
    def namespace_change(self, writer):
        before = self.t.holders_of(D)
        decision = self.t.begin_namespace_change(D, writer)
        assert self.t.inode(D).generation == self.generation[D] + 1
        if before - {writer}:
            assert decision == Recall(D, self.generation[D] + 1, before - {writer})
        else:
            assert decision is None
        assert self.t.holders_of(D) == before  # directory holders keep their lease
        self.names_changing += 1

    @precondition(lambda self: self.names_changing)
    @rule()
    def namespace_change_lands(self):
        self.t.namespace_change_landed(D)
        self.names_changing -= 1
        assert self.t.names_changing(D) == bool(self.names_changing)

    # --- flushes and re-arms -----------------------------------------------------------

    @rule(ino=st.sampled_from(FILES))
    def flush_start(self, ino):
        mark = self.t.flush_started(ino)
        assert mark == self.landed[ino]
        self.flushes.append((ino, mark))

    @precondition(lambda self: self.flushes)
    @rule(data=st.data())
    def flush_finish(self, data):
        ino, mark = self.flushes.pop(data.draw(st.integers(0, len(self.flushes) - 1)))
        self.t.flush_finished(ino, mark)
        self.flushed[ino] = max(self.flushed[ino], mark)

    @rule(ino=st.sampled_from(FILES), clean=st.booleans(), race=st.booleans(),
          armed=st.booleans())
    def rearm(self, ino, clean, race, armed):
        race = race and not self.tainted[ino]  # (a write over a cached copy recalls: `modify`)
        expect = (self.policy is Policy.CLEAN_LEASE and self.t.state_of(ino) is DIRTY
                  and self.flushed[ino] >= self.landed[ino])
        assert self.t.wants_rearm(ino) == (self.policy is Policy.CLEAN_LEASE
                                           and self.t.state_of(ino) is DIRTY)
        began = self.t.rearm_begin(ino)
        assert began == expect
        if not began:
            return
        if self.needs_arming:
            self.t.set_armed(ino, armed)  # the daemon's arm() may fail: then it reports unclean
            self.armed[ino] = armed
            clean = clean and armed
        if race:  # a host-local write after arming: the detector reports it, DIRTY lets it go
            assert self.t.begin_modification(ino, HOST_LOCAL) is None
            self._land(ino, HOST_LOCAL)
        done = self.t.rearm_finish(ino, clean)
        assert done == (clean and not race)
        if done:
            self.armed[ino] = True
            assert self.t.inode(ino).armed
        assert self.t.state_of(ino) is (CLEAN if done else DIRTY)

    @precondition(lambda self: self.needs_arming)
    @rule(ino=st.sampled_from(FILES), armed=st.booleans())
    def set_armed(self, ino, armed):
        self.t.set_armed(ino, armed)
        self.armed[ino] = armed

    # --- guests that go away -------------------------------------------------------------

    @rule(guest=st.sampled_from(GUESTS))
    def drop(self, guest):
        held = self.t.drop_holder(guest)
        assert sorted(held) == sorted(ino for ino, live in self.live.items() if guest in live)
        for live in self.live.values():
            live.discard(guest)
        for tainted in self.tainted.values():
            tainted.discard(guest)

    # --- invariants ------------------------------------------------------------------------

    @invariant()
    def holders_only_on_clean_inodes(self):
        for ino in FILES + (D,):
            if self.t.holders_of(ino):
                assert self.t.state_of(ino) is CLEAN, (ino, self.t.peek(ino))

    @invariant()
    def holders_are_the_live_leases(self):
        for ino in FILES + (D,):
            assert self.t.holders_of(ino) == self.live[ino]

    @invariant()
    def generations_never_decrease(self):
        for ino in FILES + (D,):
            leases = self.t.peek(ino)
            generation = leases.generation if leases else 0
            assert generation >= self.generation[ino]
            self.generation[ino] = generation

    @invariant()
    def leased_inodes_and_wants_arming(self):
        assert sorted(self.t.leased_inodes()) == sorted(i for i, live in self.live.items() if live)
        for ino in FILES:
            expect = (self.t.peek(ino) is not None and self.t.state_of(ino) is CLEAN
                      and not self.armed[ino] and not self.has_open_writers(ino))
            assert self.t.wants_arming(ino) == expect

    @invariant()
    def recalling_exactly_when_a_recall_is_open(self):
        for ino in FILES:
            assert (self.t.state_of(ino) is RECALLING) == (ino in self.recalling)


class NeedsArmingMachine(CleanLeaseMachine):
    needs_arming = True


class OpenLeaseMachine(CleanLeaseMachine):
    """The same model under open-lease, plus opens and closes for write."""

    policy = Policy.OPEN_LEASE

    def __init__(self):
        super().__init__()
        self.opens: dict[int, dict[int, int]] = {ino: {} for ino in FILES}

    def has_open_writers(self, ino) -> bool:
        return bool(self.opens[ino])

    @rule(writer=st.sampled_from(WRITERS), ino=st.sampled_from(FILES))
    def open_for_write(self, writer, ino):
        state = self.t.state_of(ino)
        decision = self.t.open_for_write(ino, writer)
        if state is RECALLING:
            assert decision is WAIT
            return
        self.opens[ino][writer] = self.opens[ino].get(writer, 0) + 1
        if self.live[ino]:  # even if the writer is the only holder: its lease ends
            assert isinstance(decision, Recall)
            self._recalled(ino, writer, decision)
            return
        assert decision is None

    @precondition(lambda self: any(self.opens.values()))
    @rule(data=st.data())
    def close_for_write(self, data):
        ino = data.draw(st.sampled_from([i for i in FILES if self.opens[i]]))
        writer = data.draw(st.sampled_from(sorted(self.opens[ino])))
        self.t.close_for_write(ino, writer)
        self.opens[ino][writer] -= 1
        if not self.opens[ino][writer]:
            del self.opens[ino][writer]

    @precondition(lambda self: self.recalling)
    @rule(data=st.data())
    def finish_recall(self, data):
        ino = data.draw(st.sampled_from(sorted(self.recalling)))
        self.recalling.pop(ino)
        self.t.recall_finished(ino)
        assert self.t.state_of(ino) is CLEAN  # nothing lands: the open is answered

    @rule(writer=st.sampled_from(WRITERS), ino=st.sampled_from(FILES))
    def modify(self, writer, ino):
        state = self.t.state_of(ino)
        decision = self.t.begin_modification(ino, writer)
        if state is RECALLING:
            assert decision is WAIT
            return
        if self.live[ino] or self.tainted[ino] - {writer}:
            assert isinstance(decision, Recall)
            self._recalled(ino, writer, decision)
            return
        assert decision is None
        self._land(ino, writer)

    @rule(guest=st.sampled_from(GUESTS))
    def drop(self, guest):
        super().drop(guest)
        for opens in self.opens.values():
            opens.pop(guest, None)

    @invariant()
    def no_holder_while_a_writer_has_it_open(self):
        for ino in FILES:
            if self.opens[ino]:
                assert self.t.holders_of(ino) == frozenset()
                assert self.t.inode(ino).writers == self.opens[ino]

    @invariant()
    def never_dirty(self):
        for ino in FILES:
            assert self.t.state_of(ino) is not DIRTY


_STATEFUL = settings(max_examples=120, stateful_step_count=40, deadline=None)
TestCleanLeaseMachine = CleanLeaseMachine.TestCase
TestCleanLeaseMachine.settings = _STATEFUL
TestNeedsArmingMachine = NeedsArmingMachine.TestCase
TestNeedsArmingMachine.settings = _STATEFUL
TestOpenLeaseMachine = OpenLeaseMachine.TestCase
TestOpenLeaseMachine.settings = _STATEFUL


class OpenLeaseNeedsArmingMachine(OpenLeaseMachine):
    needs_arming = True


TestOpenLeaseNeedsArmingMachine = OpenLeaseNeedsArmingMachine.TestCase
TestOpenLeaseNeedsArmingMachine.settings = _STATEFUL
