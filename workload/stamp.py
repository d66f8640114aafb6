"""Stamped data blocks: every block a workload writes says which version it is.

A block is ``BLOCK_SIZE`` bytes laid out little-endian as::

    offset  size  field
         0     8  magic  b"CLSTAMP1"
         8     4  crc32 of bytes [12, BLOCK_SIZE)
        12     8  file_id
        20     8  block
        28     8  writer
        36     8  seq
        44     8  t_ns   (time.monotonic_ns() when the write started)
        52  4044  filler derived from the five fields

The filler is a BLAKE2b digest of the fields, repeated. Because it differs
from version to version, a torn block (one part of one version, the rest of
another) no longer matches its checksum, and the reader can tell it from
either whole version.

Writer 0, seq 0 is the initial content the setup writes before the run
(``Stamp.initial``), with t_ns 0.
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from dataclasses import dataclass
from typing import Final, Literal

__all__ = [
    "BLOCK_SIZE",
    "HEADER_SIZE",
    "MAGIC",
    "CorruptBlock",
    "CorruptKind",
    "Stamp",
    "make_block",
    "parse_block",
]

BLOCK_SIZE: Final = 4096
MAGIC: Final = b"CLSTAMP1"

_PREFIX: Final = struct.Struct("<8sI")  # magic, crc32
_FIELDS: Final = struct.Struct("<5Q")  # file_id, block, writer, seq, t_ns
HEADER_SIZE: Final = _PREFIX.size + _FIELDS.size
# The checksum covers everything after itself: the fields and the filler.
# The magic is checked on its own, so it need not be covered.
_CRC_FROM: Final = _PREFIX.size
_FILLER_SIZE: Final = BLOCK_SIZE - HEADER_SIZE
_DIGEST_SIZE: Final = 64  # BLAKE2b's largest digest: fewest repetitions
_REPEATS: Final = -(-_FILLER_SIZE // _DIGEST_SIZE)
_U64_LIMIT: Final = 1 << 64
_ZERO_BLOCK: Final = bytes(BLOCK_SIZE)

CorruptKind = Literal["zero", "magic", "checksum", "length"]


class CorruptBlock(ValueError):
    """A block that is not a whole stamped block.

    ``kind`` says why, so a report can count each cause apart:

    - ``"length"``: not exactly ``BLOCK_SIZE`` bytes (a short read).
    - ``"zero"``: all zero bytes (a hole, or a page never written back).
    - ``"magic"``: does not start with ``MAGIC`` and is not all zero.
    - ``"checksum"``: the magic is right but the checksum is not
      (a torn block, or one damaged in transit).
    """

    def __init__(self, kind: CorruptKind, detail: str = "") -> None:
        # Both go to args so the exception pickles and re-raises intact
        # across processes.
        super().__init__(kind, detail)
        self.kind: CorruptKind = kind
        self.detail = detail

    def __str__(self) -> str:
        return f"{self.kind}: {self.detail}" if self.detail else self.kind


@dataclass(frozen=True, slots=True)
class Stamp:
    """Which version of which block: who wrote it, their sequence number,
    and when the write started (monotonic ns, comparable across processes
    because CLOCK_MONOTONIC is system-wide).

    Raises:
      ValueError: if a field is not an int in [0, 2**64).
    """

    file_id: int
    block: int
    writer: int
    seq: int
    t_ns: int

    def __post_init__(self) -> None:
        for name in ("file_id", "block", "writer", "seq", "t_ns"):
            value = getattr(self, name)
            # bool is an int subclass; accepting True as a writer id would
            # hide a bug in the caller.
            if type(value) is not int or not 0 <= value < _U64_LIMIT:
                raise ValueError(f"Stamp.{name} must be an int in [0, 2**64), got {value!r}")

    @classmethod
    def initial(cls, file_id: int, block: int) -> Stamp:
        """The stamp of the content the setup writes before the run."""
        return cls(file_id, block, 0, 0, 0)

    @property
    def is_initial(self) -> bool:
        """True for the setup's version (writer 0, seq 0)."""
        return self.writer == 0 and self.seq == 0


def make_block(stamp: Stamp) -> bytes:
    """Return the ``BLOCK_SIZE`` bytes that carry ``stamp``.

    The result depends only on ``stamp``: the same stamp always gives the
    same bytes, and ``parse_block`` returns an equal stamp for them.
    """
    fields = _FIELDS.pack(stamp.file_id, stamp.block, stamp.writer, stamp.seq, stamp.t_ns)
    digest = hashlib.blake2b(fields, digest_size=_DIGEST_SIZE).digest()
    body = fields + (digest * _REPEATS)[:_FILLER_SIZE]
    return _PREFIX.pack(MAGIC, zlib.crc32(body)) + body


def parse_block(data: bytes | bytearray | memoryview) -> Stamp:
    """Return the stamp carried by one block read back from a file.

    Raises:
      CorruptBlock: if ``data`` is not a whole stamped block; ``kind`` is
        ``"length"``, ``"zero"``, ``"magic"`` or ``"checksum"``.
    """
    if len(data) != BLOCK_SIZE:
        raise CorruptBlock("length", f"{len(data)} bytes, expected {BLOCK_SIZE}")
    magic, crc = _PREFIX.unpack_from(data)
    if magic != MAGIC:
        # Only on this rare path do we pay for comparing the whole block.
        if bytes(data) == _ZERO_BLOCK:
            raise CorruptBlock("zero", "all bytes are zero")
        raise CorruptBlock("magic", f"magic {magic!r}")
    actual = zlib.crc32(memoryview(data)[_CRC_FROM:])
    if actual != crc:
        raise CorruptBlock("checksum", f"crc32 {actual:#010x}, header says {crc:#010x}")
    return Stamp(*_FIELDS.unpack_from(data, _CRC_FROM))
