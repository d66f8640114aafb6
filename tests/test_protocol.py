"""The codec: every message round-trips, the bytes are exactly docs/protocol.md,
and malformed payloads raise RemoteProtocolError naming the field.

Synchronous, no sockets.  The hypothesis strategies at the top are shared with
tests/test_connection.py (which imports them from here).
"""

from __future__ import annotations

import errno
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import codec, control, fuse, wire
from protocol.errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from protocol.fuse import Opcode
from protocol.messages import (
    Granularity,
    Purge,
    Purged,
    Witness,
    WitnessReply,
    LEASE_FIRST_DIRTY,
    LEASE_GRANTED,
    NO_LEASE,
    Ack,
    Attr,
    AttrOut,
    Auth,
    AuthReply,
    BytesOut,
    CopyFileRange,
    Create,
    CreateOut,
    Detector,
    DirEntry,
    DirEntryPlus,
    EmptyOut,
    EntryOut,
    Fallocate,
    Flush,
    Forget,
    Interrupt,
    FsReply,
    FsRequest,
    Fsync,
    Fsyncdir,
    Getattr,
    Getlk,
    Getxattr,
    Heartbeat,
    HeartbeatReply,
    Hello,
    HelloReply,
    InvalEntry,
    Invalidate,
    LeaseGrant,
    LkOut,
    Link,
    Listxattr,
    Lookup,
    Lseek,
    LseekOut,
    Mkdir,
    Mknod,
    Open,
    OpenOut,
    Policy,
    Read,
    Readdir,
    Readdirplus,
    ReaddirOut,
    ReaddirplusOut,
    Readlink,
    ReadOut,
    Release,
    Removexattr,
    Rename,
    Rename2,
    Rmdir,
    Setattr,
    Setlk,
    Setlkw,
    Setxattr,
    Statfs,
    StatfsOut,
    Symlink,
    Unlink,
    Write,
    WriteOut,
)

# --- strategies (shared with test_connection.py) ------------------------------

u8 = st.integers(0, 0xFF)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFF_FFFF)
u64 = st.integers(0, 0xFFFF_FFFF_FFFF_FFFF)
s32 = st.integers(-(1 << 31), (1 << 31) - 1)
s64 = st.integers(-(1 << 63), (1 << 63) - 1)
errnos = st.integers(-4095, -1)

# A path component as FUSE carries it: any bytes but NUL (empty is legal on the wire).
names = st.binary(max_size=40).map(lambda b: b.replace(b"\x00", b"_"))
# A directory entry name: non-empty, no NUL, no slash.
dirent_names = st.binary(min_size=1, max_size=40).map(
    lambda b: b.replace(b"\x00", b"_").replace(b"/", b"_"))
data = st.binary(max_size=300)

attrs = st.builds(
    Attr, ino=u64, size=u64, blocks=u64, atime=u64, mtime=u64, ctime=u64, atimensec=u32,
    mtimensec=u32, ctimensec=u32, mode=u32, nlink=u32, uid=u32, gid=u32, rdev=u32, blksize=u32,
    flags=u32)
entry_outs = st.builds(EntryOut, nodeid=u64, generation=u64, entry_valid=u64, attr_valid=u64,
                       entry_valid_nsec=u32, attr_valid_nsec=u32, attr=attrs)
attr_outs = st.builds(AttrOut, attr_valid=u64, attr_valid_nsec=u32, attr=attrs)
open_outs = st.builds(OpenOut, fh=u64, open_flags=u32, backing_id=s32)
create_outs = st.builds(CreateOut, entry=entry_outs, open=open_outs)
read_outs = st.builds(ReadOut, data=data)
write_outs = st.builds(WriteOut, size=u32)
dir_entries = st.builds(DirEntry, ino=u64, off=u64, type=u32, name=dirent_names)
readdir_outs = st.builds(ReaddirOut, entries=st.lists(dir_entries, max_size=5).map(tuple))
empty_outs = st.just(EmptyOut())
bytes_outs = st.builds(BytesOut, data=data)
statfs_outs = st.builds(StatfsOut, blocks=u64, bfree=u64, bavail=u64, files=u64, ffree=u64,
                        bsize=u32, namelen=u32, frsize=u32)
lseek_outs = st.builds(LseekOut, offset=u64)
lk_outs = st.builds(LkOut, start=u64, end=u64, type=u32, pid=u32)
readdirplus_outs = st.builds(ReaddirplusOut, entries=st.lists(
    st.builds(DirEntryPlus, entry=entry_outs, dirent=dir_entries), max_size=3).map(tuple))

REPLY_BODY_STRATEGIES = {
    EntryOut: entry_outs, AttrOut: attr_outs, OpenOut: open_outs, CreateOut: create_outs,
    ReadOut: read_outs, WriteOut: write_outs, ReaddirOut: readdir_outs, EmptyOut: empty_outs,
    BytesOut: bytes_outs, StatfsOut: statfs_outs, LseekOut: lseek_outs,
    ReaddirplusOut: readdirplus_outs, LkOut: lk_outs,
}

