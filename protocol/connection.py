"""The sans-I/O connection: bytes in, events out; messages in, bytes out.

One `Connection` per end of a stream, in the style of h11: it owns no socket
and no event loop.  `receive_data()` buffers bytes, `next_event()` returns the
next complete message (or `NEED_DATA`), `send()` returns the bytes to write.
Which message may travel in which direction and state is one table,
`TRANSITIONS`; the connection also remembers what is outstanding (FS requests
by `unique`, invalidations by `seq`) so that replies can be decoded and
matched, and a reply to something never asked is an error.

Frames larger than the negotiated maximum are refused as soon as their
header arrives, before any of the payload is buffered.

Messages are encoded and decoded by the fast path of `protocol/fastcodec.py`
(struct formats derived from the construct schemas) where it applies, and by
the reference codec `protocol/codec.py` otherwise; the fast path never accepts
what the reference refuses (`tests/test_codec_agreement.py`).
`Connection(..., fast_codec=False)`, or `FAST_CODEC = False` here before the
connection is made, uses the reference codec only; so does a process started
with CLEANLEASE_CODEC=reference in its environment (for `cleanlease bench`).

Received bytes are not copied while whole frames can be read where they
arrived: a chunk is kept as it came and read through an offset, and only a
frame that straddles two chunks is assembled in a bytearray.  A payload is
then copied once, into the message that carries it.
"""

from __future__ import annotations

import enum
import os

from protocol import codec, fastcodec, wire
from protocol.errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from protocol.messages import (
    Ack,
    Auth,
    AuthReply,
    ConnectionClosed,
    FsReply,
    FsRequest,
    Heartbeat,
    HeartbeatReply,
    Hello,
    HelloReply,
    InvalEntry,
    Invalidate,
    Purge,
    Purged,
    Witness,
    WitnessReply,
    Message,
)


class Role(enum.Enum):
    HOST = "host"
    GUEST = "guest"


class State(enum.Enum):
    IDLE = "idle"  # nothing exchanged yet
    HELLO_SENT = "hello-sent"  # guest: waiting for the HELLO reply
    HELLO_RECEIVED = "hello-received"  # host: must answer the HELLO
    AUTHENTICATING = "authenticating"  # after a HELLO reply with FEATURE_AUTH: AUTH is next
    AUTH_SENT = "auth-sent"  # guest: waiting for the AUTH reply
    AUTH_RECEIVED = "auth-received"  # host: must answer the AUTH
    READY = "ready"
    WITNESS = "witness"  # a witness connection (WITNESS sent/received): PURGE, PURGED
    CLOSED = "closed"  # orderly end (EOF, or a HELLO refused)
    ERROR = "error"  # a protocol error; only closing is left


class NeedData:
    """Sentinel: `next_event()` needs more bytes before it can return an event."""

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = NeedData()

SEND, RECV = "send", "recv"

