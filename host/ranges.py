"""Page ranges of one inode, and which of them are dirty: range-granular clean leases.

Pure: no I/O, no clock.  `host/leases.py` keeps one `RangeState` per regular
inode when the daemon runs with `--granularity range` (docs/design.md,
"Range granularity").  A range is a `Span` of whole pages; the attributes are
the pseudo-page -1, so `ATTRS` is `Span(-1, 0)` and every data span starting
at page 0 or later, when recalled, recalls the attributes too (an INVALIDATE
with `offset >= 0` drops them, as FUSE_NOTIFY_INVAL_INODE does).

What a `RangeState` promises (each method says how it keeps it):

* `dirty` extents are disjoint, sorted and never adjacent (adjacent or
  overlapping ones are merged), so "is this span dirty" is one extent's
  question.
* At most one span is being recalled at a time (`recalling`).
* `flights` are the spans of modifications whose recall is over and whose
  system call may still be running; a span with a flight over it is not
  clean, and no extent under a flight is re-armed.
* A span is *clean* (may be granted) when it overlaps no dirty extent, no
  span being recalled and no flight.  The attributes are clean only when the
  whole inode is: every write changes mtime.
"""

from __future__ import annotations

from dataclasses import dataclass, field

PAGE_SIZE = 4096
# A page index past any file: a span ending here runs to the end of the file,
# however far the file grows meanwhile.
END = 1 << 62