_read_fields = dict(fh=u64, offset=u64, size=u32, read_flags=u32, lock_owner=u64, flags=u32)
OP_STRATEGIES = {
    Opcode.LOOKUP: st.builds(Lookup, name=names),
    Opcode.FORGET: st.builds(Forget, nlookup=u64),
    Opcode.INTERRUPT: st.builds(Interrupt, unique=u64),
    Opcode.GETATTR: st.builds(Getattr, fh=u64, getattr_flags=u32),
    Opcode.SETATTR: st.builds(
        Setattr, valid=u32, fh=u64, size=u64, atime=u64, mtime=u64, ctime=u64, atimensec=u32,
        mtimensec=u32, ctimensec=u32, mode=u32, uid=u32, gid=u32, lock_owner=u64),
    Opcode.MKDIR: st.builds(Mkdir, name=names, mode=u32, umask=u32),
    Opcode.UNLINK: st.builds(Unlink, name=names),
    Opcode.RMDIR: st.builds(Rmdir, name=names),
    Opcode.RENAME: st.builds(Rename, newdir=u64, oldname=names, newname=names),
    Opcode.OPEN: st.builds(Open, flags=u32, open_flags=u32),
    Opcode.READ: st.builds(Read, **_read_fields),
    Opcode.WRITE: st.builds(Write, fh=u64, offset=u64, data=data, write_flags=u32,
                            lock_owner=u64, flags=u32),
    Opcode.RELEASE: st.builds(Release, fh=u64, flags=u32, release_flags=u32, lock_owner=u64),
    Opcode.FSYNC: st.builds(Fsync, fh=u64, fsync_flags=u32),
    Opcode.FLUSH: st.builds(Flush, fh=u64, lock_owner=u64),
    Opcode.CREATE: st.builds(Create, name=names, flags=u32, mode=u32, umask=u32, open_flags=u32),
    Opcode.READDIR: st.builds(Readdir, **_read_fields),
    Opcode.READDIRPLUS: st.builds(Readdirplus, **_read_fields),
    **{op: st.builds(cls, fh=u64, owner=u64, start=u64, end=u64, type=u32, pid=u32,
                     lk_flags=u32)
       for op, cls in ((Opcode.GETLK, Getlk), (Opcode.SETLK, Setlk), (Opcode.SETLKW, Setlkw))},
    Opcode.READLINK: st.builds(Readlink),
    Opcode.SYMLINK: st.builds(Symlink, name=names, target=names),
    Opcode.MKNOD: st.builds(Mknod, name=names, mode=u32, rdev=u32, umask=u32),
    Opcode.LINK: st.builds(Link, oldnodeid=u64, newname=names),
    Opcode.STATFS: st.builds(Statfs),
    Opcode.SETXATTR: st.builds(Setxattr, name=names, value=data, flags=u32),
    Opcode.GETXATTR: st.builds(Getxattr, name=names, size=u32),
    Opcode.LISTXATTR: st.builds(Listxattr, size=u32),
    Opcode.REMOVEXATTR: st.builds(Removexattr, name=names),
    Opcode.FSYNCDIR: st.builds(Fsyncdir, fh=u64, fsync_flags=u32),
    Opcode.FALLOCATE: st.builds(Fallocate, fh=u64, offset=u64, length=u64, mode=u32),
    Opcode.RENAME2: st.builds(Rename2, newdir=u64, oldname=names, newname=names, flags=u32),
    Opcode.LSEEK: st.builds(Lseek, fh=u64, offset=u64, whence=u32),
    Opcode.COPY_FILE_RANGE: st.builds(CopyFileRange, fh_in=u64, off_in=u64, nodeid_out=u64,
                                      fh_out=u64, off_out=u64, len=u64, flags=u64),
}
fs_ops = st.one_of(*OP_STRATEGIES.values())
leases = st.builds(LeaseGrant, ino=u64, generation=u64, term_ms=u32, flags=u32)


groups = st.one_of(st.just(()), st.lists(u32, max_size=9).map(tuple))


def fs_requests(ops=fs_ops):
    return st.builds(FsRequest, unique=u64, nodeid=u64, op=ops, uid=u32, gid=u32, pid=u32,
                     groups=groups)


def reply_bodies(opcode: Opcode):
    return REPLY_BODY_STRATEGIES[codec.REPLY_BODIES[opcode]]


def fs_replies(opcode: Opcode, unique: int):
    """A success reply with the body type of `opcode`, or an errno reply."""
    ok = st.builds(FsReply, unique=st.just(unique), error=st.just(0), body=reply_bodies(opcode),
                   lease=leases)
    err = st.builds(FsReply, unique=st.just(unique), error=errnos, body=empty_outs, lease=leases)
    return st.one_of(ok, err)


hello_names = st.text(st.characters(codec="utf-8"), max_size=60).filter(
    lambda s: len(s.encode()) <= 255)
hellos = st.builds(Hello, version=u32, features=u64, max_frame=u32, name=hello_names)


def hello_replies(max_frames=st.integers(wire.MIN_MAX_FRAME, wire.ABSOLUTE_MAX_FRAME)):
    return st.builds(HelloReply, error=st.one_of(st.just(0), errnos), version=u32, features=u64,
                     policy=st.sampled_from(Policy), detector=st.sampled_from(Detector),
                     lease_term_ms=u32, ttl_ms=u32, max_frame=max_frames, guest_id=u32,
                     boot_id=st.binary(min_size=16, max_size=16),
                     nonce=st.binary(min_size=16, max_size=16))


auths = st.builds(Auth, nonce=st.binary(min_size=16, max_size=16),
                  proof=st.binary(min_size=32, max_size=32))
auth_replies = st.builds(AuthReply, error=st.one_of(st.just(0), errnos),
                         proof=st.binary(min_size=32, max_size=32))


invalidates = st.builds(Invalidate, seq=u64, ino=u64, offset=s64, length=s64, generation=u64)
inval_entries = st.builds(InvalEntry, seq=u64, parent=u64, name=names, generation=u64, flags=u32)


# --- helpers ---------------------------------------------------------------------


def frame(request: int, flags: int, payload: bytes, size: int | None = None) -> bytes:
    return struct.pack("<III", request, flags, len(payload) if size is None else size) + payload


def encode(message) -> bytes:
    """The whole frame for `message`, as the codec builds it."""
    code, flags, payload = codec.encode_payload(message)
    return codec.encode_header(code, flags, len(payload)) + payload


def decode(frame_bytes: bytes, reply_opcode=lambda unique: None):
    request, flags, size = codec.decode_header(frame_bytes[:12])
    assert size == len(frame_bytes) - 12
    return codec.decode_payload(request, flags, frame_bytes[12:], reply_opcode)


def in_header(opcode: int, body_len: int, *, unique: int = 1, nodeid: int = 1,
              length: int | None = None, extlen: int = 0) -> bytes:
    total = 40 + body_len if length is None else length
    return struct.pack("<IIQQIIIHH", total, opcode, unique, nodeid, 0, 0, 0, extlen, 0)


def fs_frame(opcode: int, body: bytes, *, flags: int = 0x9, **kw) -> bytes:
    return frame(2, flags, in_header(opcode, len(body), **kw) + body)


def out_frame(unique: int, error: int, body: bytes, *, length: int | None = None,
              trailer: bytes = bytes(24)) -> bytes:
    total = 16 + len(body) if length is None else length
    return frame(2, 0x5, struct.pack("<IiQ", total, error, unique) + body + trailer)


# --- coverage of the strategies ---------------------------------------------------


def test_strategies_cover_every_opcode_and_reply_body():
    assert set(OP_STRATEGIES) == set(codec.REQUEST_BODIES)
    assert set(REPLY_BODY_STRATEGIES) == set(codec.REPLY_BODIES.values())


# --- round trips (codec level) ----------------------------------------------------


@given(hellos)
def test_hello_round_trip(msg):
    assert decode(encode(msg)) == msg


@given(hello_replies(max_frames=u32))
def test_hello_reply_round_trip(msg):
    assert decode(encode(msg)) == msg


