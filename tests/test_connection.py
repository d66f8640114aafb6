"""The sans-I/O Connection: messages through a guest and a host end after HELLO,
byte-at-a-time and many-frames-per-chunk feeding, hostile input (only
ProtocolError subclasses may escape), and local errors on sending out of turn.

Synchronous, no sockets: bytes go from one Connection's send() straight into
the other's receive_data().
"""

from __future__ import annotations

import errno
import random
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_protocol import (
    OP_STRATEGIES,
    fs_replies,
    fs_requests,
    hello_names,
    hello_replies,
    inval_entries,
    invalidates,
    u32,
    u64,
)

from protocol import codec, wire
from protocol.connection import NEED_DATA, TRANSITIONS, Connection, Role, State
from protocol.errors import LocalProtocolError, RemoteProtocolError
from protocol.fuse import Opcode
from protocol.messages import (
    Purge,
    Purged,
    Witness,
    WitnessReply,
    Ack,
    Attr,
    AttrOut,
    Auth,
    AuthReply,
    ConnectionClosed,
    Detector,
    EmptyOut,
    EntryOut,
    Forget,
    FsReply,
    FsRequest,
    Getattr,
    Heartbeat,
    HeartbeatReply,
    Hello,
    HelloReply,
    InvalEntry,
    Invalidate,
    Lookup,
    Policy,
    Read,
    ReadOut,
    Write,
    WriteOut,
)

BOOT = bytes(range(16))


def hello(max_frame: int = wire.DEFAULT_MAX_FRAME) -> Hello:
    return Hello(wire.PROTOCOL_VERSION, wire.SUPPORTED_FEATURES, max_frame, "g")


def hello_reply(max_frame: int = wire.DEFAULT_MAX_FRAME, error: int = 0) -> HelloReply:
    return HelloReply(error, wire.PROTOCOL_VERSION, wire.SUPPORTED_FEATURES, Policy.CLEAN_LEASE,
                      Detector.NONE, 1000, 1000, max_frame, 1, BOOT)


def pair(max_frame: int = wire.DEFAULT_MAX_FRAME, **host_kw) -> tuple[Connection, Connection]:
    """A guest and a host Connection after a successful HELLO exchange."""
    guest, host = Connection(Role.GUEST), Connection(Role.HOST, **host_kw)
    deliver(guest, host, hello(max_frame))
    deliver(host, guest, hello_reply(max_frame))
    assert guest.state is host.state is State.READY
    assert guest.max_frame == host.max_frame == max_frame
    return guest, host


def deliver(sender: Connection, receiver: Connection, message):
    """Send `message` on one end, receive it on the other; return the event."""
    receiver.receive_data(sender.send(message))
    event = receiver.next_event()
    assert event == message
    assert receiver.next_event() is NEED_DATA
    return event


def frame(request: int, flags: int, payload: bytes, size: int | None = None) -> bytes:
    return struct.pack("<III", request, flags, len(payload) if size is None else size) + payload


def fs_frame(opcode: int, body: bytes, *, unique: int = 1, flags: int = 0x9) -> bytes:
    header = struct.pack("<IIQQIIIHH", 40 + len(body), opcode, unique, 1, 0, 0, 0, 0, 0)
    return frame(2, flags, header + body)


def expect_remote_error(conn: Connection, data: bytes, match: str | None = None):
    conn.receive_data(data)
    with pytest.raises(RemoteProtocolError, match=match):
        conn.next_event()
    assert conn.state is State.ERROR
    with pytest.raises(RemoteProtocolError):
        conn.next_event()  # stays failed
    with pytest.raises(LocalProtocolError):
        conn.send(Heartbeat(1) if conn.role is Role.GUEST else HeartbeatReply(1))


# --- the table --------------------------------------------------------------------


def test_transitions_table_is_mirrored():
    """Whatever one role may send in READY, the other role may receive, and back."""
    other = {Role.GUEST: Role.HOST, Role.HOST: Role.GUEST}
    flip = {"send": "recv", "recv": "send"}
    ready = {(r, d, t) for (r, s, d, t) in TRANSITIONS if s is State.READY}
    assert ready == {(other[r], flip[d], t) for (r, d, t) in ready}


def test_hello_exchange_and_negotiation():
    guest, host = Connection(Role.GUEST), Connection(Role.HOST)
    assert guest.max_frame == host.max_frame == wire.DEFAULT_MAX_FRAME
    deliver(guest, host, hello(max_frame=65536))
    assert (guest.state, host.state) == (State.HELLO_SENT, State.HELLO_RECEIVED)
    deliver(host, guest, hello_reply(max_frame=32768))
    assert guest.state is host.state is State.READY
    assert guest.max_frame == host.max_frame == guest.max_payload == 32768


