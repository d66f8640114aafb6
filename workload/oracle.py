"""The oracle: the best hit rate any coherent cache of a given size can reach.

Replays the operation log against one ideal cache per guest: an LRU of
pages, keyed (file_id, block), that loses a page at the exact instant a
write of that page becomes visible and at no other time except eviction.
A coherent policy must invalidate no later than that (or it would serve
stale data) and usually does so earlier and over more pages, so with the
same size and LRU replacement its hit rate on the same log is at most the
oracle's. A policy that replaces pages differently or reads ahead can
differ either way, so hit/oracle is a yardstick of how close a policy
gets, not a proof of a bound.

Rules of the replay, in time order:

- A read operation (the ReadRecords sharing an actor and ``op``) happens at
  its earliest ``start_ns``. It is a hit iff every one of its blocks is in
  that actor's cache. Either way its blocks become most recently used and
  the missing ones are inserted, evicting least recently used pages.
- A write of a block removes it from every cache at the write's ``end_ns``,
  the instant the new version must be visible. A read starting in that
  very nanosecond may still return the old version (the checker agrees),
  so it is replayed before the write: the oracle gives the benefit of the
  doubt, as an upper bound must.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from workload.oplog import ReadRecord, Record, WriteRecord
from workload.stamp import BLOCK_SIZE

__all__ = ["OracleActor", "OracleResult", "oracle"]


@dataclass(frozen=True, slots=True)
class OracleActor:
    """The oracle's read operations and hits for one guest (or all of them).

    ``hit_rate`` is ``hits / read_ops``, and 0.0 when there were no reads.
    """

    read_ops: int
    hits: int
    hit_rate: float


@dataclass(frozen=True, slots=True)
class OracleResult:
    """The oracle over all guests, and per guest in ``per_actor``."""

    read_ops: int
    hits: int
    hit_rate: float
    per_actor: Mapping[str, OracleActor]


def _rate(hits: int, ops: int) -> float:
    return hits / ops if ops else 0.0


def oracle(
    records: Iterable[Record], cache_bytes: int, actors: Iterable[str] | None = None
) -> OracleResult:
    """Return the oracle hit rate for caches of ``cache_bytes`` per guest.

    ``actors`` names the guests, the actors that have a cache; their reads
    are replayed and other actors' reads are ignored. When None, every
    actor with at least one ReadRecord is a guest. Writes by anyone
    invalidate. Records need not be sorted.

    Raises:
      ValueError: if ``cache_bytes`` is negative.
      TypeError: if an item is neither a ``WriteRecord`` nor a ``ReadRecord``.
    """
    if cache_bytes < 0:
        raise ValueError(f"cache_bytes must be >= 0, got {cache_bytes}")
    capacity = cache_bytes // BLOCK_SIZE
    guests = None if actors is None else set(actors)

    # Few objects are kept alive per record on purpose: on a log of a
    # million records, holding a few lists and tuples per read op made the
    # cyclic garbage collector's rescans cost more than the replay itself.
    op_start: dict[tuple[str, int], int] = {}
    timeline: list[Record] = []
    for record in records:
        if type(record) is ReadRecord:
            if guests is not None and record.actor not in guests:
                continue
            op = (record.actor, record.op)
            start = op_start.get(op)
            if start is None or record.start_ns < start:
                op_start[op] = record.start_ns
        elif type(record) is not WriteRecord:
            raise TypeError(f"not an operation-log record: {record!r}")
        timeline.append(record)

    # One int per record: time * 2, plus 1 for writes, so that at equal
    # times reads sort before writes. A read op's blocks all get its start.
    times = [
        op_start[(x.actor, x.op)] << 1 if type(x) is ReadRecord else x.end_ns << 1 | 1
        for x in timeline
    ]
    order = sorted(range(len(timeline)), key=times.__getitem__)

    names = sorted({actor for actor, _ in op_start} if guests is None else guests)
    caches: dict[str, OrderedDict[tuple[int, int], None]] = {a: OrderedDict() for a in names}
    read_ops = dict.fromkeys(names, 0)
    hits = dict.fromkeys(names, 0)
    all_caches = list(caches.values())

    def replay(ops: dict[tuple[str, int], list[tuple[int, int]]]) -> None:
        for (actor, _), keys in ops.items():
            cache = caches[actor]
            read_ops[actor] += 1
            if all(key in cache for key in keys):
                hits[actor] += 1
            for key in keys:
                if key in cache:
                    cache.move_to_end(key)
                elif capacity:
                    cache[key] = None
                    if len(cache) > capacity:
                        cache.popitem(last=False)

    # The blocks of one read op share a time but may be interleaved with
    # other ops of that same time, so ops are gathered until the time
    # changes and replayed then, in the order they first appeared.
    pending: dict[tuple[str, int], list[tuple[int, int]]] = {}
    pending_time = -1
    for i in order:
        record = timeline[i]
        if type(record) is WriteRecord:
            if pending:
                replay(pending)
                pending = {}
            key = (record.file_id, record.block)
            for cache in all_caches:
                cache.pop(key, None)
            continue
        if pending and times[i] != pending_time:
            replay(pending)
            pending = {}
        pending_time = times[i]
        pending.setdefault((record.actor, record.op), []).append((record.file_id, record.block))
    replay(pending)

    per_actor = {a: OracleActor(read_ops[a], hits[a], _rate(hits[a], read_ops[a])) for a in names}
    total_ops = sum(read_ops.values())
    total_hits = sum(hits.values())
    return OracleResult(total_ops, total_hits, _rate(total_hits, total_ops), per_actor)