@dataclass(frozen=True, order=True)
class Span:
    """Pages [start, end) of an inode; page -1 stands for its attributes."""

    start: int
    end: int

    @staticmethod
    def of_bytes(offset: int, length: int) -> Span:
        """The pages holding bytes [offset, offset+length); `length <= 0`: to the end."""
        first = max(0, offset) // PAGE_SIZE
        if length <= 0:
            return Span(first, END)
        return Span(first, -(-(offset + length) // PAGE_SIZE))

    def overlaps(self, other: Span) -> bool:
        return self.start < other.end and other.start < self.end

    def covers(self, other: Span) -> bool:
        return self.start <= other.start and other.end <= self.end

    def hull(self, other: Span) -> Span:
        return Span(min(self.start, other.start), max(self.end, other.end))

    @property
    def invalidation(self) -> tuple[int, int]:
        """(offset, length) of the INVALIDATE that recalls this span: offset < 0
        is the attributes only; length 0 runs to the end of the file."""
        if self.end <= 0:
            return -1, 0
        first = max(self.start, 0)
        if self.end >= END:
            return first * PAGE_SIZE, 0
        return first * PAGE_SIZE, (self.end - first) * PAGE_SIZE

    @property
    def is_whole(self) -> bool:
        return self.start <= 0 and self.end >= END


ATTRS = Span(-1, 0)
WHOLE = Span(-1, END)


def written_span(offset: int, length: int, size: int) -> Span:
    """What a write of `length` bytes at `offset` changes in a file of `size`
    bytes (decided with no await between reading `size` and the decision).

    Inside the file: its pages.  Reaching past the end: from the old last page
    (short, or the end-of-file marker a guest keeps) to the end, since every
    page from the old end to the new one changes, holes included."""
    if offset + max(length, 1) > size:
        return Span(min(offset, size) // PAGE_SIZE, END)
    return Span.of_bytes(offset, max(length, 1))


def resized_span(new_size: int, size: int) -> Span:
    """What setting a file of `size` bytes to `new_size` changes: from the
    smaller size's page to the end (the head is untouched)."""
    return Span(min(new_size, size) // PAGE_SIZE, END)


@dataclass
class Extent:
    """A dirty span: modifications may land in it without a recall."""

    span: Span
    # The inode's landed count when a modification in it last landed: the
    # extent may be re-armed once a flush covers that count.
    last_landed: int = 0
    # Set by `rearm_candidates`; a modification landing meanwhile clears it.
    rearm_at: int | None = None


@dataclass
class RangeState:
    """The dirty extents, the span being recalled and the flights of one inode."""

    dirty: list[Extent] = field(default_factory=list)
    recalling: Span | None = None
    flights: list[Span] = field(default_factory=list)
    # What each holder was granted (merged spans; ATTRS for the attributes):
    # a recall goes only to the holders of what it covers.
    held: dict[int, list[Span]] = field(default_factory=dict)

    # --- questions ---------------------------------------------------------------

    @property
    def clean(self) -> bool:
        """Nothing dirty, recalled or in flight: the attributes may be granted."""
        return not self.dirty and self.recalling is None and not self.flights

    def clean_for(self, span: Span) -> bool:
        """May pages `span` be granted: nothing dirty, recalled or in flight over it?"""
        if self.recalling is not None and self.recalling.overlaps(span):
            return False
        if any(flight.overlaps(span) for flight in self.flights):
            return False
        return not any(extent.span.overlaps(span) for extent in self.dirty)

    def dirty_covers(self, span: Span) -> bool:
        """Is every page of `span` in one dirty extent (extents are never adjacent)?"""
        return any(extent.span.covers(span) for extent in self.dirty)

    # --- holders ---------------------------------------------------------------------

    def hold(self, guest: int, span: Span) -> None:
        """`guest` was granted `span` (merged with the data spans it holds;
        the attributes, ATTRS, are kept apart)."""
        spans = self.held.setdefault(guest, [])
        if span.start < 0:
            if ATTRS not in spans:
                spans.append(ATTRS)
            return
        for other in list(spans):
            if other.start >= 0 and other.start <= span.end and span.start <= other.end:
                spans.remove(other)
                span = span.hull(other)
        spans.append(span)

    def recall(self, span: Span, guests) -> frozenset[int]:
        """Of `guests`, those holding any of `span`: they lose it, and the
        caller recalls them.  Every recall covers the attributes (a data
        change moves mtime), so each holder of them is recalled.  A guest
        holding nothing any more is forgotten (`holding` is then False)."""
        recalled = set()
        for guest in guests:
            spans = self.held.get(guest)
            if spans is None:
                recalled.add(guest)  # (held before its spans were counted: recall it)
                continue
            kept, hit = [], False
            for s in spans:
                if s.start < 0:
                    hit = True  # the attributes
                elif not s.overlaps(span):
                    kept.append(s)
                else:
                    hit = True
                    if s.start < span.start:
                        kept.append(Span(s.start, span.start))
                    if span.end < s.end:
                        kept.append(Span(span.end, s.end))
            if not hit:
                continue
            recalled.add(guest)
            if kept:
                self.held[guest] = kept
            else:
                del self.held[guest]
        return frozenset(recalled)

    def holding(self, guest: int) -> bool:
        return guest in self.held

    def forget(self, guest: int) -> None:
        self.held.pop(guest, None)

    # --- changes -------------------------------------------------------------------

    def mark_dirty(self, span: Span, landed: int) -> None:
        """`span` is dirty from now on; merged with every extent it overlaps or touches."""
        merged = Extent(span, landed)
        kept = []
        for extent in self.dirty:
            if extent.span.start <= merged.span.end and merged.span.start <= extent.span.end:
                merged = Extent(merged.span.hull(extent.span),
                                max(merged.last_landed, extent.last_landed))
            else:
                kept.append(extent)
        kept.append(merged)
        kept.sort(key=lambda e: e.span.start)
        self.dirty = kept

    def landed_in(self, span: Span, landed: int) -> None:
        """A modification of `span` landed as the inode's `landed`-th: the
        extents under it wait for a flush that covers it (and are dirty, if
        they were not: the caller recalled it, or nobody could hold it)."""
        if not self.dirty_covers(span):
            self.mark_dirty(span, landed)
        for extent in self.dirty:
            if extent.span.overlaps(span):
                extent.last_landed = landed
                extent.rearm_at = None

    def flight_begins(self, span: Span) -> None:
        self.flights.append(span)

    def flight_ends(self, span: Span) -> None:
        try:
            self.flights.remove(span)
        except ValueError:
            pass

    def rearm_candidates(self, flushed: int) -> list[Span]:
        """The extents every landed modification of which is flushed, with no
        flight over them and no recall beside them: the daemon checks each
        (arm first, then cachestat of the span) and reports with `rearmed`."""
        if self.recalling is not None:
            return []
        spans = []
        for extent in self.dirty:
            if extent.last_landed <= flushed and not any(
                    flight.overlaps(extent.span) for flight in self.flights):
                extent.rearm_at = extent.last_landed
                spans.append(extent.span)
        return spans

    def rearmed(self, clean: set[Span]) -> list[Span]:
        """The spans of `clean` (checked clean since `rearm_candidates`) whose
        extent saw no landing meanwhile and has no flight now: they are clean
        again and may be granted.  Returns them."""
        done, kept = [], []
        for extent in self.dirty:
            if (extent.span in clean and extent.rearm_at is not None
                    and extent.rearm_at == extent.last_landed
                    and not any(flight.overlaps(extent.span) for flight in self.flights)):
                done.append(extent.span)
            else:
                kept.append(extent)
            extent.rearm_at = None
        self.dirty = kept
        return done