def test_refused_hello_closes_both_ends():
    guest, host = Connection(Role.GUEST), Connection(Role.HOST)
    deliver(guest, host, hello())
    deliver(host, guest, hello_reply(max_frame=0, error=-errno.EPROTO))
    assert guest.state is host.state is State.CLOSED
    assert guest.max_frame == host.max_frame == wire.DEFAULT_MAX_FRAME
    with pytest.raises(LocalProtocolError):
        guest.send(FsRequest(1, 1, Getattr()))


@pytest.mark.parametrize("offer,reply,ok", [
    (65536, 65536, True), (65536, 8192, True), (65536, 65537, False), (4096, 8192, True),
    (4096, 4096, False), (1 << 30, 16 << 20, True), (1 << 30, (16 << 20) + 1, False),
])
def test_max_frame_negotiation_bounds(offer, reply, ok):
    """The host may pick at most the guest's offer, within [MIN, ABSOLUTE] (an offer
    below the minimum gets the minimum).  Refused on both ends."""
    guest, host = Connection(Role.GUEST), Connection(Role.HOST)
    deliver(guest, host, hello(max_frame=offer))
    if ok:
        deliver(host, guest, hello_reply(max_frame=reply))
        assert guest.max_frame == host.max_frame == reply
        return
    with pytest.raises(LocalProtocolError, match="max_frame"):
        host.send(hello_reply(max_frame=reply))
    assert host.state is State.HELLO_RECEIVED  # nothing sent: the host may answer again
    # a host that does not check is caught by the guest
    raw = frame(1, 0x5, codec.encode_payload(hello_reply(max_frame=reply))[2])
    expect_remote_error(guest, raw, "max_frame")


# --- round trips of every message, after HELLO -------------------------------------

