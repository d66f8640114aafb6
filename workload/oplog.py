"""The operation log: what every process wrote and read, one block per record.

Each process appends to its own file (JSON lines), so no two processes ever
share a file and no locking is needed; ``read_logs`` merges the files after
the run. All times are ``time.monotonic_ns()``, which is system-wide, so
records from different processes on one host compare directly.

A line is a JSON object whose ``"type"`` is ``"write"`` or ``"read"`` and
whose other keys are the record's field names.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from operator import attrgetter
from typing import Final, TextIO, TypeAlias

__all__ = [
    "VIAS",
    "LogFormatError",
    "LogWriter",
    "ReadRecord",
    "Record",
    "WriteRecord",
    "parse_record",
    "read_logs",
]

# "guest": written through the daemon by a guest. "host-local": written to
# the export directly by a process on the host, not through the daemon.
# "uncertain": a guest write whose outcome its guest could not learn (the host
# restarted while it was under way: guest.client.OutcomeUnknown).  It may or
# may not have landed: its version is a possible one, never a reason to call
# another read stale.
VIAS: Final = frozenset({"guest", "host-local", "uncertain"})

_COMPACT: Final = (",", ":")


class LogFormatError(ValueError):
    """A log line that is not a record."""


def _check_interval(record: WriteRecord | ReadRecord) -> None:
    if record.end_ns < record.start_ns:
        raise ValueError(f"end_ns {record.end_ns} is before start_ns {record.start_ns}")


@dataclass(frozen=True, slots=True)
class WriteRecord:
    """One block written by one write operation.

    A write of several blocks gives one record per block, all with the same
    ``start_ns``/``end_ns``. ``writer``/``seq`` are the stamp written.
    ``first_dirty`` is True when this write was the one that dirtied a clean
    inode (and so paid for the invalidation), False when the inode was
    already dirty, None when the writer cannot tell. ``via`` is one of
    ``VIAS``.

    Raises:
      ValueError: if ``via`` is not in ``VIAS`` or ``end_ns < start_ns``.
    """

    actor: str
    file_id: int
    block: int
    writer: int
    seq: int
    start_ns: int
    end_ns: int
    first_dirty: bool | None
    via: str

    def __post_init__(self) -> None:
        if self.via not in VIAS:
            raise ValueError(f"via must be one of {sorted(VIAS)}, got {self.via!r}")
        _check_interval(self)

    def to_json(self) -> str:
        """Return the record as one JSON line, without the newline."""
        return _to_json(self, "write")

    @classmethod
    def from_json(cls, line: str) -> WriteRecord:
        """Return the record ``to_json`` gave ``line`` for.

        Raises:
          LogFormatError: if ``line`` is not a write record.
        """
        return _from_json(cls, line, "write")


@dataclass(frozen=True, slots=True)
class ReadRecord:
    """One block returned by one read operation.

    ``op`` counts read operations per actor, so the blocks of one read share
    it. ``writer``/``seq`` are the stamp the read returned. ``hit`` says
    whether the reader served the block from its own cache. ``corrupt`` is
    the ``CorruptBlock.kind`` when the block did not parse; then ``writer``
    and ``seq`` are -1.

    Raises:
      ValueError: if ``end_ns < start_ns``.
    """

    actor: str
    file_id: int
    block: int
    writer: int
    seq: int
    start_ns: int
    end_ns: int
    hit: bool
    op: int
    corrupt: str | None

    def __post_init__(self) -> None:
        _check_interval(self)

    def to_json(self) -> str:
        """Return the record as one JSON line, without the newline."""
        return _to_json(self, "read")

    @classmethod
    def from_json(cls, line: str) -> ReadRecord:
        """Return the record ``to_json`` gave ``line`` for.

        Raises:
          LogFormatError: if ``line`` is not a read record.
        """
        return _from_json(cls, line, "read")


Record: TypeAlias = WriteRecord | ReadRecord

_TYPES: Final[dict[str, type[WriteRecord] | type[ReadRecord]]] = {
    "write": WriteRecord,
    "read": ReadRecord,
}


def _to_json(record: Record, kind: str) -> str:
    # From the field names (a slots dataclass's __slots__, in field order), not
    # dataclasses.asdict: asdict deep-copies and is several times slower, which
    # shows on a log of millions of blocks.
    line = {"type": kind}
    for name in record.__slots__:
        line[name] = getattr(record, name)
    return json.dumps(line, separators=_COMPACT)


def _from_json(cls: type[WriteRecord] | type[ReadRecord], line: str, kind: str) -> Record:
    record = parse_record(line)
    if not isinstance(record, cls):
        raise LogFormatError(f"not a {kind} record: {line!r}")
    return record


def parse_record(line: str) -> Record:
    """Return the record one log line holds, whichever type it is.

    Raises:
      LogFormatError: if ``line`` is not JSON, has an unknown ``"type"``,
        missing or extra fields, or values the record refuses.
    """
    try:
        fields = json.loads(line)
        cls = _TYPES[fields.pop("type")]
        return cls(**fields)
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        # json.JSONDecodeError and the records' own checks are ValueErrors;
        # TypeError is a missing/extra field, KeyError a missing or unknown
        # type, AttributeError a line that is JSON but not an object.
        raise LogFormatError(f"{exc.__class__.__name__}: {exc}: {line!r}") from exc


class LogWriter:
    """Appends records to one process's log file.

    Lines are buffered and reach the file when the buffer fills, on
    ``flush()`` and on ``close()``; a process that dies without closing
    loses what is still buffered. Usable as a context manager.

    Raises:
      OSError: if the file cannot be opened or written.
      ValueError: from ``write`` after ``close``.
    """

    def __init__(self, path: str | os.PathLike[str], buffer_bytes: int = 1 << 16) -> None:
        self._file: TextIO = open(path, "a", encoding="utf-8", buffering=buffer_bytes)

    def write(self, record: Record) -> None:
        """Append one record."""
        self._file.write(record.to_json() + "\n")

    def flush(self) -> None:
        """Hand everything written so far to the kernel."""
        self._file.flush()

    def close(self) -> None:
        """Flush and close. Closing twice is harmless."""
        self._file.close()

    def __enter__(self) -> LogWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def read_logs(paths: Iterable[str | os.PathLike[str]]) -> list[Record]:
    """Return every record in ``paths``, merged and sorted by ``start_ns``.

    The sort is stable: records that start in the same nanosecond keep the
    order of ``paths`` and, within a file, the order they were written.
    Blank lines are skipped.

    Raises:
      OSError: if a file cannot be read.
      LogFormatError: naming the file and line, if a line is not a record
        (this includes a last line cut short by a process that died while
        writing it).
    """
    records: list[Record] = []
    for path in paths:
        with open(path, encoding="utf-8") as file:
            for lineno, line in enumerate(file, 1):
                if not line.strip():
                    continue
                try:
                    records.append(parse_record(line))
                except LogFormatError as exc:
                    raise LogFormatError(f"{os.fspath(path)}:{lineno}: {exc}") from exc
    records.sort(key=attrgetter("start_ns"))
    return records
