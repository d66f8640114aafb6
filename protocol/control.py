"""The control protocol: a local administrator's requests to the daemon.

Spoken on the control socket (a Unix socket, mode 0600, beside the guest
socket; host/control/server.py), never on the guest socket.  It reuses the
guest protocol's frame layer (`protocol.wire.FrameHeader`: `request:u32,
flags:u32, size:u32`, version 1 in flags bits 0-1, 0x4 for a reply, 0x8 asks
for one) with request codes of its own (`ControlCode`, 0x100 and up, so a
control frame sent to the guest socket, or the reverse, is refused at once as
an unknown request code).  Byte by byte in docs/protocol.md, section 10.

Sans-I/O, like `protocol.connection`: `ControlConnection` is fed bytes and
returns messages (frozen dataclasses), and turns messages into bytes; it owns
no socket.  Every request carries a `seq` its reply repeats.  A reply is
`ControlReply`: `error` (0 or a negative errno), a `message` for people (what
went wrong and what to do), and, on success, the body of its request code.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from construct import (
    Array,
    Bytes,
    ConstructError,
    GreedyBytes,
    Int8ul,
    Int32sl,
    Int32ul,
    Int64ul,
    PascalString,
    Prefixed,
    Int16ul,
    Struct,
    Terminated,
)

from protocol import wire
from protocol.errors import LocalProtocolError, RemoteProtocolError

MAX_CONTROL_FRAME = 1 << 20  # payload; a CHANGES reply is cut to fit (see MAX_RANGES)
MAX_PATH = 4096
MAX_MESSAGE = 1024
BOOT_ID_SIZE = 16
# 16 bytes per range: a CHANGES reply with this many still fits in a frame.
MAX_RANGES = (MAX_CONTROL_FRAME - 1024) // 16


class ControlCode(enum.IntEnum):
    """Request codes of the control socket (frame header `request`)."""

    FREEZE = 0x101  # modifications of PATH wait until THAW, or until this client goes
    THAW = 0x102
    FLUSH = 0x103  # write PATH's dirty pages back (fdatasync); nothing else
    MARK = 0x104  # a mark for CHANGES
    CHANGES = 0x105  # the byte ranges modified since a mark
    SEAL = 0x106  # size and extent-map changes of PATH wait until UNSEAL
    UNSEAL = 0x107
    STATUS = 0x108  # what holds PATH, how many modifications wait


class ChangesStatus(enum.IntEnum):
    """What a CHANGES reply's ranges mean."""

    RANGES = 0  # exactly these page-aligned ranges may have changed (and no others)
    UNKNOWN = 1  # the mark is of another boot of the daemon (or unknown): assume everything
    WHOLE_FILE = 2  # this daemon cannot tell ranges (inotify, an unseen writer): everything


# --- messages -------------------------------------------------------------------


@dataclass(frozen=True)
class Freeze:
    """Hold every modification of `path` (a regular file of the export) until
    THAW, until the client's connection closes, or `max_hold_ms` (0: no limit)."""

    path: bytes
    max_hold_ms: int = 0
    seq: int = 0


@dataclass(frozen=True)
class Thaw:
    path: bytes
    seq: int = 0


@dataclass(frozen=True)
class Flush:
    path: bytes
    seq: int = 0


@dataclass(frozen=True)
class Mark:
    path: bytes
    seq: int = 0


@dataclass(frozen=True)
class Changes:
    """The ranges of `path` modified since the mark (`boot_id`, `epoch`)."""

    path: bytes
    boot_id: bytes
    epoch: int
    seq: int = 0


@dataclass(frozen=True)
class Seal:
    path: bytes
    max_hold_ms: int = 0
    seq: int = 0


@dataclass(frozen=True)
class Unseal:
    path: bytes
    seq: int = 0


@dataclass(frozen=True)
class Status:
    path: bytes
    seq: int = 0


ControlRequest = Freeze | Thaw | Flush | Mark | Changes | Seal | Unseal | Status


@dataclass(frozen=True)
class Held:
    """FREEZE/SEAL succeeded: nothing that must wait is in flight any more.
    `drain_ns`: how long the daemon waited for modifications already in
    flight; `drained`: how many it waited for (guest and host-local)."""

    drain_ns: int
    drained: int


@dataclass(frozen=True)
class Released:
    """THAW/UNSEAL: `released` modifications were let go, in arrival order."""

    released: int


@dataclass(frozen=True)
class Flushed:
    pass


@dataclass(frozen=True)
class MarkOut:
    boot_id: bytes
    epoch: int
    size: int


@dataclass(frozen=True)
class ChangesOut:
    status: ChangesStatus
    size: int  # the file's size now
    ranges: tuple[tuple[int, int], ...] = ()  # (offset, length), page aligned, sorted, disjoint