@given(auths, auth_replies)
def test_auth_round_trip(request, reply):
    assert decode(encode(request)) == request
    assert decode(encode(reply)) == reply


@pytest.mark.parametrize("opcode", list(OP_STRATEGIES), ids=lambda o: o.name)
@settings(max_examples=25)
@given(data=st.data())
def test_fs_request_round_trip(opcode, data):
    msg = data.draw(fs_requests(OP_STRATEGIES[opcode]))
    raw = encode(msg)
    assert decode(raw) == msg
    flags = struct.unpack_from("<I", raw, 4)[0]
    assert flags == (1 | (0 if opcode in (Opcode.FORGET, Opcode.INTERRUPT) else 8))


@pytest.mark.parametrize("opcode", list(codec.REPLY_BODIES), ids=lambda o: o.name)
@settings(max_examples=25)
@given(data=st.data())
def test_fs_reply_round_trip(opcode, data):
    unique = data.draw(u64)
    msg = data.draw(fs_replies(opcode, unique))
    assert decode(encode(msg), {unique: opcode}.get) == msg


@given(invalidates)
def test_invalidate_round_trip(msg):
    assert decode(encode(msg)) == msg


@given(inval_entries)
def test_inval_entry_round_trip(msg):
    assert decode(encode(msg)) == msg


@given(u64, st.sampled_from([wire.Request.INVALIDATE, wire.Request.INVAL_ENTRY]))
def test_ack_round_trip(seq, request):
    code, flags, payload = codec.encode_ack(Ack(seq), request)
    assert (code, flags) == (request, 1 | 4)
    assert codec.decode_payload(code, flags, payload, lambda u: None) == Ack(seq)


@given(u64)
def test_heartbeat_round_trip(seq):
    assert decode(encode(Heartbeat(seq))) == Heartbeat(seq)
    assert decode(encode(HeartbeatReply(seq))) == HeartbeatReply(seq)


# --- golden bytes: these pin docs/protocol.md ---------------------------------------

BOOT = bytes(range(16))


def h(text: str) -> bytes:
    return bytes.fromhex(text)


def test_golden_frame_header_constants():
    assert wire.HEADER_SIZE == 12
    assert fuse.FUSE_IN_HEADER_SIZE == 40
    assert fuse.FUSE_OUT_HEADER_SIZE == 16
    assert wire.LEASE_TRAILER_SIZE == 24 == wire.LeaseTrailer.sizeof()
    assert wire.NOTIFY_TRAILER_SIZE == 16
    assert wire.DEFAULT_MAX_FRAME == 1 << 20
    assert wire.ABSOLUTE_MAX_FRAME == 16 << 20
    assert wire.MIN_MAX_FRAME == 8192
    assert (wire.FLAG_VERSION_MASK, wire.FLAG_REPLY, wire.FLAG_NEED_REPLY) == (3, 4, 8)
    assert (wire.FEATURE_LEASES, wire.FEATURE_HEARTBEAT, wire.FEATURE_AUTH) == (1, 2, 4)
    assert [int(r) for r in wire.Request] == [1, 2, 3, 4, 5, 6, 7, 8, 9]
    assert (wire.FEATURE_CACHES_UNLEASED, wire.FEATURE_WITNESS) == (8, 16)
    assert (wire.NONCE_SIZE, wire.PROOF_SIZE) == (16, 32)
    assert (LEASE_GRANTED, LEASE_FIRST_DIRTY) == (1, 2)
    assert (int(fuse.NotifyCode.INVAL_INODE), int(fuse.NotifyCode.INVAL_ENTRY)) == (2, 3)


def test_golden_hello():
    msg = Hello(version=1, features=3, max_frame=1 << 20, name="g1", client_id=bytes(range(16)))
    assert encode(msg) == h(
        "01000000 09000000 23000000"  # HELLO, v1|NEED_REPLY, 35 bytes
        "01000000"  # version
        "0300000000000000"  # features: LEASES|HEARTBEAT
        "00001000"  # max_frame 1 MiB
        "000102030405060708090a0b0c0d0e0f"  # client_id
        "02 6731"  # name: u8 length, UTF-8
    )


def test_golden_hello_reply():
    msg = HelloReply(error=0, version=1, features=3, policy=Policy.CLEAN_LEASE,
                     detector=Detector.FANOTIFY, lease_term_ms=1000, ttl_ms=1000,
                     max_frame=65536, guest_id=7, boot_id=BOOT)
    assert encode(msg) == h(
        "01000000 05000000 44000000"  # HELLO, v1|REPLY, 68 bytes
        "00000000"  # error
        "01000000"  # version
        "0300000000000000"  # features
        "04 02 0000"  # policy clean-lease, detector fanotify, reserved
        "e8030000"  # lease_term_ms
        "e8030000"  # ttl_ms
        "00000100"  # max_frame 65536
        "07000000"  # guest_id
        "000102030405060708090a0b0c0d0e0f"  # boot_id
        "00000000000000000000000000000000"  # nonce: none without FEATURE_AUTH
    )


HOST_NONCE = bytes(range(0x10, 0x20))
GUEST_NONCE = bytes(range(0x20, 0x30))
PROOF = bytes(range(0x40, 0x60))


def test_golden_auth_exchange():
    reply = HelloReply(0, 1, 7, Policy.CLEAN_LEASE, Detector.FANOTIFY, 1000, 1000, 65536, 7,
                       BOOT, HOST_NONCE)
    assert encode(reply)[12 + 8:12 + 16] == h("0700000000000000")  # LEASES|HEARTBEAT|AUTH
    assert encode(reply)[-16:] == HOST_NONCE
    assert encode(Auth(GUEST_NONCE, PROOF)) == h(
        "06000000 09000000 30000000"  # AUTH, v1|NEED_REPLY, 48 bytes
        "202122232425262728292a2b2c2d2e2f"  # the guest's nonce
        "404142434445464748494a4b4c4d4e4f505152535455565758595a5b5c5d5e5f"  # its proof
    )
    assert encode(AuthReply(0, PROOF)) == h(
        "06000000 05000000 24000000"  # AUTH, v1|REPLY, 36 bytes
        "00000000"  # error
        "404142434445464748494a4b4c4d4e4f505152535455565758595a5b5c5d5e5f"  # the host's proof
    )
    assert encode(AuthReply(-errno.EACCES)) == h("06000000 05000000 24000000 f3ffffff") + bytes(32)


