"""The fast codec path (protocol/fastcodec.py) agrees with the reference codec (protocol/codec.py).

The reference (construct schemas, parsed by construct) is the definition; the
fast path (struct formats derived from those schemas) must be exactly as
strict.  With hypothesis, on random valid messages of every type and on
random, mutated and truncated byte strings:

* decoding: both give equal messages, or both raise, with the same exception
  type (RemoteProtocolError or its subclass UnsupportedOpcode);
* encoding: both give identical bytes, or both raise the same exception type
  (LocalProtocolError for a field that does not fit);
* the fast path alone (`fastcodec.decode` / `encode_frame`) never answers
  where the reference raises, answers every valid hot message (READ, WRITE,
  LOOKUP, GETATTR, OPEN, RELEASE, FLUSH, FSYNC, their replies, INVALIDATE,
  ACK, HEARTBEAT), and reads a payload correctly at any offset of a bytes or
  bytearray buffer;
* a fast and a reference `Connection` fed the same streams, in random
  chunks, produce the same events, errors and states.
"""

from __future__ import annotations

import dataclasses
import errno
import random
import struct

import pytest
from construct import ConstructError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import test_connection
from protocol import codec, connection, fastcodec, fuse, wire
from protocol.connection import NEED_DATA, Connection, Role
from protocol.errors import LocalProtocolError, RemoteProtocolError
from protocol.fuse import Opcode
from protocol.messages import (
    Ack,
    Attr,
    AttrOut,
    ConnectionClosed,
    EmptyOut,
    EntryOut,
    Flush,
    Forget,
    FsReply,
    FsRequest,
    Fsync,
    Getattr,
    Create,
    Heartbeat,
    HeartbeatReply,
    InvalEntry,
    Invalidate,
    LeaseGrant,
    Lookup,
    Mkdir,
    Open,
    OpenOut,
    Read,
    ReadOut,
    Release,
    Rename,
    Rmdir,
    Unlink,
    Write,
    WriteOut,
)
from test_protocol import (
    OP_STRATEGIES,
    fs_replies,
    fs_requests,
    hello_replies,
    hellos,
    inval_entries,
    invalidates,
    u64,
)