# (role, state, direction, message type) -> next state.  Anything not listed
# is out of turn: LocalProtocolError when sent, RemoteProtocolError when received.
# Two replies can change the course the table gives (see _advance): a HELLO or
# AUTH reply with an error closes the connection, and a HELLO reply with
# FEATURE_AUTH leads to AUTHENTICATING instead of READY.
TRANSITIONS: dict[tuple[Role, State, str, type], State] = {
    (Role.GUEST, State.IDLE, SEND, Hello): State.HELLO_SENT,
    (Role.GUEST, State.HELLO_SENT, RECV, HelloReply): State.READY,
    (Role.GUEST, State.AUTHENTICATING, SEND, Auth): State.AUTH_SENT,
    (Role.GUEST, State.AUTH_SENT, RECV, AuthReply): State.READY,
    (Role.GUEST, State.READY, SEND, FsRequest): State.READY,
    (Role.GUEST, State.READY, RECV, FsReply): State.READY,
    (Role.GUEST, State.READY, RECV, Invalidate): State.READY,
    (Role.GUEST, State.READY, RECV, InvalEntry): State.READY,
    (Role.GUEST, State.READY, SEND, Ack): State.READY,
    (Role.GUEST, State.READY, SEND, Heartbeat): State.READY,
    (Role.GUEST, State.READY, RECV, HeartbeatReply): State.READY,
    (Role.HOST, State.IDLE, RECV, Hello): State.HELLO_RECEIVED,
    (Role.HOST, State.HELLO_RECEIVED, SEND, HelloReply): State.READY,
    (Role.HOST, State.AUTHENTICATING, RECV, Auth): State.AUTH_RECEIVED,
    (Role.HOST, State.AUTH_RECEIVED, SEND, AuthReply): State.READY,
    (Role.HOST, State.READY, RECV, FsRequest): State.READY,
    (Role.HOST, State.READY, SEND, FsReply): State.READY,
    (Role.HOST, State.READY, SEND, Invalidate): State.READY,
    (Role.HOST, State.READY, SEND, InvalEntry): State.READY,
    (Role.HOST, State.READY, RECV, Ack): State.READY,
    (Role.HOST, State.READY, RECV, Heartbeat): State.READY,
    (Role.HOST, State.READY, SEND, HeartbeatReply): State.READY,
    # A witness connection (docs/protocol.md, 8a): its first request after the
    # handshake is WITNESS, and from then on it carries PURGE and PURGED only.
    (Role.GUEST, State.READY, SEND, Witness): State.WITNESS,
    (Role.GUEST, State.WITNESS, RECV, WitnessReply): State.WITNESS,
    (Role.GUEST, State.WITNESS, RECV, Purge): State.WITNESS,
    (Role.GUEST, State.WITNESS, SEND, Purged): State.WITNESS,
    (Role.HOST, State.READY, RECV, Witness): State.WITNESS,
    (Role.HOST, State.WITNESS, SEND, WitnessReply): State.WITNESS,
    (Role.HOST, State.WITNESS, SEND, Purge): State.WITNESS,
    (Role.HOST, State.WITNESS, RECV, Purged): State.WITNESS,
}

# TRANSITIONS regrouped by (role, state), so that a message's move is found by
# (direction, type) alone: enum members hash in Python, tuples of str and type in C.
_MOVES: dict[tuple[Role, State], dict[tuple[str, type], State]] = {
    (role, state): {} for role in Role for state in State}
for (_role, _state, _direction, _type), _next in TRANSITIONS.items():
    _MOVES[(_role, _state)][(_direction, _type)] = _next
del _role, _state, _direction, _type, _next

_HEADER = fastcodec.FRAME_HEADER  # wire.FrameHeader as a struct, derived from the schema
_HEADER_SIZE = wire.HEADER_SIZE
assert _HEADER.size == _HEADER_SIZE

# The default of Connection(fast_codec=None): the fast codec path of protocol/fastcodec.py.
FAST_CODEC = os.environ.get("CLEANLEASE_CODEC", "fast") != "reference"


def _fast_decode(request, flags, buffer, start, size, reply_opcode):
    """fastcodec.decode, or None (the reference decides) should it ever fail unexpectedly:
    whatever arrives, only the reference codec's errors may leave next_event()."""
    try:
        return fastcodec.decode(request, flags, buffer, start, size, reply_opcode)
    except Exception:  # noqa: BLE001 - a fast-path bug must not become a new failure mode
        return None


def _fast_encode(encode, *args):
    try:
        return encode(*args)
    except Exception:  # noqa: BLE001 - as _fast_decode: the reference decides
        return None