SETTINGS = settings(max_examples=40, suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.parametrize("opcode", list(OP_STRATEGIES), ids=lambda o: o.name)
@SETTINGS
@given(data=st.data())
def test_fs_request_and_reply_round_trip(opcode, data):
    guest, host = pair()
    request = data.draw(fs_requests(OP_STRATEGIES[opcode]))
    deliver(guest, host, request)
    if opcode in (Opcode.FORGET, Opcode.INTERRUPT):
        assert host.outstanding_requests == guest.outstanding_requests == 0
        return
    assert host.outstanding_requests == guest.outstanding_requests == 1
    reply = data.draw(fs_replies(opcode, request.unique))
    deliver(host, guest, reply)
    assert host.outstanding_requests == guest.outstanding_requests == 0


@given(st.builds(Hello, version=u32, features=u64, max_frame=u32, name=hello_names),
       hello_replies())
def test_hello_round_trip(hello_msg, reply):
    guest, host = Connection(Role.GUEST), Connection(Role.HOST)
    deliver(guest, host, hello_msg)
    offer = max(wire.MIN_MAX_FRAME, hello_msg.max_frame)
    if reply.error == 0 and reply.max_frame > offer:
        with pytest.raises(LocalProtocolError):
            host.send(reply)
        return
    deliver(host, guest, reply)
    expected = (State.CLOSED if reply.error else State.AUTHENTICATING
                if reply.features & wire.FEATURE_AUTH else State.READY)
    assert guest.state is host.state is expected


# --- the AUTH exchange (protocol/auth.py makes the proofs; here only the turns) -----------

NONCE, PROOF = bytes(range(16)), bytes(range(32))


def auth_hello_reply() -> HelloReply:
    return HelloReply(0, wire.PROTOCOL_VERSION, wire.SUPPORTED_FEATURES | wire.FEATURE_AUTH,
                      Policy.CLEAN_LEASE, Detector.NONE, 1000, 1000, 65536, 1, BOOT, NONCE)


def authenticating() -> tuple[Connection, Connection]:
    guest, host = Connection(Role.GUEST), Connection(Role.HOST)
    deliver(guest, host, hello())
    deliver(host, guest, auth_hello_reply())
    assert guest.state is host.state is State.AUTHENTICATING
    assert guest.max_frame == host.max_frame == 65536
    return guest, host


def test_auth_exchange_then_ready():
    guest, host = authenticating()
    deliver(guest, host, Auth(NONCE, PROOF))
    assert (guest.state, host.state) == (State.AUTH_SENT, State.AUTH_RECEIVED)
    deliver(host, guest, AuthReply(0, PROOF))
    assert guest.state is host.state is State.READY
    deliver(guest, host, FsRequest(1, 1, Getattr()))


def test_refused_auth_closes_both_ends():
    guest, host = authenticating()
    deliver(guest, host, Auth(NONCE, PROOF))
    deliver(host, guest, AuthReply(-errno.EACCES))
    assert guest.state is host.state is State.CLOSED
    with pytest.raises(LocalProtocolError):
        guest.send(FsRequest(1, 1, Getattr()))


def test_nothing_is_served_before_auth():
    """Until the AUTH reply, the only frames in turn are AUTH and its reply: an FS
    request or a heartbeat from an unauthenticated peer is fatal, and neither end
    can send one."""
    for raw in (fs_frame(3, bytes(16)), frame(5, 0x9, bytes(8)),
                frame(3, 0x5, bytes(8)), frame(1, 0x9, codec.encode_payload(hello())[2])):
        _, host = authenticating()
        expect_remote_error(host, raw, "in state authenticating")
    guest, host = authenticating()
    deliver(guest, host, Auth(NONCE, PROOF))
    expect_remote_error(host, fs_frame(3, bytes(16)), "in state auth-received")
    guest, host = authenticating()
    with pytest.raises(LocalProtocolError, match="cannot send FsRequest in state authenticating"):
        guest.send(FsRequest(1, 1, Getattr()))
    with pytest.raises(LocalProtocolError, match="cannot send Invalidate in state authenticating"):
        host.send(Invalidate(1, 1, 0, 0, 1))
    with pytest.raises(LocalProtocolError, match="cannot send AuthReply in state authenticating"):
        host.send(AuthReply(0, PROOF))
    deliver(guest, host, Auth(NONCE, PROOF))
    with pytest.raises(LocalProtocolError, match="cannot send Auth in state auth-sent"):
        guest.send(Auth(NONCE, PROOF))
    expect_remote_error(guest, frame(6, 0x9, NONCE + PROOF), "guest cannot recv Auth")


@pytest.mark.parametrize("stage", ["idle", "authenticating", "auth-sent"])
def test_frames_before_the_handshake_is_over_are_small(stage):
    """A peer that has proved nothing cannot make us buffer more than
    HANDSHAKE_MAX_FRAME: refused on the header, before the payload arrives."""
    limit = wire.HANDSHAKE_MAX_FRAME
    if stage == "idle":
        conn = Connection(Role.HOST)
    else:
        guest, host = authenticating()
        conn = host
        if stage == "auth-sent":
            guest.send(Auth(NONCE, PROOF))
            conn = guest
    expect_remote_error(conn, struct.pack("<III", 2, 0x9, limit + 1), "before the handshake")
    fresh = Connection(Role.HOST)
    fresh.receive_data(struct.pack("<III", 1, 0x9, limit))
    assert fresh.next_event() is NEED_DATA  # at the limit: buffered, judged when complete
    assert limit >= len(codec.encode_payload(Hello(1, 0, 1 << 20, "x" * 255))[2])


def test_auth_out_of_turn_without_feature_auth():
    guest, host = pair()
    with pytest.raises(LocalProtocolError, match="cannot send Auth in state ready"):
        guest.send(Auth(NONCE, PROOF))
    expect_remote_error(host, frame(6, 0x9, NONCE + PROOF), "cannot recv Auth in state ready")


@SETTINGS
@given(st.one_of(invalidates, inval_entries))
def test_invalidation_and_ack_round_trip(message):
    guest, host = pair()
    deliver(host, guest, message)
    assert guest.outstanding_invalidations == host.outstanding_invalidations == 1
    raw = guest.send(Ack(message.seq))
    expected_code = 3 if isinstance(message, Invalidate) else 4
    assert struct.unpack_from("<II", raw) == (expected_code, 0x5)
    host.receive_data(raw)
    assert host.next_event() == Ack(message.seq)
    assert guest.outstanding_invalidations == host.outstanding_invalidations == 0


@SETTINGS
@given(u64)
def test_heartbeat_round_trip(seq):
    guest, host = pair()
    deliver(guest, host, Heartbeat(seq))
    deliver(host, guest, HeartbeatReply(seq))


# --- feeding: byte at a time, many frames per chunk ---------------------------------------


def conversation() -> tuple[list, list]:
    """A scripted exchange: (guest->host messages, host->guest messages)."""
    to_host = [
        Hello(1, 3, 65536, "byte-guest"),
        FsRequest(1, 1, Lookup(b"file")),
        FsRequest(2, 5, Read(fh=1, offset=0, size=4096)),
        FsRequest(3, 5, Write(fh=1, offset=0, data=b"x" * 1000)),
        FsRequest(4, 5, Forget(1)),
        Heartbeat(1),
        Ack(10),
        Ack(11),
    ]
    attr = EntryOut(5, 0, 1, 1, 0, 0, _attr())
    to_guest = [
        hello_reply(max_frame=65536),
        Invalidate(10, 5, 0, 0, 1),
        InvalEntry(11, 1, b"file", 2),
        FsReply(2, 0, ReadOut(b"y" * 4096)),
        FsReply(1, 0, attr),
        FsReply(3, 0, WriteOut(1000)),
        HeartbeatReply(1),
    ]
    return to_host, to_guest


def _attr() -> Attr:
    return Attr(5, 10, 1, 0, 0, 0, 0, 0, 0, 0o100644, 1, 0, 0, 0, 4096)


def run_conversation(feed):
    """Play conversation() with `feed(receiver, data) -> events`; check every event."""
    to_host, to_guest = conversation()
    guest, host = Connection(Role.GUEST), Connection(Role.HOST)
    assert feed(host, guest.send(to_host[0])) == [to_host[0]]
    assert feed(guest, host.send(to_guest[0])) == [to_guest[0]]
    assert feed(host, b"".join(guest.send(m) for m in to_host[1:6])) == to_host[1:6]
    assert feed(guest, b"".join(host.send(m) for m in to_guest[1:3])) == to_guest[1:3]
    assert feed(host, b"".join(guest.send(m) for m in to_host[6:])) == to_host[6:]
    assert feed(guest, b"".join(host.send(m) for m in to_guest[3:])) == to_guest[3:]
    assert guest.outstanding_requests == host.outstanding_requests == 0
    assert guest.outstanding_invalidations == host.outstanding_invalidations == 0
    for conn in (guest, host):
        conn.receive_data(b"")
        assert conn.next_event() == ConnectionClosed()
        assert conn.state is State.CLOSED
        assert conn.next_event() == ConnectionClosed()


def drain(conn: Connection) -> list:
    events = []
    while (event := conn.next_event()) is not NEED_DATA:
        events.append(event)
    return events


def test_many_frames_in_one_chunk():
    def feed(conn, data):
        conn.receive_data(data)
        return drain(conn)

    run_conversation(feed)


def test_byte_at_a_time():
    def feed(conn, data):
        events = []
        for i in range(len(data)):
            conn.receive_data(data[i: i + 1])
            events.extend(drain(conn))
            if i < len(data) - 1:
                assert conn.next_event() is NEED_DATA
        return events

    run_conversation(feed)


@settings(max_examples=30)
@given(st.integers(0, 2**32), st.integers(1, 3000))
def test_random_chunking(seed, max_chunk):
    rnd = random.Random(seed)

    def feed(conn, raw):
        events, i = [], 0
        while i < len(raw):
            n = rnd.randint(1, max_chunk)
            conn.receive_data(raw[i: i + n])
            i += n
            events.extend(drain(conn))
        return events

    run_conversation(feed)


# --- hostile input at the Connection -----------------------------------------------------


def test_truncated_frames_at_eof():
    for cut in (1, 11, 12, 20):
        guest, host = pair()
        raw = guest.send(FsRequest(1, 1, Lookup(b"name")))
        host.receive_data(raw[:cut])
        assert host.next_event() is NEED_DATA
        host.receive_data(b"")
        with pytest.raises(RemoteProtocolError, match="truncated frame"):
            host.next_event()
        assert host.state is State.ERROR


def test_clean_eof_between_frames_and_data_after_eof():
    guest, host = pair()
    host.receive_data(guest.send(Heartbeat(1)) + b"")
    host.receive_data(b"")
    assert host.next_event() == Heartbeat(1)
    assert host.next_event() == ConnectionClosed()
    with pytest.raises(LocalProtocolError, match="after EOF"):
        host.receive_data(b"more")


@pytest.mark.parametrize("role", [Role.HOST, Role.GUEST])
@pytest.mark.parametrize("negotiated", [False, True])
def test_oversized_frame_refused_on_its_header(role, negotiated):
    """size > max_frame raises as soon as the 12 header bytes are in, before any payload."""
    if negotiated:
        guest, host = pair(max_frame=8192)
        conn = host if role is Role.HOST else guest
        limit = 8192
    else:
        conn = Connection(role)
        limit = wire.DEFAULT_MAX_FRAME
    header = struct.pack("<III", 5, 0x9 if role is Role.HOST else 0x5, limit + 1)
    conn.receive_data(header[:11])
    assert conn.next_event() is NEED_DATA
    conn.receive_data(header[11:])
    with pytest.raises(RemoteProtocolError, match="exceeds the maximum"):
        conn.next_event()
    assert conn.state is State.ERROR


def test_frame_of_exactly_max_frame_is_buffered():
    guest, host = pair(max_frame=8192)
    host.receive_data(struct.pack("<III", 2, 0x9, 8192))
    assert host.next_event() is NEED_DATA
    data = b"z" * (8192 - 40 - 40)
    guest2, host2 = pair(max_frame=8192)
    raw = guest2.send(FsRequest(1, 1, Write(fh=1, offset=0, data=data)))
    assert len(raw) == 12 + 8192
    host2.receive_data(raw)
    assert host2.next_event().op.data == data


@pytest.mark.parametrize("raw,match", [
    (frame(0, 0x9, b""), "unknown request code"),
    (frame(10, 0x9, bytes(8)), "unknown request code"),
    (frame(5, 0x19, bytes(8)), "unknown flag bits"),
    (frame(5, 0x80000009, bytes(8)), "unknown flag bits"),
    (frame(5, 0xA, bytes(8)), "version"),
    (frame(5, 0x8, bytes(8)), "version"),
    (frame(5, 0xD, bytes(8)), "REPLY and NEED_REPLY"),
    (fs_frame(1, b"foo"), "malformed"),
    (fs_frame(1, b"foo\0bar"), "malformed"),
    (fs_frame(16, struct.pack("<QQIIQII", 1, 0, 5, 0, 0, 0, 0) + b"abc"), "WRITE"),
    (frame(2, 0x9, struct.pack("<IIQQIIIHH", 41, 3, 1, 1, 0, 0, 0, 0, 0) + bytes(16)),
     "fuse_in_header"),
    (frame(3, 0x5, struct.pack("<Q", 99)), "ACK for seq 99"),
    (frame(4, 0x5, struct.pack("<Q", 99)), "ACK for seq 99"),
    (frame(5, 0x5, struct.pack("<QiI", 1, 0, 0)), "cannot recv HeartbeatReply"),
    (frame(1, 0x9, codec.encode_payload(Hello(1, 0, 8192, "again"))[2]), "cannot recv Hello"),
    (frame(2, 0x5, struct.pack("<IiQ", 16, 0, 1) + bytes(24)), "not outstanding"),
    (frame(3, 0x9, codec.encode_payload(Invalidate(1, 1, 0, 0, 1))[2]), "cannot recv Invalidate"),
])
def test_hostile_frames_at_the_host(raw, match):
    guest, host = pair()
    expect_remote_error(host, raw, match)


def test_hostile_frames_at_the_guest():
    cases = [
        (fs_frame(1, b"foo\0"), "cannot recv FsRequest"),
        (frame(2, 0x5, struct.pack("<IiQ", 16, 0, 99) + bytes(24)), "not outstanding"),
        (frame(5, 0x9, struct.pack("<Q", 1)), "cannot recv Heartbeat"),
        (frame(5, 0x5, struct.pack("<QiI", 1, 0, 0)), "answers nothing"),
        (frame(3, 0x5, struct.pack("<Q", 1)), "cannot recv Ack"),
        (fs_frame(26, bytes(64)), "unsupported FUSE opcode"),  # not the host: fatal
        (frame(1, 0x5, codec.encode_payload(hello_reply())[2]), "cannot recv HelloReply"),
    ]
    for raw, match in cases:
        guest, host = pair()
        expect_remote_error(guest, raw, match)


def test_reply_to_a_unique_never_sent():
    guest, host = pair()
    deliver(guest, host, FsRequest(5, 1, Getattr()))
    raw = frame(2, 0x5, struct.pack("<IiQ", 16, -2, 6) + bytes(24))
    expect_remote_error(guest, raw, "unique 6, which is not outstanding")


def test_reply_after_forget_request_is_an_error():
    guest, host = pair()
    deliver(guest, host, FsRequest(5, 1, Getattr()))
    guest.forget_request(5)
    expect_remote_error(guest, host.send(FsReply(5, -errno.EIO)), "not outstanding")


def test_ack_for_a_seq_never_sent_and_with_the_wrong_code():
    guest, host = pair()
    deliver(host, guest, Invalidate(1, 5, 0, 0, 1))
    expect_remote_error(host, frame(3, 0x5, struct.pack("<Q", 2)), "ACK for seq 2")
    guest, host = pair()
    deliver(host, guest, Invalidate(1, 5, 0, 0, 1))
    expect_remote_error(host, frame(4, 0x5, struct.pack("<Q", 1)), "request code 4")
    guest, host = pair()
    deliver(host, guest, InvalEntry(1, 1, b"n", 1))
    expect_remote_error(host, frame(3, 0x5, struct.pack("<Q", 1)), "request code 3")
    guest, host = pair()
    deliver(host, guest, Invalidate(1, 5, 0, 0, 1))
    host.receive_data(guest.send(Ack(1)))
    host.next_event()
    expect_remote_error(host, frame(3, 0x5, struct.pack("<Q", 1)), "not outstanding")  # twice


def test_repeated_ids_from_the_peer():
    guest, host = pair()
    deliver(guest, host, FsRequest(5, 1, Getattr()))
    expect_remote_error(host, fs_frame(3, bytes(16), unique=5), "already outstanding")
    guest, host = pair()
    deliver(host, guest, Invalidate(7, 5, 0, 0, 1))
    expect_remote_error(guest, frame(3, 0x9, codec.encode_payload(Invalidate(7, 6, 0, 0, 2))[2]),
                        "repeated")


def test_max_in_flight():
    guest, host = pair(max_in_flight=2)
    host.receive_data(fs_frame(3, bytes(16), unique=1) + fs_frame(3, bytes(16), unique=2))
    assert len(drain(host)) == 2
    expect_remote_error(host, fs_frame(3, bytes(16), unique=3), "in flight")


@pytest.mark.parametrize("role", [Role.HOST, Role.GUEST])
def test_messages_out_of_turn_before_hello(role):
    conn = Connection(role)
    raws = [fs_frame(3, bytes(16)), frame(5, 0x9, bytes(8)), frame(5, 0x5, bytes(8)),
            frame(3, 0x5, bytes(8))]
    if role is Role.GUEST:
        raws.append(frame(1, 0x9, codec.encode_payload(hello())[2]))  # a guest never gets HELLO
    else:
        raws.append(frame(1, 0x5, codec.encode_payload(hello_reply())[2]))
    for raw in raws:
        conn = Connection(role)
        expect_remote_error(conn, raw)


def test_fs_request_while_hello_unanswered():
    guest, host = Connection(Role.GUEST), Connection(Role.HOST)
    host.receive_data(guest.send(hello()) + fs_frame(3, bytes(16)))
    assert host.next_event() == hello()
    with pytest.raises(RemoteProtocolError, match="cannot recv FsRequest in state hello-received"):
        host.next_event()


# --- the unsupported opcode: -ENOSYS and the connection survives ---------------------------


@pytest.mark.parametrize("opcode", [26, 37, 9999, 0])
def test_unsupported_opcode_gets_enosys(opcode):
    guest, host = pair()
    host.receive_data(fs_frame(opcode, b"junk", unique=42) + guest.send(FsRequest(43, 1, Getattr())))
    with pytest.raises(codec.UnsupportedOpcode) as info:
        host.next_event()
    assert (info.value.unique, info.value.opcode) == (42, opcode)
    assert host.state is State.READY and host.outstanding_requests == 1
    with pytest.raises(LocalProtocolError, match="expected an error"):
        host.send(FsReply(42, 0, EmptyOut()))  # only an errno can answer it
    raw = host.send(FsReply(42, -errno.ENOSYS))
    assert raw[12:28] == struct.pack("<IiQ", 16, -errno.ENOSYS, 42)
    assert host.next_event() == FsRequest(43, 1, Getattr())  # the next frame is intact
    deliver(host, guest, FsReply(43, 0, AttrOut(1, 0, _attr())))
    assert host.outstanding_requests == 0


def test_unsupported_opcode_without_need_reply_is_consumed_and_not_outstanding():
    """Issue 13, item 8: the sender of a frame without NEED_REPLY awaits no reply,
    so the unknown opcode is raised with needs_reply False, nothing is recorded
    outstanding (a reply would be refused), and the connection reads on.
    Failed before: the unique was recorded and the host could answer it."""
    guest, host = pair()
    host.receive_data(fs_frame(9999, b"junk", unique=42, flags=0x1)
                      + guest.send(FsRequest(43, 1, Getattr())))
    with pytest.raises(codec.UnsupportedOpcode) as info:
        host.next_event()
    assert not info.value.needs_reply
    assert host.state is State.READY and host.outstanding_requests == 0
    with pytest.raises(LocalProtocolError, match="not outstanding"):
        host.send(FsReply(42, -errno.ENOSYS))
    assert host.next_event() == FsRequest(43, 1, Getattr())


def test_unsupported_opcode_repeating_an_outstanding_unique_is_fatal():
    guest, host = pair()
    deliver(guest, host, FsRequest(42, 1, Getattr()))
    expect_remote_error(host, fs_frame(26, b"", unique=42), "already outstanding")


def test_unsupported_opcode_before_hello_is_fatal():
    host = Connection(Role.HOST)
    expect_remote_error(host, fs_frame(26, b""), "unsupported")


# --- local errors: nothing is sent, nothing recorded, the connection goes on ------------------


def test_sending_out_of_turn():
    guest, host = Connection(Role.GUEST), Connection(Role.HOST)
    with pytest.raises(LocalProtocolError, match="cannot send FsRequest in state idle"):
        guest.send(FsRequest(1, 1, Getattr()))
    with pytest.raises(LocalProtocolError, match="cannot send HelloReply"):
        guest.send(hello_reply())
    with pytest.raises(LocalProtocolError, match="cannot send Hello "):
        host.send(hello())
    with pytest.raises(LocalProtocolError, match="cannot send HelloReply in state idle"):
        host.send(hello_reply())
    deliver(guest, host, hello())
    with pytest.raises(LocalProtocolError, match="cannot send Hello in state hello-sent"):
        guest.send(hello())
    with pytest.raises(LocalProtocolError, match="cannot send Invalidate in state hello-received"):
        host.send(Invalidate(1, 1, 0, 0, 1))
    deliver(host, guest, hello_reply())
    for message in (Invalidate(1, 1, 0, 0, 1), InvalEntry(1, 1, b"x", 1), FsReply(1),
                    HeartbeatReply(1), hello_reply()):
        with pytest.raises(LocalProtocolError, match="guest cannot send"):
            guest.send(message)
    for message in (FsRequest(1, 1, Getattr()), Ack(1), Heartbeat(1), hello()):
        with pytest.raises(LocalProtocolError, match="host cannot send"):
            host.send(message)
    assert guest.state is host.state is State.READY
    deliver(guest, host, FsRequest(1, 1, Getattr()))  # both ends still work


def test_duplicate_unique_and_reply_to_nothing():
    guest, host = pair()
    deliver(guest, host, FsRequest(1, 1, Getattr()))
    with pytest.raises(LocalProtocolError, match="already outstanding"):
        guest.send(FsRequest(1, 2, Lookup(b"x")))
    with pytest.raises(LocalProtocolError, match="not outstanding"):
        host.send(FsReply(2, -errno.EIO))
    with pytest.raises(LocalProtocolError, match="carries WriteOut, expected AttrOut"):
        host.send(FsReply(1, 0, WriteOut(1)))
    assert host.outstanding_requests == 1  # the wrong reply was not recorded
    deliver(guest, host, FsRequest(1, 1, Forget(1)))  # FORGET has no unique to collide with
    deliver(host, guest, FsReply(1, -errno.ENOENT))
    deliver(guest, host, FsRequest(1, 1, Lookup(b"again")))  # a finished unique may be reused


def test_invalidation_ids_and_acks():
    guest, host = pair()
    deliver(host, guest, Invalidate(1, 1, 0, 0, 1))
    with pytest.raises(LocalProtocolError, match="already outstanding"):
        host.send(InvalEntry(1, 1, b"n", 1))
    with pytest.raises(LocalProtocolError, match="ACK for seq 2"):
        guest.send(Ack(2))
    assert guest.state is State.READY
    host.receive_data(guest.send(Ack(1)))
    assert host.next_event() == Ack(1)
    with pytest.raises(LocalProtocolError, match="ACK for seq 1"):
        guest.send(Ack(1))


def test_names_containing_nul_are_refused_by_send():
    guest, host = pair()
    with pytest.raises(LocalProtocolError, match="without NUL"):
        guest.send(FsRequest(1, 1, Lookup(b"a\0b")))
    with pytest.raises(LocalProtocolError, match="without NUL"):
        host.send(InvalEntry(1, 1, b"a\0", 1))
    assert guest.outstanding_requests == host.outstanding_invalidations == 0
    deliver(guest, host, FsRequest(1, 1, Lookup(b"ab")))


def test_frames_over_max_are_refused_by_send():
    guest, host = pair(max_frame=8192)
    too_big = b"x" * (8192 - 80 + 1)
    with pytest.raises(LocalProtocolError, match="over the maximum"):
        guest.send(FsRequest(1, 1, Write(fh=1, offset=0, data=too_big)))
    assert guest.outstanding_requests == 0
    deliver(guest, host, FsRequest(1, 1, Read(fh=1, offset=0, size=9000)))
    with pytest.raises(LocalProtocolError, match="over the maximum"):
        host.send(FsReply(1, 0, ReadOut(b"y" * 8192)))
    assert host.outstanding_requests == 1
    deliver(host, guest, FsReply(1, -errno.EIO))  # what the server does instead


# --- fuzz: random bytes and mutated frames never raise anything but ProtocolError -----------


def valid_stream(role: Role) -> list[bytes]:
    """The frames a `role` end receives in conversation(), after its HELLO."""
    to_host, to_guest = conversation()
    guest, host = Connection(Role.GUEST), Connection(Role.HOST)
    host.receive_data(guest.send(to_host[0]))
    host.next_event()
    guest.receive_data(host.send(to_guest[0]))
    guest.next_event()
    frames_to_host = [guest.send(m) for m in to_host[1:6]]
    frames_to_guest = [host.send(m) for m in to_guest[1:3]]
    host.receive_data(b"".join(frames_to_host))
    drain(host)
    guest.receive_data(b"".join(frames_to_guest))
    drain(guest)
    frames_to_host += [guest.send(m) for m in to_host[6:]]
    frames_to_guest += [host.send(m) for m in to_guest[3:]]
    # plus frames with an unsupported opcode and a few oddities
    frames_to_host.append(fs_frame(26, bytes(64), unique=500))
    return frames_to_host if role is Role.HOST else frames_to_guest


def ready(role: Role) -> Connection:
    """A `role` end in READY whose peer has sent HELLO (and which sent the requests
    conversation() answers, for the guest)."""
    to_host, to_guest = conversation()
    guest, host = Connection(Role.GUEST), Connection(Role.HOST)
    host.receive_data(guest.send(to_host[0]))
    host.next_event()
    guest.receive_data(host.send(to_guest[0]))
    guest.next_event()
    if role is Role.HOST:
        return host
    for m in to_host[1:6]:
        guest.send(m)
    return guest


def consume(conn: Connection, data: bytes, eof: bool) -> None:
    """Feed `data` and pull events until nothing is left.  Only RemoteProtocolError may
    escape (and then the connection is in ERROR); any other exception fails the test."""
    try:
        conn.receive_data(data)
        if eof:
            conn.receive_data(b"")
        for _ in range(10_000):
            try:
                event = conn.next_event()
            except codec.UnsupportedOpcode as exc:
                assert conn.role is Role.HOST
                if exc.needs_reply:  # else nothing is outstanding: no reply (the daemon's way)
                    conn.send(FsReply(exc.unique, -errno.ENOSYS))
                continue
            if event is NEED_DATA or isinstance(event, ConnectionClosed):
                return
        raise AssertionError("next_event() never settled")
    except RemoteProtocolError:
        assert conn.state is State.ERROR


_STREAMS = {role: valid_stream(role) for role in Role}


@st.composite
def mutated_streams(draw, role: Role):
    frames = list(_STREAMS[role])
    raw = bytearray(b"".join(draw(st.lists(st.sampled_from(frames), min_size=1, max_size=6))))
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "byte", "truncate", "splice", "insert", "delete",
                                     "header"]))
        if not raw:
            break
        i = draw(st.integers(0, len(raw) - 1))
        if kind == "flip":
            raw[i] ^= 1 << draw(st.integers(0, 7))
        elif kind == "byte":
            raw[i] = draw(st.integers(0, 255))
        elif kind == "truncate":
            del raw[i:]
        elif kind == "splice":
            other = draw(st.sampled_from(frames))
            j = draw(st.integers(0, len(other)))
            raw[i:] = other[j:]
        elif kind == "insert":
            raw[i:i] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "delete":
            del raw[i: i + draw(st.integers(1, 8))]
        else:  # rewrite a u32 of a header-ish place with a boundary value
            j = draw(st.sampled_from([0, 4, 8, 12, 16, 28]))
            if j + 4 <= len(raw):
                raw[j: j + 4] = struct.pack("<I", draw(st.sampled_from(
                    [0, 1, 2, 3, 5, 9, 16, 40, 0x7FFFFFFF, 0xFFFFFFFF])))
    return bytes(raw)


