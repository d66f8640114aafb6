"""The stale-read checker: every block read is held to the register rule.

Each (file_id, block) is a register. A read that returned version V
(written by w1) is *stale* when some write w2 of the same block satisfies::

    w1.end_ns < w2.start_ns  and  w2.end_ns < read.start_ns

that is, w2 definitely replaced V, and definitely finished, before the read
began; no linearization can place the read before w2. The read's age is
``read.start_ns - w2.end_ns`` for the earliest-finishing such w2: how long
the newer data had been visible when the read still returned V.

The initial version (writer 0, seq 0) is a write with start = end = 0
unless the log records that version's write itself.

Besides stale reads, the checker counts reads that cannot be right at all:

- ``corrupt``: the block did not parse (by ``CorruptBlock.kind``).
- ``phantom``: a version that no write of that block produced.
- ``future``: a version whose write started only after the read had ended.
  The clock is system-wide, so this means a bug in the harness's logging,
  not in a policy, but it must not pass silently.

Records need not be sorted. The cost is O(n log n).
"""

from __future__ import annotations

import heapq
from bisect import bisect_left, bisect_right
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Final

from workload.oplog import ReadRecord, Record, WriteRecord

__all__ = ["ActorCounts", "CheckResult", "StaleExample", "check", "MAX_EXAMPLES"]

MAX_EXAMPLES: Final = 10
_INITIAL: Final = (0, 0)


@dataclass(frozen=True, slots=True)
class ActorCounts:
    """What the checker found in one actor's reads (or in all of them).

    ``reads`` and ``stale_reads`` count blocks; ``read_ops`` and
    ``stale_ops`` count read operations, a stale op being one with at least
    one stale block. ``worst_stale_age_ns`` is 0 when nothing was stale.
    ``corrupt`` maps ``CorruptBlock.kind`` to a count and holds no zeros.
    """

    reads: int
    read_ops: int
    stale_reads: int
    stale_ops: int
    worst_stale_age_ns: int
    corrupt: Mapping[str, int]
    phantom: int
    future: int

    @property
    def ok(self) -> bool:
        """True when every read returned a version it was allowed to."""
        return not (self.stale_reads or self.corrupt or self.phantom or self.future)


@dataclass(frozen=True, slots=True)
class StaleExample:
    """One stale read, with the writes that make it stale.

    ``version`` is the write that produced what the read returned (None for
    the initial content when the log has no record of it); ``overwrite`` is
    the earliest-finishing write that definitely replaced it before the
    read began; ``age_ns = read.start_ns - overwrite.end_ns``.
    """

    read: ReadRecord
    version: WriteRecord | None
    overwrite: WriteRecord
    age_ns: int


@dataclass(frozen=True, slots=True)
class CheckResult:
    """The checker's verdict on a whole log.

    The counts are those of ``ActorCounts``, over all actors; ``per_actor``
    has one entry per actor that read anything. ``examples`` holds up to
    ``MAX_EXAMPLES`` stale reads, oldest age first (earlier reads first
    among equal ages).
    """

    reads: int
    read_ops: int
    stale_reads: int
    stale_ops: int
    worst_stale_age_ns: int
    corrupt: Mapping[str, int]
    phantom: int
    future: int
    per_actor: Mapping[str, ActorCounts]
    examples: tuple[StaleExample, ...]

    @property
    def ok(self) -> bool:
        """True when every read returned a version it was allowed to."""
        return not (self.stale_reads or self.corrupt or self.phantom or self.future)


class _Block:
    """The writes of one block, arranged to answer "is this read stale?"
    with two bisections.

    Writes are sorted by end. ``max_start[i]`` is the latest start among the
    first i+1 of them; it never decreases, so the first write (by end) that
    started after some time t is found by bisecting it.
    """

    __slots__ = ("versions", "ends", "max_start", "writes")

    def __init__(self, writes: list[WriteRecord]) -> None:
        writes.sort(key=lambda w: w.end_ns)
        # Staleness is judged against the writes known to have landed; one whose
        # outcome is unknown ("uncertain") only makes its version a possible one.
        every = writes
        writes = [w for w in every if w.via != "uncertain"]
        self.writes = writes
        self.ends = [w.end_ns for w in writes]
        self.max_start: list[int] = []
        latest = -1
        for w in writes:
            latest = max(latest, w.start_ns)
            self.max_start.append(latest)
        # (writer, seq) -> (earliest start, the write with the latest end).
        # A version written more than once is stale only if even its last
        # write was overwritten, and is from the future only if even its
        # first write started after the read ended.
        self.versions: dict[tuple[int, int], tuple[int, WriteRecord]] = {}
        for w in every:  # ascending end: the last one seen has the latest end
            key = (w.writer, w.seq)
            seen = self.versions.get(key)
            first_start = w.start_ns if seen is None else min(seen[0], w.start_ns)
            self.versions[key] = (first_start, w)