SETTINGS = settings(max_examples=600, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

HOT_OPCODES = list(fastcodec.HOT_REQUESTS)
HOT_BODIES = (EntryOut, AttrOut, OpenOut, WriteOut, ReadOut, EmptyOut)
ACK_CODES = (wire.Request.INVALIDATE, wire.Request.INVAL_ENTRY)


# --- the two codecs, as the Connection uses them -------------------------------------------


def outcome(call):
    """("ok", value) or ("raise", exception type)."""
    try:
        return "ok", call()
    except Exception as exc:  # noqa: BLE001 - the type is what is compared
        return "raise", type(exc)


def ref_frame(message, ack_code=None) -> bytes:
    if ack_code is not None:
        code, flags, payload = codec.encode_ack(message, ack_code)
    else:
        code, flags, payload = codec.encode_payload(message)
    return codec.encode_header(code, flags, len(payload)) + payload


def fast_only_frame(message, ack_code=None) -> bytes | None:
    if ack_code is not None:
        return fastcodec.encode_ack_frame(message, ack_code)
    return fastcodec.encode_frame(message)


def fast_frame(message, ack_code=None) -> bytes:
    """What Connection.send builds with the fast codec on: the fast path, else the reference."""
    frame = fast_only_frame(message, ack_code)
    return frame if frame is not None else ref_frame(message, ack_code)


def ref_decode(request, flags, payload, reply_opcode):
    return codec.decode_payload(request, flags, bytes(payload), reply_opcode)


def fast_decode(request, flags, payload, reply_opcode):
    message = fastcodec.decode(request, flags, payload, 0, len(payload), reply_opcode)
    return message if message is not None else ref_decode(request, flags, payload, reply_opcode)


def assert_encode_agrees(message, ack_code=None):
    ref = outcome(lambda: ref_frame(message, ack_code))
    assert outcome(lambda: fast_frame(message, ack_code)) == ref, message
    fast = fast_only_frame(message, ack_code)
    if fast is not None:  # the fast path answered: the reference must give the same bytes
        assert ref == ("ok", fast), (message, ref)
    return ref, fast


def assert_decode_agrees(request, flags, payload, reply_opcode):
    ref = outcome(lambda: ref_decode(request, flags, payload, reply_opcode))
    assert outcome(lambda: fast_decode(request, flags, payload, reply_opcode)) == ref
    if ref[0] == "raise":
        assert issubclass(ref[1], RemoteProtocolError), ref
    # The fast path alone, on bytes and on a bytearray, at offset 0 and inside a
    # larger buffer: it answers only where the reference succeeds, with the same message.
    for pad in (b"", b"\x00\xff" * 3 + b"\x07"):
        for kind in (bytes, bytearray):
            buf = kind(pad + bytes(payload) + pad[::-1])
            got = fastcodec.decode(request, flags, buf, len(pad), len(payload), reply_opcode)
            if got is not None:
                assert ref == ("ok", got), (request, flags, bytes(payload).hex(), ref, got)
    return ref


def split(frame: bytes) -> tuple[int, int, bytes]:
    request, flags, size = struct.unpack_from("<III", frame)
    assert size == len(frame) - 12
    return request, flags, frame[12:]


def is_hot(message) -> bool:
    match message:
        case FsRequest():
            # (supplementary groups travel as an extension: the reference codec's)
            return type(message.op) in fastcodec.HOT_REQUESTS.values() and not message.groups
        case FsReply():
            return type(message.body) in HOT_BODIES
        case Invalidate() | Heartbeat() | Ack():
            return True  # (a HEARTBEAT reply is not hot: the reference codec handles it)
    return False


# --- strategies ------------------------------------------------------------------------------


@st.composite
def replies(draw, opcodes=tuple(codec.REPLY_BODIES)):
    opcode = draw(st.sampled_from(opcodes))
    unique = draw(u64)
    return opcode, draw(fs_replies(opcode, unique))


hot_requests = fs_requests(st.one_of(*(OP_STRATEGIES[o] for o in HOT_OPCODES)))
all_requests = fs_requests()
acks = st.tuples(st.builds(Ack, seq=u64), st.sampled_from(ACK_CODES))
heartbeats = st.one_of(st.builds(Heartbeat, seq=u64),
                       st.builds(HeartbeatReply, seq=u64, error=st.integers(-4095, 0)))
# Every message type; FS replies are drawn with the opcode they answer.
messages = st.one_of(
    hot_requests, all_requests,
    replies().map(lambda pair: pair[1]),
    invalidates, inval_entries, heartbeats, hellos, hello_replies(),
)

BAD_VALUES = [-1, 1, 2, 4095, 4096, -4095, -4096, 1 << 8, 1 << 16, 1 << 31, -(1 << 31) - 1,
              1 << 32, 1 << 63, -(1 << 63) - 1, 1 << 64, 10**30, 1.5, 0.0, None, True, "x", b"x",
              b"a\x00b", bytearray(b"y"), memoryview(b"z"), ()]


def _replace(obj, path: tuple[str, ...], value):
    if len(path) == 1:
        return dataclasses.replace(obj, **{path[0]: value})
    return dataclasses.replace(obj, **{path[0]: _replace(getattr(obj, path[0]), path[1:], value)})


def _paths(obj, prefix=()):
    """Every field path of a (nested) message dataclass."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        yield prefix + (f.name,)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            yield from _paths(value, prefix + (f.name,))


@st.composite
def broken(draw, base=messages):
    """A message with one field (at any depth) replaced by a value that may not fit."""
    message = draw(base)
    path = draw(st.sampled_from(list(_paths(message))))
    value = draw(st.sampled_from(BAD_VALUES))
    try:
        return _replace(message, path, value)
    except (TypeError, ValueError):
        return message


# --- the derivation ------------------------------------------------------------------------------


def test_layouts_are_derived_from_the_schemas():
    """The struct formats come from walking the construct schemas, and their sizes
    are construct's."""
    assert fastcodec.derive(fuse.ReadIn).fmt == "QQLLQL4x"
    assert fastcodec.derive(fuse.ReadIn).size == 40
    assert fastcodec.derive(fuse.FuseInHeader).fmt == "LLQQLLLHH"
    assert fastcodec.derive(fuse.FuseInHeader).size == fuse.FuseInHeader.sizeof()
    assert fastcodec.derive(fuse.NotifyInvalInodeOut).fmt == "Qqq"
    entry = fastcodec.derive(fuse.EntryOut)
    assert entry.size == fuse.EntryOut.sizeof() == 128
    assert entry.fields[6:8] == ("attr.ino", "attr.size")
    assert entry.offsets[6] == 40
    write = fastcodec.derive(fuse.WriteIn)
    assert (write.tail, write.tail_field, write.size) == ("greedy", "data", fuse.WRITE_IN_SIZE)
    lookup = fastcodec.derive(fuse.LookupIn)
    assert (lookup.tail, lookup.tail_field, lookup.terminated, lookup.size) == ("name", "name",
                                                                                True, 0)
    for schema in (fuse.FuseAttr, fuse.AttrOut, fuse.OpenOut, fuse.WriteOut, fuse.FuseOutHeader,
                   wire.FrameHeader, wire.LeaseTrailer):
        layout = fastcodec.derive(schema)
        assert layout.size == schema.sizeof() == struct.calcsize("<" + layout.fmt)
    assert fastcodec.FRAME_HEADER.size == wire.HEADER_SIZE
    with pytest.raises(fastcodec.UnsupportedSchema):
        fastcodec.derive(wire.HelloPayload)  # PascalString: left to the reference


def test_every_hot_message_has_a_fast_path():
    assert set(fastcodec.HOT_REQUESTS) == {Opcode.READ, Opcode.WRITE, Opcode.LOOKUP,
                                           Opcode.GETATTR, Opcode.OPEN, Opcode.RELEASE,
                                           Opcode.FLUSH, Opcode.FSYNC}
    assert set(fastcodec.HOT_NO_REPLY_REQUESTS) == {Opcode.FORGET}
    ref, fast = assert_encode_agrees(FsRequest(5, 4242, Forget(3)))
    assert fast is not None and fast[4] == 0x1  # flags: no NEED_REPLY
    attr = Attr(*range(1, 16))
    samples = [FsReply(1, 0, ReadOut(b"x" * 4096)), FsReply(1, -errno.ENOENT),
               FsReply(1, 0, EntryOut(1, 2, 3, 4, 5, 6, attr)), FsReply(1, 0, AttrOut(1, 2, attr)),
               FsReply(1, 0, OpenOut(1)), FsReply(1, 0, WriteOut(1)), FsReply(1, 0, EmptyOut()),
               Invalidate(1, 2, 0, 0, 3), Heartbeat(1)]
    for message in samples:
        assert fastcodec.encode_frame(message) is not None, message
    assert fastcodec.encode_ack_frame(Ack(1), wire.Request.INVALIDATE) is not None


# --- encoding ------------------------------------------------------------------------------------


@SETTINGS
@given(messages)
def test_encode_agrees_on_valid_messages(message):
    ref, fast = assert_encode_agrees(message)
    assert ref[0] == "ok"
    if is_hot(message):
        assert fast is not None, f"no fast path for {message}"


@SETTINGS
@given(acks)
def test_encode_agrees_on_acks(pair):
    ack, code = pair
    ref, fast = assert_encode_agrees(ack, code)
    assert ref[0] == "ok" and fast is not None


@SETTINGS
@given(st.one_of(broken(), broken(hot_requests), broken(replies().map(lambda p: p[1])),
                 broken(invalidates), broken(heartbeats)))
def test_encode_agrees_on_fields_that_do_not_fit(message):
    # Whatever the reference raises (LocalProtocolError for a value that does not fit
    # the wire; a few Python errors for values of no sensible type), the fast path too.
    assert_encode_agrees(message)


@SETTINGS
@given(name=st.one_of(st.binary(max_size=12), st.text(max_size=4), st.builds(bytearray,
                                                                          st.binary(max_size=4))),
       unique=u64)
def test_encode_agrees_on_names(name, unique):
    """Names must be bytes without NUL (codec._check_names), in every request that has one."""
    for op in (Lookup(name), Mkdir(name), Unlink(name), Rmdir(name), Rename(1, name, b"n"),
               Rename(1, b"o", name), Create(name, 0)):
        ref, fast = assert_encode_agrees(FsRequest(unique, 1, op))
        if isinstance(op, Lookup):
            assert ref[0] == "ok" if isinstance(name, (bytes, bytearray)) and 0 not in name \
                else ref == ("raise", LocalProtocolError)
    assert_encode_agrees(InvalEntry(unique, 1, name, 1))


@SETTINGS
@given(replies(), st.integers(-5000, 5000), st.booleans())
def test_encode_agrees_on_any_errno(pair, error, keep_body):
    """Error replies: only -4095..-1 with no body; success replies carry their body."""
    _, message = pair
    body = message.body if keep_body else EmptyOut()
    assert_encode_agrees(FsReply(message.unique, error, body, message.lease))


@SETTINGS
@given(st.builds(Ack, seq=st.sampled_from(BAD_VALUES)), st.sampled_from(ACK_CODES))
def test_encode_agrees_on_bad_acks(ack, code):
    assert_encode_agrees(ack, code)


# --- decoding ---------------------------------------------------------------------------------


def _reply_opcode_for(opcode):
    return lambda unique: opcode


@SETTINGS
@given(messages)
def test_decode_agrees_on_valid_frames(message):
    request, flags, payload = split(ref_frame(message))
    reply_opcode = _reply_opcode_for(None)
    ref = assert_decode_agrees(request, flags, payload, reply_opcode)
    if isinstance(message, FsReply):
        return  # decoded without knowing its opcode: see the next test
    assert ref == ("ok", message)
    if is_hot(message):
        got = fastcodec.decode(request, flags, payload, 0, len(payload), reply_opcode)
        assert got == message


@SETTINGS
@given(replies())
def test_decode_agrees_on_valid_replies(pair):
    opcode, message = pair
    request, flags, payload = split(ref_frame(message))
    reply_opcode = {message.unique: opcode}.get
    ref = assert_decode_agrees(request, flags, payload, reply_opcode)
    assert ref == ("ok", message)
    if is_hot(message):
        got = fastcodec.decode(request, flags, payload, 0, len(payload), reply_opcode)
        assert got == message
    # a reply to nothing outstanding
    assert assert_decode_agrees(request, flags, payload, lambda unique: None)[0] == "raise"


@SETTINGS
@given(acks)
def test_decode_agrees_on_acks(pair):
    ack, code = pair
    request, flags, payload = split(ref_frame(ack, code))
    assert assert_decode_agrees(request, flags, payload, lambda u: None) == ("ok", ack)
    assert fastcodec.decode(request, flags, payload, 0, len(payload), lambda u: None) == ack


opcodes_for_replies = st.sampled_from([None] + list(codec.REPLY_BODIES) + [Opcode.FORGET])


@SETTINGS
@given(request=st.integers(0, 6), flags=st.sampled_from([0x0, 0x1, 0x5, 0x9, 0xD, 0x15, 0x4]),
       payload=st.binary(max_size=300), opcode=opcodes_for_replies)
def test_decode_agrees_on_random_payloads(request, flags, payload, opcode):
    assert_decode_agrees(request, flags, payload, _reply_opcode_for(opcode))


@st.composite
def plausible_payloads(draw):
    """Random payloads shaped like hot frames: the right length fields, random contents."""
    kind = draw(st.sampled_from(["request", "reply", "notify", "seq"]))
    if kind == "request":
        opcode = draw(st.sampled_from(HOT_OPCODES + [Opcode.FORGET, Opcode.SETATTR, 26, 0, 999]))
        body = draw(st.binary(max_size=64))
        if draw(st.booleans()):
            body += b"\x00"
        length = draw(st.sampled_from([40 + len(body), 40 + len(body), 0, 40, 40 + len(body) + 1]))
        extlen = draw(st.sampled_from([0, 0, 0, 1, 0xFFFF]))
        header = struct.pack("<IIQQIIIHH", length, opcode, draw(u64), draw(u64), 0, 0, 0, extlen,
                             draw(st.integers(0, 0xFFFF)))
        return 2, draw(st.sampled_from([0x9, 0x9, 0x1, 0x5])), header + body
    if kind == "reply":
        body = draw(st.binary(max_size=160))
        length = draw(st.sampled_from([16 + len(body), 16 + len(body), 16, 0]))
        error = draw(st.sampled_from([0, 0, -2, -4095, -4096, 1, -(1 << 31)]))
        trailer = draw(st.binary(min_size=24, max_size=24))
        return 2, 0x5, struct.pack("<IiQ", length, error, draw(u64)) + body + trailer
    if kind == "notify":
        request = draw(st.sampled_from([3, 4]))
        rest = draw(st.binary(min_size=0, max_size=60))
        length = draw(st.sampled_from([40, 16 + len(rest) - 16, 16, 0]))
        code = draw(st.sampled_from([2, 3, 1, 0]))
        unique = draw(st.sampled_from([0, 0, 1]))
        return request, draw(st.sampled_from([0x9, 0x5])), struct.pack(
            "<IiQ", length, code, unique) + rest
    return (draw(st.sampled_from([3, 4, 5, 1])), draw(st.sampled_from([0x9, 0x5, 0x1])),
            draw(st.binary(min_size=0, max_size=12)))


@SETTINGS
@given(plausible_payloads(), opcodes_for_replies)
def test_decode_agrees_on_plausible_payloads(frame, opcode):
    request, flags, payload = frame
    assert_decode_agrees(request, flags, payload, _reply_opcode_for(opcode))


def _fs_payload(opcode: int, body: bytes, *, length: int | None = None, extlen: int = 0) -> bytes:
    total = 40 + len(body) if length is None else length
    return struct.pack("<IIQQIIIHH", total, opcode, 1, 1, 0, 0, 0, extlen, 0) + body


@SETTINGS
@given(name=st.binary(max_size=12), end=st.sampled_from([b"", b"\x00", b"\x00\x00", b"\x00x"]),
       nuls=st.lists(st.integers(0, 12), max_size=2))
def test_decode_agrees_on_names(name, end, nuls):
    """LOOKUP: the name is everything up to the one NUL, which must be the last byte."""
    raw = bytearray(name)
    for i in nuls:
        raw.insert(min(i, len(raw)), 0)
    body = bytes(raw) + end
    ref = assert_decode_agrees(2, 0x9, _fs_payload(Opcode.LOOKUP, body), lambda u: None)
    assert (ref[0] == "ok") == (body.endswith(b"\x00") and body.count(0) == 1)


@SETTINGS
@given(data=st.binary(max_size=40), delta=st.sampled_from([0, 0, 1, -1, 40, -40, 1 << 31]),
       fixed=st.binary(min_size=40, max_size=40))
def test_decode_agrees_on_write_sizes(data, delta, fixed):
    """WRITE: fuse_write_in.size must be the length of the data that follows."""
    body = bytearray(fixed)
    body[16:20] = struct.pack("<I", max(0, len(data) + delta) & 0xFFFFFFFF)
    ref = assert_decode_agrees(2, 0x9, _fs_payload(Opcode.WRITE, bytes(body) + data),
                               lambda u: None)
    assert (ref[0] == "ok") == (delta == 0 or max(0, len(data) + delta) == len(data))


@st.composite
def mutated(draw):
    """A valid hot frame's payload, mutated."""
    if draw(st.booleans()):
        opcode, message = draw(replies())
    else:
        message = draw(st.one_of(hot_requests, invalidates, heartbeats))
        opcode = None
    request, flags, payload = split(ref_frame(message))
    raw = bytearray(payload)
    for _ in range(draw(st.integers(1, 3))):
        what = draw(st.sampled_from(["flip", "byte", "truncate", "extend", "delete", "u32",
                                     "flags"]))
        i = draw(st.integers(0, max(0, len(raw) - 1)))
        if what == "flip" and raw:
            raw[i] ^= 1 << draw(st.integers(0, 7))
        elif what == "byte" and raw:
            raw[i] = draw(st.integers(0, 255))
        elif what == "truncate":
            del raw[i:]
        elif what == "extend":
            raw += draw(st.binary(min_size=1, max_size=9))
        elif what == "delete":
            del raw[i: i + draw(st.integers(1, 8))]
        elif what == "u32":
            j = draw(st.sampled_from([0, 4, 8, 16, 20, 32, 36, 40, 48]))
            if j + 4 <= len(raw):
                raw[j: j + 4] = struct.pack("<I", draw(st.sampled_from(
                    [0, 1, 2, 3, 15, 16, 40, 56, 80, len(raw), max(0, len(raw) - 24), 0xFFFFFFFF])))
        else:
            flags = draw(st.sampled_from([0x1, 0x5, 0x9, 0xD]))
    unique_opcode = draw(st.sampled_from([opcode, None, Opcode.READ, Opcode.LOOKUP]))
    return request, flags, bytes(raw), unique_opcode


@SETTINGS
@given(mutated())
def test_decode_agrees_on_mutated_frames(case):
    request, flags, payload, opcode = case
    assert_decode_agrees(request, flags, payload, _reply_opcode_for(opcode))


HOT_SAMPLES = [
    FsRequest(7, 3, Read(1, 4096, 4096)), FsRequest(8, 3, Lookup(b"name")),
    FsRequest(9, 3, Write(1, 0, b"data" * 10)), FsRequest(10, 3, Getattr()),
    FsRequest(11, 3, Open(2)), FsRequest(12, 3, Release(2)), FsRequest(13, 3, Flush(2)),
    FsRequest(14, 3, Fsync(2)),
    Invalidate(3, 5, 0, -1, 2), Heartbeat(11), HeartbeatReply(11),
]
REPLY_SAMPLES = [
    (Opcode.READ, FsReply(9, 0, ReadOut(b"y" * 100), LeaseGrant(5, 2, 1000, 1))),
    (Opcode.READ, FsReply(9, -errno.EIO)),
    (Opcode.WRITE, FsReply(9, 0, WriteOut(4096), LeaseGrant(5, 2, 1000, 3))),
    (Opcode.LOOKUP, FsReply(9, 0, EntryOut(1, 2, 3, 4, 5, 6, Attr(*range(1, 16))))),
    (Opcode.GETATTR, FsReply(9, 0, AttrOut(1, 2, Attr(*range(1, 16))))),
    (Opcode.OPEN, FsReply(9, 0, OpenOut(4, 1, -1))),
    (Opcode.RELEASE, FsReply(9, 0, EmptyOut())),
]


@pytest.mark.parametrize("index", range(len(HOT_SAMPLES) + len(REPLY_SAMPLES)))
def test_every_truncation_is_refused_by_both(index):
    """Compiled construct alone accepts some truncated frames; neither path here does."""
    if index < len(HOT_SAMPLES):
        message, opcode = HOT_SAMPLES[index], None
    else:
        opcode, message = REPLY_SAMPLES[index - len(HOT_SAMPLES)]
    request, flags, payload = split(ref_frame(message))
    reply_opcode = _reply_opcode_for(opcode)
    assert assert_decode_agrees(request, flags, payload, reply_opcode) == ("ok", message)
    for cut in range(len(payload)):
        ref = assert_decode_agrees(request, flags, payload[:cut], reply_opcode)
        assert ref[0] == "raise", (message, cut)
        assert fastcodec.decode(request, flags, payload[:cut], 0, cut, reply_opcode) is None
    # and one byte too many
    assert assert_decode_agrees(request, flags, payload + b"\x00", reply_opcode)[0] == "raise"


# --- each guard of the fast path, deterministically -----------------------------------------


@pytest.mark.parametrize("field,value", [("len", 41), ("len", 56), ("len", 0), ("error", 3),
                                         ("error", -2), ("unique", 1), ("unique", 1 << 63)])
def test_decode_agrees_on_bad_invalidate_headers(field, value):
    """An INVALIDATE must have len 40, notify code 2 and unique 0 in its fuse_out_header."""
    request, flags, payload = split(ref_frame(Invalidate(3, 5, 0, -1, 2)))
    header = dict(zip(("len", "error", "unique"), struct.unpack_from("<IiQ", payload)))
    header[field] = value
    bad = struct.pack("<IiQ", header["len"], header["error"], header["unique"]) + payload[16:]
    assert assert_decode_agrees(request, flags, bad, lambda u: None)[0] == "raise"


@pytest.mark.parametrize("message", [m for m in HOT_SAMPLES if isinstance(m, FsRequest)],
                         ids=lambda m: m.op.opcode.name)
@pytest.mark.parametrize("extra", [1, 4, 8])
def test_decode_agrees_on_trailing_bytes(message, extra):
    """A request with bytes after its body (its len counting them) is malformed, except
    after WRITE's data, whose size then disagrees."""
    request, flags, payload = split(ref_frame(message))
    longer = bytearray(payload + b"\x07" * extra)
    longer[0:4] = struct.pack("<I", len(longer))
    assert assert_decode_agrees(request, flags, bytes(longer), lambda u: None)[0] == "raise"


@pytest.mark.parametrize("error", [0, -1, -2, -4095, -4096, 1, 2, 4095, 1 << 31, -(1 << 31)])
@pytest.mark.parametrize("body", [EmptyOut(), WriteOut(1), ReadOut(b"x")], ids=type)
def test_encode_agrees_on_errno_boundaries(error, body):
    ref, fast = assert_encode_agrees(FsReply(9, error, body))
    assert (ref[0] == "ok") == (error == 0 or (-4095 <= error < 0 and body == EmptyOut()))


def test_encode_agrees_when_attr_is_not_an_attr():
    """codec._attr_dict needs a dataclass: an attr-like object is the reference's call."""
    import types

    attr = Attr(*range(1, 16))
    fake = types.SimpleNamespace(**dataclasses.asdict(attr))
    for body in (EntryOut(1, 2, 3, 4, 5, 6, fake), AttrOut(1, 2, fake)):
        ref, fast = assert_encode_agrees(FsReply(9, 0, body))
        assert fast is None and ref[0] == "raise"


@pytest.mark.parametrize("data", [bytearray(b"abc"), memoryview(b"abc"), 5, [1, 2], "str", None])
def test_encode_agrees_on_read_data_that_is_not_bytes(data):
    """The reference sends bytes(data) of whatever ReadOut.data holds; the fast path only
    handles bytes and leaves the rest to it."""
    ref, fast = assert_encode_agrees(FsReply(9, 0, ReadOut(data)))
    assert fast is None


# --- two Connections, fast and reference, fed the same bytes ------------------------------------


def _ready(role: Role, fast: bool) -> Connection:
    saved = connection.FAST_CODEC
    connection.FAST_CODEC = fast
    try:
        conn = test_connection.ready(role)
    finally:
        connection.FAST_CODEC = saved
    assert conn.fast_codec is fast
    return conn


def _events(conn: Connection, chunks: list[bytes], eof: bool) -> list:
    """Everything the connection does with `chunks`: events, errors (type and text) and
    the state after each chunk."""
    out = []
    try:
        for chunk in chunks:
            conn.receive_data(chunk)
            for _ in range(10_000):
                try:
                    event = conn.next_event()
                except codec.UnsupportedOpcode as exc:
                    out.append(("unsupported", exc.unique, exc.opcode, exc.needs_reply,
                                str(exc)))
                    if exc.needs_reply:  # else nothing is outstanding (issue 13, item 8)
                        conn.send(FsReply(exc.unique, -errno.ENOSYS))
                    continue
                out.append(event)
                if event is NEED_DATA or isinstance(event, ConnectionClosed):
                    break
            out.append(conn.state)
        if eof:
            conn.receive_data(b"")
            out.append(conn.next_event())
    except RemoteProtocolError as exc:
        out.append((type(exc), str(exc)))
    out.append((conn.state, conn.outstanding_requests, conn.outstanding_invalidations))
    return out


def _chunks(raw: bytes, seed: int) -> list[bytes]:
    rnd = random.Random(seed)
    out, i = [], 0
    while i < len(raw):
        n = rnd.choice([1, 3, 12, 40, 100, 5000])
        out.append(raw[i: i + n])
        i += n
    return out


@pytest.mark.parametrize("role", list(Role), ids=lambda r: r.value)
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), eof=st.booleans(), seed=st.integers(0, 2**32), whole=st.booleans())
def test_fast_and_reference_connections_agree(role, data, eof, seed, whole):
    raw = data.draw(test_connection.mutated_streams(role))
    chunks = [raw] if whole else _chunks(raw, seed)
    fast = _events(_ready(role, True), chunks, eof)
    ref = _events(_ready(role, False), chunks, eof)
    assert fast == ref


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "reference"])
def test_scripted_conversation_in_both_modes(fast, monkeypatch):
    """tests/test_connection.py's conversation, whole and byte at a time, with the
    module switch set either way."""
    monkeypatch.setattr(connection, "FAST_CODEC", fast)
    assert Connection(Role.GUEST).fast_codec is fast
    test_connection.test_many_frames_in_one_chunk()
    test_connection.test_byte_at_a_time()
    test_connection.test_truncated_frames_at_eof()
    test_connection.test_frame_of_exactly_max_frame_is_buffered()


