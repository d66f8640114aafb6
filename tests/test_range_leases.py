"""Range granularity of the pure lease table (host/leases.py, host/ranges.py)
and of the guest cache's generations (guest/cache.py): hand-made interleavings
of reads and writes on overlapping and adjacent page spans, then a hypothesis
model that checks the invariant on random interleavings."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from guest.cache import PAGE_SIZE, GuestCache
from host.leases import WAIT, InodeState, LeaseTable, Recall
from host.ranges import ATTRS, END, WHOLE, RangeState, Span, resized_span, written_span
from protocol.messages import LEASE_GRANTED, Granularity, LeaseGrant, Policy

INO = 7
G1, G2, W = 1, 2, 3
P = PAGE_SIZE


def table() -> LeaseTable:
    return LeaseTable(Policy.CLEAN_LEASE, granularity=Granularity.RANGE)


def write(t: LeaseTable, span: Span, writer: int = W):
    """One modification of `span`, start to landing, with any recall ACKed at once."""
    decision = t.begin_modification(INO, writer, span=span)
    if isinstance(decision, Recall):
        t.recall_finished(INO)
    t.modification_begins(INO, span)
    t.modification_landed(INO, begun=True, span=span)
    return decision


def clean_all(t: LeaseTable) -> list[Span]:
    leases = t.peek(INO)
    t.flush_finished(INO, t.flush_started(INO))
    spans = t.rearm_candidates(INO)
    return t.rearmed(INO, set(spans)) if leases else []


# --- spans ---------------------------------------------------------------------


def test_spans_of_writes_inside_and_past_the_end_of_a_file():
    assert written_span(0, 10, 5 * P) == Span(0, 1)
    assert written_span(P - 1, 2, 5 * P) == Span(0, 2)  # straddles a page boundary
    # Reaching past the end: from the old last page (short, or the end marker) on.
    assert written_span(5 * P, 100, 5 * P + 10) == Span(5, END)
    assert written_span(5 * P + 10, 100, 5 * P + 10) == Span(5, END)
    assert written_span(9 * P, 1, 2 * P + 1) == Span(2, END)  # a hole: from the old end
    assert resized_span(P, 9 * P) == Span(1, END)  # shrink: the head stays
    assert resized_span(9 * P, P + 5) == Span(1, END)  # grow: from the old last page
    assert written_span(0, 1, -1) == WHOLE  # size unknown: everything
    assert Span(2, 3).invalidation == (2 * P, P)
    assert Span(5, END).invalidation == (5 * P, 0)
    assert ATTRS.invalidation == (-1, 0)
    assert WHOLE.invalidation == (0, 0)


def test_adjacent_dirty_extents_merge_and_disjoint_ones_do_not():
    r = RangeState()
    r.mark_dirty(Span(4, 5), 1)
    r.mark_dirty(Span(0, 1), 2)
    assert [e.span for e in r.dirty] == [Span(0, 1), Span(4, 5)]
    r.mark_dirty(Span(1, 4), 3)  # touches both
    assert [(e.span, e.last_landed) for e in r.dirty] == [(Span(0, 5), 3)]
    assert r.dirty_covers(Span(2, 5)) and not r.dirty_covers(Span(2, 6))


# --- the table, by hand ------------------------------------------------------------


def test_the_first_write_to_a_clean_range_recalls_only_that_range_from_every_holder():
    t = table()
    assert t.grant(INO, G1, span=Span(0, 1)) is not None
    assert t.grant(INO, G2, span=Span(4, 5)) is not None
    recall = t.begin_modification(INO, W, span=Span(4, 5))
    assert isinstance(recall, Recall)
    # Only the holders of those pages: G1 holds [0, 1) only, and keeps it.
    assert recall.holders == {G2} and recall.span == Span(4, 5) and not recall.whole
    # While it runs: the head is granted, the recalled pages and the attributes are not.
    assert t.grant(INO, G1, span=Span(0, 1)) is not None
    assert t.grant(INO, G1, span=Span(4, 5)) is None
    assert t.grant(INO, G1, span=Span(3, 5)) is None  # overlapping
    assert t.grant(INO, G1) is None  # attributes: mtime changes with every write
    t.recall_finished(INO)
    t.modification_begins(INO, Span(4, 5))
    assert t.grant(INO, G2, span=Span(3, 4)) is not None  # adjacent, clean
    t.modification_landed(INO, begun=True, span=Span(4, 5))
    assert t.holders_of(INO) == {G1, G2}
    assert t.state_of(INO) is InodeState.DIRTY
    # A holder of the attributes is recalled by every data change (mtime moves).
    write(t, Span(0, 9))
    t.flush_finished(INO, t.flush_started(INO))
    t.rearmed(INO, set(t.rearm_candidates(INO)))
    t.grant(INO, G1)
    t.grant(INO, G2, span=Span(0, 1))
    recall = t.begin_modification(INO, W, span=Span(7, 8))
    assert recall.holders == {G1}
    t.recall_finished(INO)
    assert t.holders_of(INO) == {G2}  # G1 held the attributes only


def test_a_write_into_an_already_dirty_range_sends_nothing():
    t = table()
    t.grant(INO, G1, span=Span(0, 8))
    assert isinstance(write(t, Span(2, 6)), Recall)
    assert t.holders_of(INO) == {G1}  # it keeps [0, 2) and [6, 8)
    assert write(t, Span(3, 4)) is None
    assert write(t, Span(2, 6), writer=G1) is None
    # A write to another clean range of the partly dirty inode recalls that range only.
    recall = t.begin_modification(INO, W, span=Span(6, 7))
    assert isinstance(recall, Recall) and recall.span == Span(6, 7) and recall.holders == {G1}


def test_a_write_partly_over_a_dirty_range_recalls():
    t = table()
    t.grant(INO, G1, span=Span(0, 4))
    write(t, Span(1, 2))
    recall = t.begin_modification(INO, W, span=Span(1, 3))
    assert isinstance(recall, Recall) and recall.holders == {G1}


def test_overlapping_and_adjacent_modifications_wait_for_a_running_recall():
    t = table()
    t.grant(INO, G1, span=Span(0, 8))
    assert isinstance(t.begin_modification(INO, W, span=Span(2, 4)), Recall)
    assert t.begin_modification(INO, G2, span=Span(3, 5)) is WAIT  # overlapping
    assert t.begin_modification(INO, G2, span=Span(4, 5)) is WAIT  # adjacent: one recall at a time
    t.recall_finished(INO)
    t.modification_begins(INO, Span(2, 4))
    # Asked again: only the part beyond the dirty pages needs a recall.
    recall = t.begin_modification(INO, G2, span=Span(4, 5))
    assert isinstance(recall, Recall) and recall.span == Span(4, 5)
    # The first one is still in flight over [2, 4): a write inside it goes ahead
    # beside the recall of [4, 5), which it does not overlap.
    assert t.begin_modification(INO, G1, span=Span(2, 3)) is None
    assert t.begin_modification(INO, G1, span=Span(3, 5)) is WAIT


def test_size_changes_recall_the_attributes_and_the_tail_not_the_head():
    t = table()
    t.grant(INO, G1, span=Span(0, 2))
    t.grant(INO, G2, span=Span(2, 3))  # the short last page (size 2P + 10)
    recall = t.begin_modification(INO, W, span=written_span(2 * P + 10, 100, 2 * P + 10))
    assert recall.span == Span(2, END) and recall.span.invalidation == (2 * P, 0)
    t.recall_finished(INO)
    assert t.grant(INO, G1, span=Span(0, 2)) is not None
    assert t.grant(INO, G1, span=Span(2, 3)) is None
    assert t.grant(INO, G1, span=Span(9, 10)) is None  # what the append will bring
    assert t.grant(INO, G1) is None


def test_a_chmod_recalls_the_attributes_only():
    t = table()
    t.grant(INO, G1, span=Span(0, 2))
    t.grant(INO, G1)
    recall = t.begin_modification(INO, W, span=ATTRS)
    assert recall.span.invalidation == (-1, 0)
    t.recall_finished(INO)
    assert t.grant(INO, G1, span=Span(0, 2)) is not None
    assert t.grant(INO, G2) is None


def test_a_flushed_clean_range_is_regranted_on_its_own():
    t = table()
    t.grant(INO, G1, span=Span(0, 10))
    write(t, Span(1, 2))
    mark = t.flush_started(INO)
    # A second range dirtied after the flush began; its write is still in flight.
    t.begin_modification(INO, W, span=Span(6, 7))
    t.recall_finished(INO)
    t.modification_begins(INO, Span(6, 7))
    t.flush_finished(INO, mark)
    assert t.rearm_candidates(INO) == [Span(1, 2)]
    assert t.rearmed(INO, {Span(1, 2)}) == [Span(1, 2)]
    assert t.grant(INO, G2, span=Span(1, 2)) is not None
    assert t.grant(INO, G2, span=Span(6, 7)) is None
    assert t.grant(INO, G2) is None  # attributes wait for the whole inode
    t.modification_landed(INO, begun=True, span=Span(6, 7))
    assert t.rearm_candidates(INO) == []  # not flushed yet
    assert clean_all(t) == [Span(6, 7)]
    assert t.state_of(INO) is InodeState.CLEAN
    assert t.grant(INO, G2) is not None


def test_a_landing_between_the_candidates_and_the_check_voids_that_range_only():
    t = table()
    t.grant(INO, G1, span=Span(0, 10))
    write(t, Span(1, 2))
    write(t, Span(5, 6))
    t.flush_finished(INO, t.flush_started(INO))
    assert t.rearm_candidates(INO) == [Span(1, 2), Span(5, 6)]
    assert write(t, Span(5, 6)) is None  # lands between arming and cachestat
    assert t.rearmed(INO, {Span(1, 2), Span(5, 6)}) == [Span(1, 2)]
    assert t.grant(INO, G1, span=Span(5, 6)) is None


def test_no_range_is_rearmed_while_a_recall_runs_or_a_flight_covers_it():
    t = table()
    t.grant(INO, G1, span=Span(0, 10))
    write(t, Span(1, 2))
    t.flush_finished(INO, t.flush_started(INO))
    assert isinstance(t.begin_modification(INO, W, span=Span(8, 9)), Recall)
    assert t.rearm_candidates(INO) == []
    t.recall_finished(INO)
    t.modification_begins(INO, Span(8, 9))
    assert t.begin_modification(INO, G1, span=Span(1, 2)) is None
    t.modification_begins(INO, Span(1, 2))
    assert t.rearm_candidates(INO) == []  # [1, 2) has a flight, [8, 9) one too


def test_tainted_guests_are_recalled_whole_and_holders_only_the_range():
    t = table()
    t.grant(INO, G1, span=Span(0, 1))
    write(t, Span(4, 5))
    t.unleased(INO, G2)  # a mount read the dirty pages without a lease
    recall = t.begin_modification(INO, W, span=Span(4, 5))  # dirty: only G2 to recall
    assert isinstance(recall, Recall) and recall.holders == {G2} and recall.whole == {G2}
    t.recall_finished(INO)
    t.unleased(INO, G2)
    recall = t.begin_modification(INO, W, span=Span(0, 1))
    assert recall.holders == {G1, G2} and recall.whole == {G2} and recall.span == Span(0, 1)


def test_inode_granularity_is_unchanged():
    t = LeaseTable(Policy.CLEAN_LEASE)
    t.grant(INO, G1)
    recall = t.begin_modification(INO, W, span=Span(4, 5))
    assert recall.span == WHOLE and recall.holders == {G1}
    assert t.holders_of(INO) == frozenset()  # the whole lease ended
    assert not t.ranged(INO)
    # Range granularity is for clean-lease only.
    assert LeaseTable(Policy.OPEN_LEASE, granularity=Granularity.RANGE).granularity \
        is Granularity.INODE


# --- generations, exact per range (guest cache) ------------------------------------


def _cache() -> GuestCache:
    clock = [0.0]
    cache = GuestCache(Policy.CLEAN_LEASE, 1 << 20, clock=lambda: clock[0])
    cache.granularity = Granularity.RANGE
    cache.renewed(0.0)
    return cache


def _grant(generation: int) -> LeaseGrant:
    return LeaseGrant(INO, generation, 1000, LEASE_GRANTED)


def test_a_reply_racing_an_invalidation_of_its_range_is_dropped_one_for_another_range_is_not():
    cache = _cache()
    # Two READ replies granted at generation 3 are on their way when the
    # invalidation of pages [4, 5) (generation 4) arrives.
    cache.invalidate_inode(INO, 4, 4 * P, P)
    assert cache.accept_grant(_grant(3), (4, 5)) is False  # its range: raced, dropped
    assert cache.accept_grant(_grant(3), (3, 5)) is False  # overlapping
    assert cache.accept_grant(_grant(3), (0, 4)) is True  # adjacent, another range: kept
    assert cache.accept_grant(_grant(3)) is False  # attributes: every invalidation drops them
    assert cache.accept_grant(_grant(4), (4, 5)) is True  # granted after it
    cache.invalidate_inode(INO, 5, -1, 0)  # attributes only
    assert cache.accept_grant(_grant(4), (4, 5)) is True
    assert cache.accept_grant(_grant(4)) is False
    cache.invalidate_inode(INO, 6, 0, 0)  # the whole inode
    assert cache.accept_grant(_grant(5), (9, 10)) is False


def test_the_guest_drops_only_the_pages_of_the_recalled_range():
    cache = _cache()
    assert cache.accept_grant(_grant(1), (0, 4))
    cache.store_pages(INO, 0, b"a" * (3 * P + 10), 4 * P)
    cache.invalidate_inode(INO, 2, P, P)
    assert cache.may_serve_data(INO)
    assert cache.read_pages(INO, 0, P) == b"a" * P
    assert cache.read_pages(INO, P, 10) is None
    assert cache.read_pages(INO, 2 * P, P + 10) == b"a" * (P + 10)
    cache.invalidate_inode(INO, 3, 3 * P, 0)  # the tail: an append
    assert cache.read_pages(INO, 3 * P, 10) is None and cache.read_pages(INO, 2 * P, P) is not None
    cache.invalidate_inode(INO, 4, 0, 0)
    assert not cache.may_serve_data(INO)


def test_own_writes_drop_their_pages_and_the_cached_end_of_file():
    cache = _cache()
    cache.accept_grant(_grant(1), (0, 4))
    cache.store_pages(INO, 0, b"a" * (3 * P + 10), 4 * P)  # page 3 is short: the end
    assert cache.own_write_span(INO, P, 10) == (P, P)
    assert cache.own_write_span(INO, 3 * P + 10, 5) == (3 * P, 0)
    assert cache.own_write_span(INO, 8 * P, 5) == (3 * P, 0)  # a hole after the end
    cache.granularity = Granularity.INODE
    assert cache.own_write_span(INO, P, 10) == (0, 0)


def test_a_grant_sent_before_our_own_write_past_the_end_is_dropped_whatever_its_pages():
    """The host counts a write past the end as changing everything from the
    old last page on, which the writer cannot tell if it never cached that
    page.  A READ of it that the host granted before the write and whose reply
    arrives after the write's must be dropped (the host does not recall the
    writer); before the fix it was kept, with the old end of file."""
    cache = _cache()
    cache.accept_grant(_grant(1), (0, 2))
    cache.store_pages(INO, 0, b"a" * (2 * P), 2 * P)  # the file is 3P + 10; page 2 not cached
    span = cache.own_write_span(INO, 8 * P, 5)  # a hole past the end
    assert span == (8 * P, P)
    cache.own_modification_done(INO, 2, span)
    assert cache.accept_grant(_grant(1), (2, 3)) is False  # READ of the old last page
    assert cache.read_pages(INO, 0, 2 * P) == b"a" * (2 * P)  # its pages stay
    assert cache.accept_grant(_grant(2), (2, 3)) is True


# --- hypothesis: random interleavings against a model -------------------------------

PAGES = 4
spans = st.builds(lambda a, n: Span(a, min(a + n, PAGES) if n < PAGES else END),
                  st.integers(0, PAGES - 1), st.integers(1, PAGES))
step = st.one_of(
    st.tuples(st.just("grant"), st.sampled_from([G1, G2, W]), st.none() | spans),
    st.tuples(st.just("begin"), st.sampled_from([G1, G2, W]), spans | st.just(ATTRS)),
    st.tuples(st.just("write"), st.sampled_from([G1, G2, W]), spans),  # begin, ack at once
    st.tuples(st.just("land"), st.integers(0, 3), st.none()),
    st.tuples(st.just("ack"), st.none(), st.none()),
    st.tuples(st.just("rearm"), st.booleans(), st.none()),
)


@settings(max_examples=500, deadline=None)
@given(st.lists(step, max_size=40))
def test_no_guest_holds_pages_a_modification_may_change(steps):
    """The invariant on random interleavings: from the moment a modification
    may land (modification_begins) until the range is re-armed, no guest but
    its writer holds a grant on any page it changes, nor the attributes."""
    t = table()
    held: dict[int, set[int]] = {G1: set(), G2: set(), W: set()}  # pages; -1: attributes
    flights: list[tuple[int, Span]] = []
    recall: tuple[int, Span, Recall] | None = None

    def pages(span: Span | None) -> set[int]:
        if span is None:
            return {-1}
        return set(range(max(span.start, -1), min(span.end, PAGES + 1)))

    def drop(guest: int, span: Span) -> None:
        held[guest] -= pages(span) | {-1}

    def check() -> None:
        for writer, span in flights:
            for guest, mine in held.items():
                if guest != writer:
                    assert not mine & (pages(span) | {-1}), (guest, mine, span)

    for kind, a, b in steps:
        if kind == "grant":
            if t.grant(INO, a, span=b) is not None:
                held[a] |= pages(b) if b is not None else {-1}
        elif kind in ("begin", "write"):
            decision = t.begin_modification(INO, a, span=b)
            if decision is WAIT:
                continue
            drop(a, b)  # the writer forgets its own copy of what it changes
            if isinstance(decision, Recall):
                assert recall is None
                for guest in decision.holders:
                    drop(guest, WHOLE if guest in decision.whole else decision.span)
                recall = (a, b, decision)
                if kind == "write":
                    recall = None
                    t.recall_finished(INO)
                    t.modification_begins(INO, b)
                    flights.append((a, b))
            else:
                t.modification_begins(INO, b)
                flights.append((a, b))
        elif kind == "ack" and recall is not None:
            writer, span, _ = recall
            recall = None
            t.recall_finished(INO)
            t.modification_begins(INO, span)
            flights.append((writer, span))
        elif kind == "land" and flights:
            writer, span = flights.pop(a % len(flights))
            t.modification_landed(INO, begun=True, span=span)
        elif kind == "rearm":
            if a:
                t.flush_finished(INO, t.flush_started(INO))
            candidates = t.rearm_candidates(INO)
            t.rearmed(INO, set(candidates))
        check()
        # What is dirty is never granted: every page of a flight stays ungranted.
        for _, span in flights:
            assert t.grant(INO, G1, span=span) is None or not pages(span)