class _Tally:
    """Mutable counts for one actor while the checker runs."""

    __slots__ = ("reads", "ops", "stale_reads", "stale_ops", "worst", "corrupt", "phantom", "future")

    def __init__(self) -> None:
        self.reads = 0
        self.ops: set[int] = set()
        self.stale_reads = 0
        self.stale_ops: set[int] = set()
        self.worst = 0
        self.corrupt: Counter[str] = Counter()
        self.phantom = 0
        self.future = 0

    def freeze(self) -> ActorCounts:
        return ActorCounts(
            reads=self.reads,
            read_ops=len(self.ops),
            stale_reads=self.stale_reads,
            stale_ops=len(self.stale_ops),
            worst_stale_age_ns=self.worst,
            corrupt=dict(self.corrupt),
            phantom=self.phantom,
            future=self.future,
        )


def check(records: Iterable[Record]) -> CheckResult:
    """Classify every read in ``records`` against every write.

    Raises:
      TypeError: if an item is neither a ``WriteRecord`` nor a ``ReadRecord``.
    """
    by_block: dict[tuple[int, int], list[WriteRecord]] = {}
    reads: list[ReadRecord] = []
    for record in records:
        if type(record) is ReadRecord:
            reads.append(record)
        elif type(record) is WriteRecord:
            by_block.setdefault((record.file_id, record.block), []).append(record)
        else:
            raise TypeError(f"not an operation-log record: {record!r}")
    blocks = {key: _Block(writes) for key, writes in by_block.items()}

    tallies: dict[str, _Tally] = {}
    # Min-heap of the MAX_EXAMPLES worst: (age, -index, read, version, overwrite).
    # -index makes earlier reads win ties, and being unique it keeps the
    # tuple comparison from ever reaching the records.
    worst: list[tuple[int, int, ReadRecord, WriteRecord | None, WriteRecord]] = []

    for index, read in enumerate(reads):
        tally = tallies.get(read.actor)
        if tally is None:
            tally = tallies[read.actor] = _Tally()
        tally.reads += 1
        tally.ops.add(read.op)
        if read.corrupt is not None:
            tally.corrupt[read.corrupt] += 1
            continue

        block = blocks.get((read.file_id, read.block))
        key = (read.writer, read.seq)
        known = None if block is None else block.versions.get(key)
        if known is None:
            if key != _INITIAL:
                tally.phantom += 1
                continue
            if block is None:
                continue  # never written: the initial version is the only one
            first_start, version, version_end = 0, None, 0
        else:
            first_start, version = known
            version_end = version.end_ns
        if first_start > read.end_ns:
            tally.future += 1
            continue

        # Writes that finished before the read began are block.writes[:before];
        # the first of all writes (by end) that started after the version's
        # write ended is block.writes[after]. Stale iff that one is among them.
        before = bisect_left(block.ends, read.start_ns)
        after = bisect_right(block.max_start, version_end)
        if after >= before:
            continue
        age = read.start_ns - block.ends[after]
        tally.stale_reads += 1
        tally.stale_ops.add(read.op)
        if age > tally.worst:
            tally.worst = age
        item = (age, -index, read, version, block.writes[after])
        if len(worst) < MAX_EXAMPLES:
            heapq.heappush(worst, item)
        elif item > worst[0]:
            heapq.heapreplace(worst, item)

    per_actor = {actor: tally.freeze() for actor, tally in sorted(tallies.items())}
    corrupt: Counter[str] = Counter()
    for counts in per_actor.values():
        corrupt.update(counts.corrupt)
    worst.sort(reverse=True)
    return CheckResult(
        reads=sum(c.reads for c in per_actor.values()),
        read_ops=sum(c.read_ops for c in per_actor.values()),
        stale_reads=sum(c.stale_reads for c in per_actor.values()),
        stale_ops=sum(c.stale_ops for c in per_actor.values()),
        worst_stale_age_ns=max((c.worst_stale_age_ns for c in per_actor.values()), default=0),
        corrupt=dict(corrupt),
        phantom=sum(c.phantom for c in per_actor.values()),
        future=sum(c.future for c in per_actor.values()),
        per_actor=per_actor,
        examples=tuple(
            StaleExample(read=r, version=v, overwrite=o, age_ns=age)
            for age, _, r, v, o in worst
        ),
    )


def corrupt_reads(records, writes) -> tuple[int, int]:
    """(torn by a host-side race, unexplained) corrupt blocks read.

    ext4 does not make a buffered pread atomic against a concurrent write of the
    same block, whatever any cache does: a torn block is the file system's doing
    where a host-local write of that block (O_DIRECT or buffered, outside the
    daemon) overlapped the read.  Any other corrupt block counts."""
    host_local: dict[tuple[int, int], list[WriteRecord]] = {}
    for w in writes:
        if w.via == "host-local":
            host_local.setdefault((w.file_id, w.block), []).append(w)
    torn = unexplained = 0
    for read in records:
        if not isinstance(read, ReadRecord) or read.corrupt is None:
            continue
        if any(w.start_ns <= read.end_ns and w.end_ns >= read.start_ns
               for w in host_local.get((read.file_id, read.block), ())):
            torn += 1
        else:
            unexplained += 1
    return torn, unexplained