@pytest.mark.parametrize("role", list(Role), ids=lambda r: r.value)
@settings(max_examples=250, deadline=None)
@given(data=st.data(), eof=st.booleans())
def test_fuzz_mutated_frames(role, data, eof):
    consume(ready(role), data.draw(mutated_streams(role)), eof)


@pytest.mark.parametrize("role", list(Role), ids=lambda r: r.value)
@pytest.mark.parametrize("start", ["idle", "authenticating", "ready"])
@settings(max_examples=150, deadline=None)
@given(raw=st.binary(max_size=300), eof=st.booleans())
def test_fuzz_random_bytes(role, start, raw, eof):
    if start == "authenticating":
        guest, host = authenticating()
        conn = host if role is Role.HOST else guest
        if role is Role.GUEST:
            guest.send(Auth(NONCE, PROOF))
    else:
        conn = ready(role) if start == "ready" else Connection(role)
    consume(conn, raw, eof)


@pytest.mark.parametrize("role", list(Role), ids=lambda r: r.value)
@settings(max_examples=150, deadline=None)
@given(code=st.integers(0, 6), flags=st.sampled_from([0x1, 0x5, 0x9, 0xD, 0x0, 0x15]),
       payload=st.binary(max_size=200), eof=st.booleans())
def test_fuzz_random_payloads_behind_valid_headers(role, code, flags, payload, eof):
    consume(ready(role), frame(code, flags, payload), eof)