def test_conversation_bytes_are_identical():
    """Both settings send the very same bytes for the scripted conversation."""
    to_host, to_guest = test_connection.conversation()
    sent = {}
    for fast in (True, False):
        guest = Connection(Role.GUEST, fast_codec=fast)
        host = Connection(Role.HOST, fast_codec=fast)
        frames = []
        for sender, receiver, batch in ((guest, host, to_host[:1]), (host, guest, to_guest[:1]),
                                        (guest, host, to_host[1:6]), (host, guest, to_guest[1:3]),
                                        (guest, host, to_host[6:]), (host, guest, to_guest[3:])):
            for message in batch:
                frames.append(sender.send(message))
                receiver.receive_data(frames[-1])
                assert receiver.next_event() == message
        sent[fast] = frames
    assert sent[True] == sent[False]


def test_a_reused_buffer_is_copied_when_received():
    """A received bytes chunk is kept without a copy; a bytearray or memoryview the
    caller may reuse is copied before receive_data returns."""
    for fast in (True, False):
        guest, host = test_connection.pair()
        host.fast_codec = fast
        frame = guest.send(Heartbeat(1))
        buf = bytearray(frame)
        host.receive_data(memoryview(buf)[:5])
        buf[:] = b"\xff" * len(buf)
        host.receive_data(frame[5:])
        assert host.next_event() == Heartbeat(1)
        buf = bytearray(guest.send(Heartbeat(2)))
        host.receive_data(buf)
        buf[:] = b"\xff" * len(buf)
        assert host.next_event() == Heartbeat(2)
        assert host.next_event() is NEED_DATA