class Connection:
    """One end of a cleanlease byte stream.

    `max_frame` bounds the payload of a frame in either direction until HELLO
    negotiates another (the smaller of both offers).  `max_in_flight` bounds
    the FS requests a host accepts before the earlier ones are answered.
    """

    def __init__(self, role: Role, *, max_frame: int = wire.DEFAULT_MAX_FRAME,
                 max_in_flight: int = 1024, fast_codec: bool | None = None):
        self.role = role
        self.state = State.IDLE  # also sets _moves
        self.max_frame = max_frame
        self.max_in_flight = max_in_flight
        self.fast_codec = FAST_CODEC if fast_codec is None else fast_codec
        # Unread bytes are self._buffer[self._pos:].  The buffer is the last chunk
        # received, as it came (bytes), until a frame straddles two chunks; then
        # a bytearray of what is left and the new chunk.
        self._buffer: bytes | bytearray = b""
        self._pos = 0
        self._pending_fs: dict[int, int] = {}  # unique -> opcode
        self._pending_notify: dict[int, wire.Request] = {}
        self._pending_heartbeats: set[int] = set()
        self._witness_unanswered = False  # a WITNESS awaits its reply
        self._offered_max_frame = wire.ABSOLUTE_MAX_FRAME  # what the HELLO offered
        self._eof = False

    @property
    def state(self) -> State:
        return self._state

    @state.setter
    def state(self, state: State) -> None:
        self._state = state
        self._moves = _MOVES[(self.role, state)]

    # --- bookkeeping visible to the owner --------------------------------

    @property
    def outstanding_requests(self) -> int:
        return len(self._pending_fs)

    @property
    def outstanding_invalidations(self) -> int:
        return len(self._pending_notify)

    @property
    def max_payload(self) -> int:
        return self.max_frame

    @property
    def unfinished_frame(self) -> int:
        """Bytes received of a frame not complete yet (0 between frames): the
        daemon gives a started frame a deadline (host/limits.py)."""
        return len(self._buffer) - self._pos

    # --- sending -------------------------------------------------------------

    def send(self, message: Message) -> bytes:
        """Return the bytes of one frame carrying `message`.

        Raises LocalProtocolError if the message is out of turn in this state,
        repeats an outstanding id, answers nothing outstanding, or does not
        fit the negotiated frame size.  On error nothing is recorded.
        """
        self._transition(SEND, message, LocalProtocolError)
        frame = None
        if isinstance(message, Ack):
            request = self._pending_notify.get(message.seq)
            if request is None:
                raise LocalProtocolError(f"ACK for seq {message.seq}, which is not outstanding")
            if self.fast_codec:
                frame = _fast_encode(fastcodec.encode_ack_frame, message, request)
            if frame is None:
                code, flags, payload = codec.encode_ack(message, request)
        else:
            if self.fast_codec:
                frame = _fast_encode(fastcodec.encode_frame, message)
            if frame is None:
                code, flags, payload = codec.encode_payload(message)
        size = len(frame) - _HEADER_SIZE if frame is not None else len(payload)
        if size > self.max_frame:
            raise LocalProtocolError(
                f"{type(message).__name__} needs a {size}-byte frame, over the maximum "
                f"{self.max_frame}")
        self._record_send(message)
        self._advance(SEND, message)
        if frame is not None:
            return frame
        return codec.encode_header(code, flags, size) + payload

    def _record_send(self, message: Message) -> None:
        match message:
            case FsRequest():
                if message.needs_reply:
                    if message.unique in self._pending_fs:
                        raise LocalProtocolError(f"unique {message.unique} is already outstanding")
                    self._pending_fs[message.unique] = message.opcode
            case FsReply():
                opcode = self._pending_fs.get(message.unique)
                if opcode is None:
                    raise LocalProtocolError(f"reply to unique {message.unique}, which is not outstanding")
                expected = codec.REPLY_BODIES.get(opcode)
                if message.error == 0 and type(message.body) is not expected:
                    raise LocalProtocolError(
                        f"reply to unique {message.unique} (opcode {int(opcode)}) carries "
                        f"{type(message.body).__name__}, expected "
                        f"{expected.__name__ if expected else 'an error'}")
                del self._pending_fs[message.unique]
            case Invalidate() | InvalEntry():
                if message.seq in self._pending_notify:
                    raise LocalProtocolError(f"invalidation seq {message.seq} is already outstanding")
                self._pending_notify[message.seq] = (
                    wire.Request.INVALIDATE if isinstance(message, Invalidate) else wire.Request.INVAL_ENTRY)
            case Ack():
                del self._pending_notify[message.seq]
            case Heartbeat():
                self._pending_heartbeats.add(message.seq)
            case HeartbeatReply():
                pass
            case Witness():
                self._witness_unanswered = True
            case WitnessReply():
                if not self._witness_unanswered:
                    raise LocalProtocolError("WITNESS reply to no WITNESS")
                self._witness_unanswered = False
            case Hello():
                self._offered_max_frame = message.max_frame
            case HelloReply():
                # The host chose the maximum (the smaller of both offers).
                if message.error == 0:
                    if not self._negotiable(message.max_frame):
                        raise LocalProtocolError(
                            f"HELLO reply: max_frame {message.max_frame} is not negotiable")
                    self.max_frame = message.max_frame

    def forget_request(self, unique: int) -> None:
        """Guest side: stop waiting for `unique` (a reply that arrives later is an error)."""
        self._pending_fs.pop(unique, None)

    # --- receiving -----------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Buffer bytes from the peer; b"" means the peer closed its side."""
        if data:
            if self._eof:
                raise LocalProtocolError("data received after EOF")
            buffer, pos = self._buffer, self._pos
            if pos == len(buffer):
                # Nothing unread: keep the chunk as it is (a caller's bytearray or
                # memoryview is copied, since it may be reused).
                self._buffer = data if type(data) is bytes else bytes(data)
                self._pos = 0
            elif type(buffer) is bytearray:
                if pos:
                    del buffer[:pos]  # once per chunk, not once per frame
                    self._pos = 0
                buffer += data
            else:
                # A frame straddles two chunks: assemble what is left in a bytearray.
                merged = bytearray(memoryview(buffer)[pos:])
                merged += data
                self._buffer, self._pos = merged, 0
        else:
            self._eof = True

    def next_event(self) -> Message | ConnectionClosed | NeedData:
        """Return the next complete message, `NEED_DATA`, or `ConnectionClosed` at a clean EOF.

        Raises RemoteProtocolError (and enters ERROR) for a malformed,
        oversized, truncated or out-of-turn frame; the message names the field.
        `codec.UnsupportedOpcode` is the exception: it is raised but leaves the
        connection usable, so a host can answer -ENOSYS.
        """
        if self.state is State.ERROR:
            raise RemoteProtocolError("the connection has already failed")
        buffer, pos = self._buffer, self._pos
        buffered = len(buffer) - pos
        if buffered < _HEADER_SIZE:
            return self._at_end_of_data(buffered)
        request, flags, size = _HEADER.unpack_from(buffer, pos)
        if size > self.max_frame:
            self._fail(RemoteProtocolError(
                f"frame header: size {size} exceeds the maximum frame {self.max_frame}"))
        if size > wire.HANDSHAKE_MAX_FRAME and self._state is not State.READY:
            self._fail(RemoteProtocolError(
                f"frame header: size {size} exceeds {wire.HANDSHAKE_MAX_FRAME}, the maximum "
                f"before the handshake is over (state {self._state.value})"))
        if buffered < _HEADER_SIZE + size:
            return self._at_end_of_data(buffered, _HEADER_SIZE + size)
        start = pos + _HEADER_SIZE
        end = start + size
        # The frame is consumed whatever it holds.
        if end == len(buffer):
            self._buffer, self._pos = b"", 0  # let go of the chunk
        else:
            self._pos = end
        message = None
        if self.fast_codec:
            message = _fast_decode(request, flags, buffer, start, size, self._pending_fs.get)
        try:
            if message is None and self.fast_codec:
                unsupported = fastcodec.unsupported_request(request, flags, buffer, start, size)
                if unsupported is not None:
                    raise codec.UnsupportedOpcode(*unsupported,
                                                  needs_reply=(flags & wire.FLAG_NEED_REPLY) != 0)
            if message is None:
                if type(buffer) is bytes:
                    payload = buffer[start:end]
                else:
                    with memoryview(buffer) as view:
                        payload = bytes(view[start:end])
                message = codec.decode_payload(request, flags, payload, self._pending_fs.get)
        except codec.UnsupportedOpcode as exc:
            if self.role is not Role.HOST or self.state is not State.READY:
                self._fail(RemoteProtocolError(str(exc)))
            if not exc.needs_reply:
                raise  # the sender awaits no reply: nothing is outstanding
            if exc.unique in self._pending_fs:
                self._fail(RemoteProtocolError(f"unique {exc.unique} is already outstanding"))
            # Outstanding, so that the host's -ENOSYS reply is in turn.
            self._pending_fs[exc.unique] = exc.opcode
            raise
        except RemoteProtocolError as exc:
            self._fail(exc)
        self._transition(RECV, message, RemoteProtocolError)
        if isinstance(message, Ack) and self._pending_notify.get(message.seq, request) != request:
            self._fail(RemoteProtocolError(
                f"ACK for seq {message.seq} carries request code {request}, but seq {message.seq} "
                f"was {self._pending_notify[message.seq].name}"))
        self._record_receive(message)
        self._advance(RECV, message)
        return message

    def _at_end_of_data(self, buffered: int, needed: int | None = None):
        if not self._eof:
            return NEED_DATA
        if buffered == 0:
            self.state = State.CLOSED
            return ConnectionClosed()
        expected = f"{needed}" if needed else f"at least {wire.HEADER_SIZE}"
        self._fail(RemoteProtocolError(
            f"truncated frame at end of stream: {buffered} bytes buffered, {expected} needed"))

    def _record_receive(self, message: Message) -> None:
        match message:
            case FsRequest():
                if message.needs_reply:
                    if message.unique in self._pending_fs:
                        self._fail(RemoteProtocolError(f"unique {message.unique} is already outstanding"))
                    if len(self._pending_fs) >= self.max_in_flight:
                        self._fail(RemoteProtocolError(
                            f"more than {self.max_in_flight} requests in flight"))
                    self._pending_fs[message.unique] = message.opcode
            case FsReply():
                del self._pending_fs[message.unique]  # decode_payload checked it is there
            case Invalidate() | InvalEntry():
                if message.seq in self._pending_notify:
                    self._fail(RemoteProtocolError(f"invalidation seq {message.seq} repeated"))
                self._pending_notify[message.seq] = (
                    wire.Request.INVALIDATE if isinstance(message, Invalidate) else wire.Request.INVAL_ENTRY)
            case Ack():
                if self._pending_notify.pop(message.seq, None) is None:
                    self._fail(RemoteProtocolError(f"ACK for seq {message.seq}, which is not outstanding"))
            case HeartbeatReply():
                if message.seq not in self._pending_heartbeats:
                    self._fail(RemoteProtocolError(f"heartbeat reply {message.seq} answers nothing"))
                self._pending_heartbeats.discard(message.seq)
            case Witness():
                self._witness_unanswered = True
            case WitnessReply():
                if not self._witness_unanswered:
                    self._fail(RemoteProtocolError("WITNESS reply to no WITNESS"))
                self._witness_unanswered = False
            case Hello():
                self._offered_max_frame = message.max_frame
            case HelloReply():
                if message.error == 0:
                    if not self._negotiable(message.max_frame):
                        self._fail(RemoteProtocolError(
                            f"HELLO reply: max_frame {message.max_frame} out of range"))
                    self.max_frame = message.max_frame

    def _negotiable(self, max_frame: int) -> bool:
        """May HELLO settle on `max_frame`?  Within [MIN_MAX_FRAME, ABSOLUTE_MAX_FRAME] and
        not above the guest's offer (an offer below the minimum gets the minimum)."""
        ceiling = min(wire.ABSOLUTE_MAX_FRAME, max(wire.MIN_MAX_FRAME, self._offered_max_frame))
        return wire.MIN_MAX_FRAME <= max_frame <= ceiling

    # --- the table -------------------------------------------------------------

    def _transition(self, direction: str, message: Message, error: type[ProtocolError]) -> State:
        nxt = self._moves.get((direction, type(message)))  # TRANSITIONS[role, state, ...]
        if nxt is None:
            exc = error(f"{self.role.value} cannot {direction} {type(message).__name__} "
                        f"in state {self.state.value}")
            if error is RemoteProtocolError:
                self._fail(exc)
            raise exc
        return nxt

    def _advance(self, direction: str, message: Message) -> None:
        nxt = self._moves[(direction, type(message))]
        if type(message) is HelloReply or type(message) is AuthReply or type(message) is WitnessReply:
            if message.error != 0:
                nxt = State.CLOSED
            elif type(message) is HelloReply and message.features & wire.FEATURE_AUTH:
                nxt = State.AUTHENTICATING
        if nxt is not self._state:
            self.state = nxt

    def _fail(self, exc: ProtocolError):
        self.state = State.ERROR
        raise exc