@dataclass(frozen=True)
class StatusOut:
    freezes: int  # freezes held on the file (one per client that asked)
    seals: int
    waiting: int  # modifications waiting now (guest and host-local)
    in_flight: int  # guest modifications past the gate, not landed yet
    journaled: int  # 1 if a mark was taken on it in this boot
    released: int  # modifications let go since the daemon started


ControlBody = Held | Released | Flushed | MarkOut | ChangesOut | StatusOut


@dataclass(frozen=True)
class ControlReply:
    code: ControlCode
    seq: int
    error: int = 0  # 0, or a negative errno
    message: str = ""
    body: ControlBody | None = None


# --- construct schemas ------------------------------------------------------------

_Path = Prefixed(Int16ul, GreedyBytes)
_PathOnly = Struct("seq" / Int64ul, "path" / _Path, Terminated)
_WithHold = Struct("seq" / Int64ul, "max_hold_ms" / Int32ul, "path" / _Path, Terminated)
_ChangesIn = Struct("seq" / Int64ul, "boot_id" / Bytes(BOOT_ID_SIZE), "epoch" / Int64ul,
                    "path" / _Path, Terminated)

ReplyHeader = Struct("seq" / Int64ul, "error" / Int32sl,
                     "message" / PascalString(Int16ul, "utf8"), "body" / GreedyBytes)

_HeldOut = Struct("drain_ns" / Int64ul, "drained" / Int32ul, Terminated)
_ReleasedOut = Struct("released" / Int32ul, Terminated)
_FlushedOut = Struct(Terminated)
_MarkOut = Struct("boot_id" / Bytes(BOOT_ID_SIZE), "epoch" / Int64ul, "size" / Int64ul,
                  Terminated)
_Range = Struct("offset" / Int64ul, "length" / Int64ul)
_ChangesOut = Struct("status" / Int8ul, "size" / Int64ul, "count" / Int32ul,
                     "ranges" / Array(lambda this: this.count, _Range), Terminated)
_StatusOut = Struct("freezes" / Int32ul, "seals" / Int32ul, "waiting" / Int32ul,
                    "in_flight" / Int32ul, "journaled" / Int8ul, "released" / Int64ul,
                    Terminated)

# One table: code -> (request class, request schema, reply body class, reply schema).
CODES = {
    ControlCode.FREEZE: (Freeze, _WithHold, Held, _HeldOut),
    ControlCode.THAW: (Thaw, _PathOnly, Released, _ReleasedOut),
    ControlCode.FLUSH: (Flush, _PathOnly, Flushed, _FlushedOut),
    ControlCode.MARK: (Mark, _PathOnly, MarkOut, _MarkOut),
    ControlCode.CHANGES: (Changes, _ChangesIn, ChangesOut, _ChangesOut),
    ControlCode.SEAL: (Seal, _WithHold, Held, _HeldOut),
    ControlCode.UNSEAL: (Unseal, _PathOnly, Released, _ReleasedOut),
    ControlCode.STATUS: (Status, _PathOnly, StatusOut, _StatusOut),
}
CODE_OF = {request: code for code, (request, *_rest) in CODES.items()}


def _frame(code: int, flags: int, payload: bytes) -> bytes:
    return wire.FrameHeader.build(dict(request=code, flags=flags, size=len(payload))) + payload


def encode_request(request: ControlRequest) -> bytes:
    """The frame of `request`.  Raises LocalProtocolError for a path that is
    empty, too long or holds a NUL byte."""
    code = CODE_OF[type(request)]
    path = request.path
    if not path or len(path) > MAX_PATH or b"\0" in path:
        raise LocalProtocolError(f"path must be 1..{MAX_PATH} bytes without NUL: {path[:64]!r}")
    values = {k: getattr(request, k) for k in request.__dataclass_fields__}
    return _frame(code, wire.PROTOCOL_VERSION | wire.FLAG_NEED_REPLY, CODES[code][1].build(values))


def encode_reply(reply: ControlReply) -> bytes:
    """The frame of `reply`.  An error reply carries no body; a CHANGES reply
    must carry at most MAX_RANGES ranges (LocalProtocolError)."""
    body = b""
    if reply.error == 0:
        schema = CODES[reply.code][3]
        b = reply.body
        if isinstance(b, ChangesOut):
            if len(b.ranges) > MAX_RANGES:
                raise LocalProtocolError(f"{len(b.ranges)} ranges; at most {MAX_RANGES}")
            values = dict(status=int(b.status), size=b.size, count=len(b.ranges),
                          ranges=[dict(offset=o, length=n) for o, n in b.ranges])
        else:
            values = {k: getattr(b, k) for k in b.__dataclass_fields__} if b is not None else {}
        body = schema.build(values)
    payload = ReplyHeader.build(dict(seq=reply.seq, error=reply.error,
                                     message=reply.message[:MAX_MESSAGE], body=body))
    return _frame(reply.code, wire.PROTOCOL_VERSION | wire.FLAG_REPLY, payload)