def test_construct_is_the_reference():
    """Sanity: the reference really is construct, and refuses what the fast path refuses."""
    with pytest.raises(ConstructError):
        fuse.ReadIn.parse(bytes(39))
    with pytest.raises(RemoteProtocolError):
        codec.decode_payload(2, 0x9, bytes(fastcodec.IN_HEADER.size), lambda u: None)


@pytest.mark.parametrize("flags", [0x9, 0x1])
@pytest.mark.parametrize("opcode,len_delta,extlen", [(9999, 0, 0), (26, 0, 0), (0, 0, 0),
                                                     (9999, 1, 0), (9999, -1, 0), (9999, 0, 1),
                                                     (int(Opcode.FORGET), 0, 0)])
def test_unknown_opcodes_agree_fast_and_reference(flags, opcode, len_delta, extlen):
    """The fast path's shortcut for unknown opcodes (issue 13: a flood of them cost a
    construct parse and its exception each) raises exactly what the reference does,
    NEED_REPLY or not, and leaves every malformed header to the reference."""
    body = b"\0" * 8
    header = struct.pack("<IIQQIIIHH", 40 + len(body) + len_delta, opcode, 77, 1, 0, 0, 0,
                         extlen, 0)
    raw = struct.pack("<III", 2, flags, 40 + len(body)) + header + body
    chunks = [raw, raw.replace(struct.pack("<Q", 77), struct.pack("<Q", 78), 1)]
    fast = _events(_ready(Role.HOST, True), chunks, False)
    ref = _events(_ready(Role.HOST, False), chunks, False)
    assert fast == ref