def test_a_witness_connection_carries_purge_and_purged_only():
    """TRANSITIONS: WITNESS moves both ends to WITNESS, where only the reply,
    PURGE (host -> witness) and PURGED (witness -> host) are in turn."""
    guest, host = pair()
    assert isinstance(deliver(guest, host, Witness(3)), Witness)
    assert guest.state is host.state is State.WITNESS
    assert deliver(host, guest, WitnessReply(0)) == WitnessReply(0)
    with pytest.raises(LocalProtocolError, match="WITNESS reply to no WITNESS"):
        host.send(WitnessReply(0))
    assert deliver(host, guest, Purge(wire.PURGE_SILENT)) == Purge(wire.PURGE_SILENT)
    assert deliver(guest, host, Purged(wire.PURGED_ASKED, 2)) == Purged(wire.PURGED_ASKED, 2)
    with pytest.raises(LocalProtocolError, match="cannot send FsRequest in state witness"):
        guest.send(FsRequest(1, 1, Getattr()))
    with pytest.raises(LocalProtocolError, match="cannot send Heartbeat"):
        guest.send(Heartbeat(1))


def test_purge_and_purged_are_out_of_turn_on_a_guest_session():
    guest, host = pair()
    with pytest.raises(LocalProtocolError, match="cannot send Purge in state ready"):
        host.send(Purge(wire.PURGE_SILENT))
    host.receive_data(bytes.fromhex("09000000 01000000 08000000 01000000 00000000"))
    with pytest.raises(RemoteProtocolError, match="cannot recv Purged in state ready"):
        host.next_event()


def test_a_refused_witness_closes_the_connection():
    guest, host = pair()
    deliver(guest, host, Witness(3))
    deliver(host, guest, WitnessReply(-13))
    assert guest.state is host.state is State.CLOSED