def test_golden_lookup_request():
    msg = FsRequest(unique=7, nodeid=1, op=Lookup(b"foo"), uid=1000, gid=1000, pid=42)
    assert encode(msg) == h(
        "02000000 09000000 2c000000"  # FS, v1|NEED_REPLY, 44 bytes
        "2c000000 01000000"  # fuse_in_header: len 44, opcode LOOKUP
        "0700000000000000 0100000000000000"  # unique 7, nodeid 1
        "e8030000 e8030000 2a000000"  # uid, gid, pid
        "0000 0000"  # total_extlen, padding
        "666f6f00"  # "foo\0"
    )


def test_golden_write_request():
    msg = FsRequest(unique=8, nodeid=5, op=Write(fh=3, offset=4096, data=b"hi"))
    assert encode(msg) == h(
        "02000000 09000000 52000000"  # FS, 82 bytes
        "52000000 10000000 0800000000000000 0500000000000000"  # len 82, WRITE, unique, nodeid
        "00000000 00000000 00000000 0000 0000"
        "0300000000000000 0010000000000000"  # fh, offset
        "02000000 00000000"  # size 2, write_flags
        "0000000000000000 00000000 00000000"  # lock_owner, flags, padding
        "6869"
    )


def test_golden_symlink_request():
    msg = FsRequest(3, 1, Symlink(b"ln", b"a/b"), uid=1000, gid=1000, pid=42)
    assert encode(msg) == h(
        "02000000 09000000 2f000000"  # FS, NEED_REPLY, 47 bytes
        "2f000000 06000000 0300000000000000 0100000000000000"  # len, SYMLINK, unique, nodeid
        "e8030000 e8030000 2a000000 0000 0000"  # uid, gid, pid, extlen, padding
        "6c6e00"  # the new name
        "612f6200"  # the target
    )
    assert decode(encode(msg)) == msg