def _decode_request(code: ControlCode, payload: bytes) -> ControlRequest:
    cls, schema, _, _ = CODES[code]
    parsed = schema.parse(payload)
    if not parsed.path or len(parsed.path) > MAX_PATH or b"\0" in parsed.path:
        raise RemoteProtocolError(f"{code.name}: path must be 1..{MAX_PATH} bytes without NUL")
    return cls(**{k: parsed[k] for k in cls.__dataclass_fields__})


def _decode_reply(code: ControlCode, payload: bytes) -> ControlReply:
    head = ReplyHeader.parse(payload)
    rest = head.body
    if head.error != 0:
        return ControlReply(code, head.seq, head.error, head.message)
    _, _, cls, schema = CODES[code]
    parsed = schema.parse(rest)
    if cls is ChangesOut:
        body = ChangesOut(ChangesStatus(parsed.status), parsed.size,
                          tuple((r.offset, r.length) for r in parsed.ranges))
    else:
        body = cls(**{k: parsed[k] for k in cls.__dataclass_fields__})
    return ControlReply(code, head.seq, 0, head.message, body)


class Role(enum.Enum):
    CLIENT = "client"  # sends requests, receives replies
    SERVER = "server"  # receives requests, sends replies


@dataclass
class ControlConnection:
    """One end of a control connection, sans-I/O.

    `receive_data(b)` buffers bytes (b"" = EOF); `next_event()` returns the
    next request (SERVER) or `ControlReply` (CLIENT), None if more bytes are
    needed, or raises RemoteProtocolError for a malformed frame (after which
    the connection is unusable: close it).  `send(message)` returns bytes.
    A server answers each request once (a reply to a seq never asked, or
    asked twice, is a LocalProtocolError); a client matches replies by seq.
    """

    role: Role
    _buffer: bytearray = field(default_factory=bytearray)
    _outstanding: set[int] = field(default_factory=set)  # seqs awaiting a reply
    eof: bool = False
    broken: bool = False

    def receive_data(self, data: bytes) -> None:
        if not data:
            self.eof = True
        self._buffer += data

    def next_event(self):
        if self.broken:
            raise RemoteProtocolError("the connection broke earlier")
        if len(self._buffer) < wire.HEADER_SIZE:
            return None
        header = wire.FrameHeader.parse(bytes(self._buffer[:wire.HEADER_SIZE]))
        if header.size > MAX_CONTROL_FRAME:
            self.broken = True
            raise RemoteProtocolError(f"frame of {header.size} bytes; at most {MAX_CONTROL_FRAME}")
        if len(self._buffer) < wire.HEADER_SIZE + header.size:
            return None
        payload = bytes(self._buffer[wire.HEADER_SIZE:wire.HEADER_SIZE + header.size])
        del self._buffer[:wire.HEADER_SIZE + header.size]
        try:
            return self._decode(header, payload)
        except (ConstructError, ValueError, UnicodeDecodeError) as exc:
            self.broken = True
            raise RemoteProtocolError(f"malformed control frame (code {header.request:#x}): "
                                      f"{exc}") from None

    def _decode(self, header, payload: bytes):
        if header.flags & ~wire.KNOWN_FLAGS or header.flags & wire.FLAG_VERSION_MASK != 1:
            raise ValueError(f"flags {header.flags:#x}: version 1 expected")
        try:
            code = ControlCode(header.request)
        except ValueError:
            raise ValueError(f"unknown control request code {header.request:#x}") from None
        is_reply = bool(header.flags & wire.FLAG_REPLY)
        if is_reply != (self.role is Role.CLIENT):
            raise ValueError("a reply where a request was expected, or the reverse")
        if self.role is Role.SERVER:
            request = _decode_request(code, payload)
            if request.seq in self._outstanding:
                raise ValueError(f"seq {request.seq} is already outstanding")
            self._outstanding.add(request.seq)
            return request
        reply = _decode_reply(code, payload)
        if reply.seq not in self._outstanding:
            raise ValueError(f"a reply to seq {reply.seq}, which was never asked")
        self._outstanding.discard(reply.seq)
        return reply

    def send(self, message) -> bytes:
        if self.role is Role.CLIENT:
            if message.seq in self._outstanding:
                raise LocalProtocolError(f"seq {message.seq} is already outstanding")
            data = encode_request(message)
            self._outstanding.add(message.seq)
            return data
        if message.seq not in self._outstanding:
            raise LocalProtocolError(f"no request with seq {message.seq} awaits a reply")
        data = encode_reply(message)
        self._outstanding.discard(message.seq)
        return data
