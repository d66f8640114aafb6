"""The change journal: which byte ranges of a file were modified since a mark (pure).

A mark is (`boot_id`, `epoch`): the daemon's boot id (random per start) and
the journal's epoch counter at the time of the mark.  Every modification of
a journaled file is recorded, page aligned, under the epoch that was current
when it was let through; `since(mark)` answers the ranges recorded under a
later epoch.  The journal lives in the daemon's memory only: a mark of
another boot answers UNKNOWN (everything), never "nothing changed".

Per file the journal keeps disjoint, sorted intervals, each with the newest
epoch that touched it, so its size is bounded by the number of distinct
ranges written, not by the number of writes; past `max_intervals` the
closest neighbours are merged (reporting more, never less).

What the journal cannot see makes the file WHOLE_FILE for every mark from
then on in this boot (`taint`): a shared writable mapping (its stores raise
no event), a writer through an fd opened before the daemon's mark, or a
detector that gives no ranges (inotify).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from protocol.control import MAX_RANGES, ChangesStatus

PAGE = 4096
EVERYTHING = 1 << 62  # the end of a range that runs to the end of the file, whatever it is


def page_span(start: int, end: int) -> tuple[int, int]:
    """[start, end) widened to whole pages."""
    return start - start % PAGE, min(EVERYTHING, -(-end // PAGE) * PAGE)


@dataclass
class _FileJournal:
    since_epoch: int  # journaled from this epoch on (its first mark's)
    starts: list[int] = field(default_factory=list)
    ends: list[int] = field(default_factory=list)
    epochs: list[int] = field(default_factory=list)
    tainted: str | None = None  # why ranges cannot be trusted any more


class ChangeJournal:
    """Marks and the ranges modified since them, per file key `(st_dev, st_ino)`."""

    def __init__(self, boot_id: bytes, *, max_intervals: int = 32768) -> None:
        self.boot_id = boot_id
        self.epoch = 1
        self.max_intervals = max_intervals
        self._files: dict[tuple[int, int], _FileJournal] = {}
        self.recorded = 0

    def __contains__(self, key) -> bool:
        return key in self._files

    def __bool__(self) -> bool:
        return bool(self._files)

    def mark(self, key: tuple[int, int]) -> int:
        """Start (or go on) journaling `key`; return the mark's epoch.  Every
        modification let through after this call is recorded after it."""
        mark = self.epoch
        self.epoch += 1
        self._files.setdefault(key, _FileJournal(since_epoch=mark))
        return mark

    def record(self, key: tuple[int, int], start: int, end: int) -> None:
        """A modification of bytes [start, end) of `key` is let through now
        (`end` may be EVERYTHING).  Nothing happens for a file never marked."""
        f = self._files.get(key)
        if f is None or end <= start:
            return
        self.recorded += 1
        start, end = page_span(start, end)
        epoch = self.epoch
        i = bisect.bisect_right(f.ends, start)  # first interval ending after start
        j = bisect.bisect_left(f.starts, end, lo=i)  # first interval starting at or after end
        pieces = []
        if i < j and f.starts[i] < start:
            pieces.append((f.starts[i], start, f.epochs[i]))  # its part before
        pieces.append((start, end, epoch))
        if i < j and f.ends[j - 1] > end:
            pieces.append((end, f.ends[j - 1], f.epochs[j - 1]))  # its part after
        # Neighbours that touch and have the same epoch become one interval.
        if i > 0 and f.ends[i - 1] == pieces[0][0] and f.epochs[i - 1] == pieces[0][2]:
            i -= 1
            pieces[0] = (f.starts[i], pieces[0][1], pieces[0][2])
        if j < len(f.starts) and f.starts[j] == pieces[-1][1] and f.epochs[j] == pieces[-1][2]:
            pieces[-1] = (pieces[-1][0], f.ends[j], pieces[-1][2])
            j += 1
        f.starts[i:j] = [p[0] for p in pieces]
        f.ends[i:j] = [p[1] for p in pieces]
        f.epochs[i:j] = [p[2] for p in pieces]
        if len(f.starts) > self.max_intervals:
            self._halve(f)

    @staticmethod
    def _halve(f: _FileJournal) -> None:
        """Merge each pair of neighbours: more is reported, never less."""
        s, e, ep = [], [], []
        for k in range(0, len(f.starts), 2):
            last = min(k + 1, len(f.starts) - 1)
            s.append(f.starts[k]); e.append(f.ends[last]); ep.append(max(f.epochs[k:last + 1]))
        f.starts, f.ends, f.epochs = s, e, ep

    def taint(self, key: tuple[int, int], why: str) -> None:
        """From now on ranges of `key` cannot be trusted in this boot."""
        f = self._files.get(key)
        if f is not None and f.tainted is None:
            f.tainted = why

    def since(self, key: tuple[int, int], boot_id: bytes, epoch: int,
              size: int) -> tuple[ChangesStatus, tuple[tuple[int, int], ...], str]:
        """(status, ranges, why) for the mark (`boot_id`, `epoch`) of `key`,
        whose size is `size` now.  Ranges are page aligned, sorted, disjoint,
        cut at the size rounded up to a page, and at most MAX_RANGES (closest
        ones merged)."""
        if boot_id != self.boot_id or not 1 <= epoch < self.epoch:
            return (ChangesStatus.UNKNOWN, (),
                    "that mark is not of this boot of the daemon (it restarted since, or the "
                    "mark is not one it gave): assume everything changed")
        f = self._files.get(key)
        if f is None or epoch < f.since_epoch:
            return (ChangesStatus.UNKNOWN, (),
                    "this file was not journaled at that mark: take a mark of this file")
        if f.tainted is not None:
            return ChangesStatus.WHOLE_FILE, (), f.tainted
        limit = page_span(0, size)[1]
        ranges: list[list[int]] = []
        for s, e, ep in zip(f.starts, f.ends, f.epochs):
            if ep <= epoch or s >= limit:
                continue
            e = min(e, limit)
            if ranges and ranges[-1][1] == s:
                ranges[-1][1] = e
            else:
                ranges.append([s, e])
        while len(ranges) > MAX_RANGES:
            ranges = [[ranges[k][0], ranges[min(k + 1, len(ranges) - 1)][1]]
                      for k in range(0, len(ranges), 2)]
        return ChangesStatus.RANGES, tuple((s, e - s) for s, e in ranges), ""

    def intervals(self, key) -> list[tuple[int, int, int]]:
        """(start, end, epoch) of `key`, for tests."""
        f = self._files[key]
        return list(zip(f.starts, f.ends, f.epochs))