def test_golden_request_with_supplementary_groups():
    msg = FsRequest(4, 5, Getattr(), uid=1000, gid=1000, pid=42, groups=(10, 27))
    assert encode(msg) == h(
        "02000000 09000000 50000000"  # FS, 80 bytes
        "50000000 03000000 0400000000000000 0500000000000000"
        "e8030000 e8030000 2a000000 0300 0000"  # total_extlen 3: 24 bytes
        "00000000 00000000 0000000000000000"  # fuse_getattr_in
        "18000000 20000000"  # fuse_ext_header: size 24, FUSE_EXT_GROUPS
        "02000000 0a000000 1b000000 00000000"  # nr_groups 2, 10, 27, pad
    )
    assert decode(encode(msg)) == msg
    # A size that does not match nr_groups, another extension type: malformed.
    body = bytes(16)
    for ext in (h("18000000 20000000 04000000 0a000000 1b000000 00000000"),
                h("10000000 21000000 00000000 00000000")):
        with pytest.raises(RemoteProtocolError, match="extension|supp_groups|ext_header"):
            decode_raw(fs_frame(3, body + ext, extlen=len(ext) // 8))


def test_golden_lseek_reply():
    msg = FsReply(5, 0, LseekOut(8192))
    assert encode(msg) == h(
        "02000000 05000000 30000000"
        "18000000 00000000 0500000000000000"
        "0020000000000000"  # fuse_lseek_out
        + "00" * 24  # NO_LEASE
    )
    assert decode(encode(msg), lambda u: Opcode.LSEEK) == msg


def test_golden_forget_request_needs_no_reply():
    msg = FsRequest(unique=0, nodeid=5, op=Forget(2))
    assert encode(msg) == h(
        "02000000 01000000 30000000"  # FS, v1 only (no NEED_REPLY), 48 bytes
        "30000000 02000000 0000000000000000 0500000000000000"
        "00000000 00000000 00000000 0000 0000"
        "0200000000000000"  # nlookup
    )


def test_golden_write_reply_with_lease_trailer():
    msg = FsReply(unique=9, body=WriteOut(4096),
                  lease=LeaseGrant(ino=5, generation=2, term_ms=1000,
                                   flags=LEASE_GRANTED | LEASE_FIRST_DIRTY))
    raw = encode(msg)
    assert raw == h(
        "02000000 05000000 30000000"  # FS, v1|REPLY, 48 bytes
        "18000000 00000000 0900000000000000"  # fuse_out_header: len 24, error 0, unique 9
        "00100000 00000000"  # fuse_write_out: size 4096, padding
        "0500000000000000 0200000000000000 e8030000 03000000"  # lease trailer
    )
    assert decode(raw, {9: Opcode.WRITE}.get) == msg


def test_golden_error_reply():
    raw = encode(FsReply(unique=9, error=-errno.ENOENT))
    assert raw == h(
        "02000000 05000000 28000000"  # 40 bytes
        "10000000 feffffff 0900000000000000"  # len 16, error -2
        + "00" * 24  # NO_LEASE
    )


def test_golden_open_reply():
    raw = encode(FsReply(unique=1, body=OpenOut(fh=3, open_flags=fuse.FOPEN_KEEP_CACHE)))
    assert raw == h(
        "02000000 05000000 38000000"
        "20000000 00000000 0100000000000000"  # len 32
        "0300000000000000 02000000 00000000"  # fh, open_flags, backing_id
        + "00" * 24
    )


def test_golden_readdir_reply():
    raw = encode(FsReply(unique=1, body=ReaddirOut((DirEntry(ino=9, off=1, type=8, name=b"abc"),))))
    assert raw == h(
        "02000000 05000000 48000000"  # 72 bytes
        "30000000 00000000 0100000000000000"  # len 48 = 16 + one 32-byte dirent
        "0900000000000000 0100000000000000 03000000 08000000"  # ino, off, namelen, type
        "616263 0000000000"  # name, padded to 8
        + "00" * 24
    )


def test_golden_invalidate():
    msg = Invalidate(seq=3, ino=5, offset=0, length=-1, generation=2)
    assert encode(msg) == h(
        "03000000 09000000 38000000"  # INVALIDATE, v1|NEED_REPLY, 56 bytes
        "28000000 02000000 0000000000000000"  # len 40, error=INVAL_INODE, unique 0
        "0500000000000000 0000000000000000 ffffffffffffffff"  # ino, off, len
        "0300000000000000 0200000000000000"  # trailer: seq, generation
    )


def test_golden_inval_entry():
    msg = InvalEntry(seq=4, parent=1, name=b"a.txt", generation=6)
    assert encode(msg) == h(
        "04000000 09000000 36000000"  # INVAL_ENTRY, 54 bytes
        "26000000 03000000 0000000000000000"  # len 38, error=INVAL_ENTRY, unique 0
        "0100000000000000 05000000 00000000"  # parent, namelen, flags
        "612e74787400"  # "a.txt\0"
        "0400000000000000 0600000000000000"  # seq, generation
    )


def test_golden_acks_and_heartbeats():
    code, flags, payload = codec.encode_ack(Ack(3), wire.Request.INVALIDATE)
    assert codec.encode_header(code, flags, len(payload)) + payload == h(
        "03000000 05000000 08000000 0300000000000000")
    code, flags, payload = codec.encode_ack(Ack(4), wire.Request.INVAL_ENTRY)
    assert codec.encode_header(code, flags, len(payload)) + payload == h(
        "04000000 05000000 08000000 0400000000000000")
    assert encode(Heartbeat(11)) == h("05000000 09000000 08000000 0b00000000000000")
    assert encode(HeartbeatReply(11)) == h("05000000 05000000 10000000 0b00000000000000"
                                           "00000000 00000000")
    assert encode(HeartbeatReply(11, -errno.EKEYEXPIRED)) == h(
        "05000000 05000000 10000000 0b00000000000000 81ffffff 00000000")


def test_golden_witness_frames():
    """docs/protocol.md, section 8a, byte by byte."""
    assert encode(Witness(7)) == h("07000000 09000000 04000000 07000000")
    assert encode(WitnessReply(0)) == h("07000000 05000000 04000000 00000000")
    assert encode(WitnessReply(-errno.EACCES)) == h("07000000 05000000 04000000 f3ffffff")
    assert encode(Purge(wire.PURGE_SILENT)) == h("08000000 01000000 04000000 01000000")
    assert encode(Purged(wire.PURGED_ASKED, 5)) == h("09000000 01000000 08000000 01000000"
                                                     "05000000")
    for message in (Witness(7), WitnessReply(-errno.EEXIST), Purge(2), Purged(3, 0)):
        assert decode_raw(encode(message)) == message


@pytest.mark.parametrize("raw,match", [
    (h("08000000 09000000 04000000 01000000"), "one-way"),  # PURGE asking for a reply
    (h("09000000 05000000 08000000 01000000 05000000"), "one-way"),  # PURGED as a reply
    (h("09000000 01000000 04000000 01000000"), "PURGED"),  # too short
    (h("07000000 09000000 05000000 07000000 00"), "WITNESS"),  # trailing byte
])
def test_malformed_witness_frames(raw, match):
    with pytest.raises(RemoteProtocolError, match=match):
        decode_raw(raw)


def test_golden_entry_out_layout():
    attr = Attr(ino=1, size=2, blocks=3, atime=4, mtime=5, ctime=6, atimensec=7, mtimensec=8,
                ctimensec=9, mode=10, nlink=11, uid=12, gid=13, rdev=14, blksize=15, flags=16)
    entry = EntryOut(nodeid=21, generation=22, entry_valid=23, attr_valid=24,
                     entry_valid_nsec=25, attr_valid_nsec=26, attr=attr)
    raw = encode(FsReply(unique=1, body=entry))[12 + 16: -24]
    assert len(raw) == 128
    assert struct.unpack("<QQQQII", raw[:40]) == (21, 22, 23, 24, 25, 26)
    assert struct.unpack("<QQQQQQIIIIIIIIII", raw[40:]) == tuple(range(1, 17))
    raw = encode(FsReply(unique=1, body=AttrOut(attr_valid=5, attr_valid_nsec=6, attr=attr)))
    body = raw[28:-24]
    assert len(body) == 104 and struct.unpack("<QII", body[:16]) == (5, 6, 0)
    assert struct.unpack("<QQQQQQIIIIIIIIII", body[16:]) == tuple(range(1, 17))
    raw = encode(FsReply(unique=1, body=CreateOut(entry, OpenOut(fh=77))))[28:-24]
    assert len(raw) == 144 and struct.unpack("<QIi", raw[128:]) == (77, 0, 0)


def test_golden_request_body_sizes():
    """Fixed body sizes of every opcode (docs/protocol.md, "FS requests")."""
    sizes = {Opcode.FORGET: 8, Opcode.GETATTR: 16, Opcode.SETATTR: 88, Opcode.OPEN: 8,
             Opcode.READ: 40, Opcode.WRITE: 40, Opcode.RELEASE: 24, Opcode.FSYNC: 16,
             Opcode.FLUSH: 24, Opcode.READDIR: 40, Opcode.MKDIR: 8, Opcode.CREATE: 16,
             Opcode.LOOKUP: 0, Opcode.UNLINK: 0, Opcode.RMDIR: 0, Opcode.RENAME: 8}
    examples = {
        Opcode.LOOKUP: Lookup(b""), Opcode.FORGET: Forget(1), Opcode.GETATTR: Getattr(),
        Opcode.SETATTR: Setattr(valid=0), Opcode.MKDIR: Mkdir(b""), Opcode.UNLINK: Unlink(b""),
        Opcode.RMDIR: Rmdir(b""), Opcode.RENAME: Rename(1, b"", b""), Opcode.OPEN: Open(0),
        Opcode.READ: Read(0, 0, 0), Opcode.WRITE: Write(0, 0, b""), Opcode.RELEASE: Release(0),
        Opcode.FSYNC: Fsync(0), Opcode.FLUSH: Flush(0), Opcode.CREATE: Create(b"", 0),
        Opcode.READDIR: Readdir(),
    }
    for opcode, op in examples.items():
        nuls = {Opcode.RENAME: 2}.get(opcode, 1 if hasattr(op, "name") else 0)
        payload = codec.encode_payload(FsRequest(1, 1, op))[2]
        assert len(payload) == 40 + sizes[opcode] + nuls, opcode.name


def test_golden_setattr_layout():
    op = Setattr(valid=1, fh=2, size=3, lock_owner=4, atime=5, mtime=6, ctime=7, atimensec=8,
                 mtimensec=9, ctimensec=10, mode=11, uid=12, gid=13)
    body = codec.encode_payload(FsRequest(1, 1, op))[2][40:]
    assert struct.unpack("<IIQQQQQQIIIIIIII", body) == (1, 0, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 0,
                                                          12, 13, 0)


def test_golden_other_request_layouts():
    def body(op):
        return codec.encode_payload(FsRequest(1, 1, op))[2][40:]

    assert body(Getattr(fh=5, getattr_flags=1)) == struct.pack("<IIQ", 1, 0, 5)
    assert body(Mkdir(b"d", mode=0o755, umask=0o22)) == struct.pack("<II", 0o755, 0o22) + b"d\0"
    assert body(Rename(9, b"a", b"b")) == struct.pack("<Q", 9) + b"a\0b\0"
    assert body(Open(flags=2, open_flags=1)) == struct.pack("<II", 2, 1)
    assert body(Read(fh=1, offset=2, size=3, read_flags=4, lock_owner=5, flags=6)) == struct.pack(
        "<QQIIQII", 1, 2, 3, 4, 5, 6, 0)
    assert body(Readdir(fh=1, offset=2, size=3)) == struct.pack("<QQIIQII", 1, 2, 3, 0, 0, 0, 0)
    assert body(Release(fh=1, flags=2, release_flags=3, lock_owner=4)) == struct.pack(
        "<QIIQ", 1, 2, 3, 4)
    assert body(Fsync(fh=1, fsync_flags=1)) == struct.pack("<QII", 1, 1, 0)
    assert body(Flush(fh=1, lock_owner=2)) == struct.pack("<QIIQ", 1, 0, 0, 2)
    assert body(Create(b"f", flags=0o101, mode=0o644, umask=0o22, open_flags=0)) == struct.pack(
        "<IIII", 0o101, 0o644, 0o22, 0) + b"f\0"


# --- hostile payloads (codec level) -------------------------------------------------


def decode_raw(raw: bytes, reply_opcode=lambda u: None):
    request, flags, _ = struct.unpack_from("<III", raw)
    return codec.decode_payload(request, flags, raw[12:], reply_opcode)


HB = struct.pack("<Q", 1)


@pytest.mark.parametrize("flags", [0x0, 0x2, 0x3, 0x8, 0xB])
def test_wrong_version_bits(flags):
    with pytest.raises(RemoteProtocolError, match="version"):
        decode_raw(frame(5, flags, HB))


@pytest.mark.parametrize("flags", [0x19, 0x29, 0x80000009, 0x1 | 0x100])
def test_unknown_flag_bits(flags):
    with pytest.raises(RemoteProtocolError, match="unknown flag bits"):
        decode_raw(frame(5, flags, HB))


def test_reply_and_need_reply_both_set():
    with pytest.raises(RemoteProtocolError, match="REPLY and NEED_REPLY"):
        decode_raw(frame(5, 0x1 | 0x4 | 0x8, HB))


@pytest.mark.parametrize("code", [0, 10, 11, 0xFFFF, 0xFFFF_FFFF])
def test_unknown_request_code(code):
    with pytest.raises(RemoteProtocolError, match="unknown request code"):
        decode_raw(frame(code, 0x9, HB))


def test_fuse_in_header_len_mismatch():
    body = b"foo\0"
    for length in (0, 40, 43, 45, 0xFFFF_FFFF):
        with pytest.raises(RemoteProtocolError, match="fuse_in_header"):
            decode_raw(fs_frame(1, body, length=length))


def test_fuse_in_header_truncated_and_extlen():
    with pytest.raises(RemoteProtocolError, match="fuse_in_header"):
        decode_raw(frame(2, 0x9, in_header(1, 0)[:39]))
    with pytest.raises(RemoteProtocolError, match="total_extlen"):
        decode_raw(fs_frame(1, b"foo\0", extlen=1))


def write_body(size: int, data: bytes) -> bytes:
    return struct.pack("<QQIIQII", 3, 0, size, 0, 0, 0, 0) + data


def test_write_size_mismatch():
    assert decode_raw(fs_frame(16, write_body(2, b"hi"))).op.data == b"hi"
    for size in (0, 1, 3, 0xFFFF_FFFF):
        with pytest.raises(RemoteProtocolError, match="WRITE"):
            decode_raw(fs_frame(16, write_body(size, b"hi")))
    with pytest.raises(RemoteProtocolError, match="WRITE"):
        decode_raw(fs_frame(16, write_body(0, b"")[:39]))  # fuse_write_in cut short


@pytest.mark.parametrize("opcode,body", [
    (1, b"foo"),  # LOOKUP without NUL
    (1, b"foo\0bar"),  # trailing garbage
    (1, b"foo\0\0"),
    (1, b""),  # no name at all
    (10, b"x"),  # UNLINK
    (11, b"x\0y"),  # RMDIR
    (9, struct.pack("<II", 0o755, 0) + b"dir"),  # MKDIR
    (12, struct.pack("<Q", 1) + b"old\0new"),  # RENAME: second name without NUL
    (12, struct.pack("<Q", 1) + b"old\0new\0x"),
    (12, struct.pack("<Q", 1) + b"old"),
    (35, struct.pack("<IIII", 0, 0, 0, 0) + b"f"),  # CREATE
], ids=lambda v: v if isinstance(v, int) else None)
def test_names_without_nul_or_with_garbage(opcode, body):
    with pytest.raises(RemoteProtocolError, match="malformed"):
        decode_raw(fs_frame(opcode, body))


@pytest.mark.parametrize("opcode,size", [(2, 8), (3, 16), (4, 88), (14, 8), (15, 40), (18, 24),
                                         (20, 16), (25, 24), (28, 40)])
def test_fixed_bodies_must_be_exact(opcode, size):
    assert decode_raw(fs_frame(opcode, bytes(size), flags=0x1 if opcode == 2 else 0x9))
    for n in (0, size - 1, size + 1):
        with pytest.raises(RemoteProtocolError, match="malformed"):
            decode_raw(fs_frame(opcode, bytes(n), flags=0x1 if opcode == 2 else 0x9))


def test_need_reply_must_match_opcode():
    with pytest.raises(RemoteProtocolError, match="NEED_REPLY must be set"):
        decode_raw(fs_frame(1, b"a\0", flags=0x1))
    with pytest.raises(RemoteProtocolError, match="NEED_REPLY must be clear"):
        decode_raw(fs_frame(2, bytes(8), flags=0x9))


@pytest.mark.parametrize("opcode", [0, 26, 37, 38, 39, 48, 9999, 0xFFFF_FFFF])
def test_unsupported_opcode_is_its_own_error(opcode):
    with pytest.raises(codec.UnsupportedOpcode) as info:
        decode_raw(fs_frame(opcode, b"whatever", unique=77))
    assert isinstance(info.value, RemoteProtocolError)
    assert (info.value.unique, info.value.opcode) == (77, opcode)


def test_fs_reply_checks():
    known = {1: Opcode.GETATTR, 2: Opcode.UNLINK, 3: Opcode.READDIR, 4: Opcode.LOOKUP}.get
    with pytest.raises(RemoteProtocolError, match="not outstanding"):
        decode_raw(out_frame(99, 0, b""), known)
    with pytest.raises(RemoteProtocolError, match="at least 40"):
        decode_raw(frame(2, 0x5, bytes(39)), known)
    with pytest.raises(RemoteProtocolError, match="fuse_out_header"):
        decode_raw(out_frame(2, 0, b"", length=17), known)
    with pytest.raises(RemoteProtocolError, match="not 0 or -errno"):
        decode_raw(out_frame(2, 1, b""), known)
    with pytest.raises(RemoteProtocolError, match="not 0 or -errno"):
        decode_raw(out_frame(2, -4096, b""), known)
    with pytest.raises(RemoteProtocolError, match="error reply carries a body"):
        decode_raw(out_frame(1, -2, bytes(8)), known)
    with pytest.raises(RemoteProtocolError, match="unexpected body"):
        decode_raw(out_frame(2, 0, bytes(8)), known)
    with pytest.raises(RemoteProtocolError, match="GETATTR reply"):
        decode_raw(out_frame(1, 0, bytes(103)), known)
    with pytest.raises(RemoteProtocolError, match="GETATTR reply"):
        decode_raw(out_frame(1, 0, bytes(105)), known)
    with pytest.raises(RemoteProtocolError, match="LOOKUP reply"):
        decode_raw(out_frame(4, 0, bytes(104)), known)
    dirent = struct.pack("<QQII", 1, 1, 3, 8)
    with pytest.raises(RemoteProtocolError, match="READDIR reply"):
        decode_raw(out_frame(3, 0, dirent + b"abc"), known)  # padding missing
    for bad in (b"a/c", b"a\0c"):
        with pytest.raises(RemoteProtocolError, match="bad directory entry name"):
            decode_raw(out_frame(3, 0, dirent + bad + bytes(5)), known)
    with pytest.raises(RemoteProtocolError, match="bad directory entry name"):
        decode_raw(out_frame(3, 0, struct.pack("<QQII", 1, 1, 0, 8)), known)


def notify_frame(code: int, notify: int, body: bytes, *, unique: int = 0,
                 length: int | None = None, trailer: bytes = bytes(16)) -> bytes:
    total = 16 + len(body) if length is None else length
    return frame(code, 0x9, struct.pack("<IiQ", total, notify, unique) + body + trailer)


def test_notify_checks():
    inode = struct.pack("<Qqq", 5, 0, 0)
    assert decode_raw(notify_frame(3, 2, inode)) == Invalidate(0, 5, 0, 0, 0)
    with pytest.raises(RemoteProtocolError, match="notify code"):
        decode_raw(notify_frame(3, 3, inode))
    with pytest.raises(RemoteProtocolError, match="unique must be 0"):
        decode_raw(notify_frame(3, 2, inode, unique=1))
    for length in (15, 39, 41):
        with pytest.raises(RemoteProtocolError, match="INVALIDATE"):
            decode_raw(notify_frame(3, 2, inode, length=length))
    with pytest.raises(RemoteProtocolError, match="INVALIDATE"):
        decode_raw(notify_frame(3, 2, inode + b"x"))
    with pytest.raises(RemoteProtocolError, match="INVALIDATE"):
        decode_raw(frame(3, 0x9, bytes(10)))
    entry = struct.pack("<QII", 1, 3, 0)
    assert decode_raw(notify_frame(4, 3, entry + b"abc\0")).name == b"abc"
    for name in (b"abc", b"ab\0", b"abcd\0", b"a\0c\0", b""):
        with pytest.raises(RemoteProtocolError, match="namelen"):
            decode_raw(notify_frame(4, 3, entry + name))
    with pytest.raises(RemoteProtocolError, match="INVAL_ENTRY"):
        decode_raw(notify_frame(4, 3, entry[:10]))


def test_small_payloads():
    for code in (3, 4, 5):
        for flags in (0x5, 0x9):
            for n in (0, 7, 9):
                with pytest.raises(RemoteProtocolError, match="malformed"):
                    decode_raw(frame(code, flags, bytes(n)))
    with pytest.raises(RemoteProtocolError, match="HELLO"):
        decode_raw(frame(1, 0x9, h("01000000 0000000000000000 00001000 05 6162")))
    with pytest.raises(RemoteProtocolError, match="HELLO"):
        decode_raw(frame(1, 0x9, h("01000000 0000000000000000 00001000 02 ff fe")))  # not UTF-8
    for message in (Auth(GUEST_NONCE, PROOF), AuthReply(0, PROOF)):
        raw = encode(message)
        for bad in (raw[:-1], raw + b"\0"):
            bad = bad[:8] + struct.pack("<I", len(bad) - 12) + bad[12:]
            with pytest.raises(RemoteProtocolError, match="malformed AUTH"):
                decode_raw(bad)
    reply = encode(HelloReply(0, 1, 0, Policy.NEVER, Detector.NONE, 0, 0, 8192, 1, BOOT))
    with pytest.raises(RemoteProtocolError, match="HELLO reply"):
        decode_raw(reply[:-1])
    with pytest.raises(RemoteProtocolError, match="HELLO reply"):
        decode_raw(reply + b"\0")
    bad_policy = bytearray(reply)
    bad_policy[12 + 16] = 9
    with pytest.raises(RemoteProtocolError, match="policy"):
        decode_raw(bytes(bad_policy))


# --- local errors (codec level) --------------------------------------------------------


@pytest.mark.parametrize("op", [
    Lookup(b"a\0b"), Mkdir(b"\0"), Unlink(b"x\0"), Rmdir(b"\0x"), Rename(1, b"a\0", b"b"),
    Rename(1, b"a", b"b\0"), Create(b"f\0", 0), Lookup("text"),
])
def test_names_containing_nul_are_refused(op):
    with pytest.raises(LocalProtocolError, match="without NUL"):
        codec.encode_payload(FsRequest(1, 1, op))


def test_encoding_errors_are_local():
    bad = [
        FsRequest(1, -1, Getattr()),
        FsRequest(1 << 64, 1, Getattr()),
        FsRequest(1, 1, Read(fh=0, offset=0, size=1 << 32)),
        FsReply(1, error=1),
        FsReply(1, error=-4096),
        FsReply(1, error=-2, body=WriteOut(1)),
        FsReply(1, body=ReaddirOut((DirEntry(1, 1, 8, b""),))),
        FsReply(1, body=ReaddirOut((DirEntry(1, 1, 8, b"a/b"),))),
        FsReply(1, body=ReaddirOut((DirEntry(1, 1, 8, b"a\0b"),))),
        FsReply(1, body=OpenOut(fh=1, backing_id=1 << 31)),
        FsReply(1, body=WriteOut(1), lease=LeaseGrant(ino=-1)),
        Hello(1, 0, 8192, "x" * 256),
        Hello(1, 0, -1, "x"),
        HelloReply(0, 1, 0, Policy.NEVER, Detector.NONE, 0, 0, 8192, 1, b"short"),
        HelloReply(0, 1, 0, Policy.NEVER, Detector.NONE, 0, 0, 8192, 1, BOOT, b"short"),
        Auth(b"short", PROOF),
        Auth(GUEST_NONCE, b"short"),
        AuthReply(0, b"short"),
        AuthReply(-(1 << 31) - 1, PROOF),
        InvalEntry(1, 1, b"a\0", 0),
        Invalidate(1, 1, 1 << 63, 0, 0),
        Heartbeat(-1),
        "not a message",
    ]
    for message in bad:
        with pytest.raises(LocalProtocolError):
            codec.encode_payload(message)
    with pytest.raises(LocalProtocolError):
        codec.encode_ack(Ack(-1), wire.Request.INVALIDATE)


def test_no_lease_is_all_zero():
    assert NO_LEASE == LeaseGrant(0, 0, 0, 0) and not NO_LEASE.granted
    assert LeaseGrant(flags=3).granted and LeaseGrant(flags=3).first_dirty


# --- random payloads never raise anything but ProtocolError ----------------------------


@settings(max_examples=300)
@given(request=st.one_of(st.integers(1, 6), u32), flags=st.one_of(st.sampled_from(
    [0x1, 0x5, 0x9]), u32), payload=st.binary(max_size=200), opcode=st.sampled_from(
    list(codec.REPLY_BODIES)))
def test_decode_payload_random(request, flags, payload, opcode):
    try:
        codec.decode_payload(request, flags, payload, lambda unique: opcode)
    except ProtocolError:
        pass


# --- docs/protocol.md: its hex examples are these very frames -------------------------------


def _doc_frames() -> list[bytes]:
    """The bytes of every hex example in docs/protocol.md, in order.  On each line of a
    fenced block the leading hex groups are bytes; the rest of the line is commentary."""
    import pathlib
    import re

    text = (pathlib.Path(__file__).resolve().parent.parent / "docs" / "protocol.md").read_text()
    frames = []
    for block in re.findall(r"```\n(.*?)```", text, re.S):
        groups = []
        for line in block.splitlines():
            for token in line.split():
                if not re.fullmatch(r"(?:[0-9a-f]{2})+", token):
                    break
                groups.append(token)
        if groups:
            frames.append(bytes.fromhex("".join(groups)))
    return frames


def test_docs_protocol_md_examples_are_exact():
    def ack(seq, request):
        code, flags, payload = codec.encode_ack(Ack(seq), request)
        return codec.encode_header(code, flags, len(payload)) + payload

    expected = [
        encode(Hello(1, 3, 1 << 20, "g1", bytes(range(16)))),
        encode(HelloReply(0, 1, 3, Policy.CLEAN_LEASE, Detector.FANOTIFY, 1000, 1000, 65536, 7,
                          BOOT, granularity=Granularity.RANGE)),
        encode(Auth(GUEST_NONCE, PROOF)),
        encode(AuthReply(0, PROOF)),
        encode(FsRequest(7, 5, Interrupt(3))),
        encode(FsRequest(7, 1, Lookup(b"foo"), uid=1000, gid=1000, pid=42)),
        encode(FsRequest(8, 5, Write(fh=3, offset=4096, data=b"hi"))),
        encode(FsRequest(3, 1, Symlink(b"ln", b"a/b"), uid=1000, gid=1000, pid=42)),
        encode(FsRequest(4, 5, Getattr(), uid=1000, gid=1000, pid=42, groups=(10, 27))),
        encode(FsRequest(0, 5, Forget(2))),
        encode(FsReply(9, body=WriteOut(4096), lease=LeaseGrant(5, 2, 1000, 3))),
        encode(FsReply(5, 0, LseekOut(8192))),
        encode(FsReply(9, error=-errno.ENOENT)),
        encode(FsReply(1, body=ReaddirOut((DirEntry(ino=9, off=1, type=8, name=b"abc"),)))),
        encode(Invalidate(seq=3, ino=5, offset=0, length=-1, generation=2)),
        encode(InvalEntry(seq=4, parent=1, name=b"a.txt", generation=6)),
        ack(3, wire.Request.INVALIDATE) + ack(4, wire.Request.INVAL_ENTRY),
        encode(Heartbeat(11)) + encode(HeartbeatReply(11))
        + encode(HeartbeatReply(11, -errno.EKEYEXPIRED)),
        # section 8a
        encode(Witness(7)) + encode(WitnessReply(0)) + encode(WitnessReply(-errno.EACCES))
        + encode(Purge(wire.PURGE_SILENT)) + encode(Purged(wire.PURGED_ASKED, 5)),
        # section 10, the control socket
        control.encode_request(control.Freeze(b"/srv/e/f", 1500, seq=1))
        + control.encode_reply(control.ControlReply(control.ControlCode.FREEZE, 1, 0, "",
                                                    control.Held(20000, 2)))
        + control.encode_reply(control.ControlReply(control.ControlCode.THAW, 2, -22, "x"))
        + control.encode_request(control.Changes(b"/srv/e/f", bytes(range(16)), 3, seq=4))
        + control.encode_reply(control.ControlReply(
            control.ControlCode.CHANGES, 4, 0, "", control.ChangesOut(
                control.ChangesStatus.RANGES, 20010, ((16384, 4096),)))),
    ]
    assert _doc_frames() == expected


def test_interrupt_is_a_request_without_a_reply():
    """INTERRUPT (docs/protocol.md, section 4): fuse_interrupt_in, NEED_REPLY clear,
    like FORGET; the same body with NEED_REPLY set is malformed."""
    raw = encode(FsRequest(7, 5, Interrupt(3)))
    assert raw.hex() == ("020000000100000030000000" "3000000024000000" "0700000000000000"
                         "0500000000000000" "000000000000000000000000" "00000000"
                         "0300000000000000")
    assert decode(raw) == FsRequest(7, 5, Interrupt(3))
    with pytest.raises(RemoteProtocolError, match="NEED_REPLY must be clear for INTERRUPT"):
        decode(raw[:4] + struct.pack("<I", 9) + raw[8:])
