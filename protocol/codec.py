"""Messages to payload bytes and back, using the construct schemas.

This is the reference codec: the construct schemas in `protocol/wire.py` and
`protocol/fuse.py` are the single definition of the wire format, and this
module only maps them onto the dataclasses of `protocol/messages.py`.  It
knows nothing of connection state; the caller says which opcode a reply
answers (`reply_opcode`) because a FUSE reply does not carry it.

Every decoding failure raises `RemoteProtocolError` with a message that names
the message and the field; every encoding failure raises `LocalProtocolError`.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from construct import ConstructError, GreedyRange, Struct, Terminated

from protocol import fuse, wire
from protocol.errors import LocalProtocolError, RemoteProtocolError
from protocol.fuse import Opcode
from protocol.messages import (
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
    NO_REPLY_OPCODES,
    FsReply,
    FsRequest,
    Fsync,
    Fsyncdir,
    Getattr,
    Getlk,
    Getxattr,
    Granularity,
    Heartbeat,
    HeartbeatReply,
    Purge,
    Purged,
    Witness,
    WitnessReply,
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
    Message,
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

# opcode -> (request dataclass, construct schema of its body)
REQUEST_BODIES: dict[Opcode, tuple[type, object]] = {
    Opcode.LOOKUP: (Lookup, fuse.LookupIn),
    Opcode.FORGET: (Forget, fuse.ForgetIn),
    Opcode.INTERRUPT: (Interrupt, fuse.InterruptIn),
    Opcode.GETATTR: (Getattr, fuse.GetattrIn),
    Opcode.SETATTR: (Setattr, fuse.SetattrIn),
    Opcode.MKDIR: (Mkdir, fuse.MkdirIn),
    Opcode.UNLINK: (Unlink, fuse.UnlinkIn),
    Opcode.RMDIR: (Rmdir, fuse.RmdirIn),
    Opcode.RENAME: (Rename, fuse.RenameIn),
    Opcode.OPEN: (Open, fuse.OpenIn),
    Opcode.READ: (Read, fuse.ReadIn),
    Opcode.WRITE: (Write, fuse.WriteIn),
    Opcode.RELEASE: (Release, fuse.ReleaseIn),
    Opcode.FSYNC: (Fsync, fuse.FsyncIn),
    Opcode.FLUSH: (Flush, fuse.FlushIn),
    Opcode.CREATE: (Create, fuse.CreateIn),
    Opcode.READDIR: (Readdir, fuse.ReadIn),
    Opcode.READDIRPLUS: (Readdirplus, fuse.ReadIn),
    Opcode.GETLK: (Getlk, fuse.LkIn),
    Opcode.SETLK: (Setlk, fuse.LkIn),
    Opcode.SETLKW: (Setlkw, fuse.LkIn),
    Opcode.READLINK: (Readlink, fuse.ReadlinkIn),
    Opcode.SYMLINK: (Symlink, fuse.SymlinkIn),
    Opcode.MKNOD: (Mknod, fuse.MknodIn),
    Opcode.LINK: (Link, fuse.LinkIn),
    Opcode.STATFS: (Statfs, fuse.StatfsIn),
    Opcode.SETXATTR: (Setxattr, fuse.SetxattrIn),
    Opcode.GETXATTR: (Getxattr, fuse.GetxattrIn),
    Opcode.LISTXATTR: (Listxattr, fuse.ListxattrIn),
    Opcode.REMOVEXATTR: (Removexattr, fuse.RemovexattrIn),
    Opcode.FSYNCDIR: (Fsyncdir, fuse.FsyncIn),
    Opcode.FALLOCATE: (Fallocate, fuse.FallocateIn),
    Opcode.RENAME2: (Rename2, fuse.Rename2In),
    Opcode.LSEEK: (Lseek, fuse.LseekIn),
    Opcode.COPY_FILE_RANGE: (CopyFileRange, fuse.CopyFileRangeIn),
}

# Bodies whose last field is data of the length in their `size` field (set from
# the data when encoding, checked when decoding).
_SIZED_DATA = {Opcode.WRITE: "data", Opcode.SETXATTR: "value"}
# The caller's supplementary groups travel as one FUSE_EXT_GROUPS extension; at most this many.
MAX_GROUPS = 65536

# opcode -> reply body dataclass (for successful replies; errors carry none)
REPLY_BODIES: dict[Opcode, type] = {
    Opcode.LOOKUP: EntryOut,
    Opcode.MKDIR: EntryOut,
    Opcode.GETATTR: AttrOut,
    Opcode.SETATTR: AttrOut,
    Opcode.OPEN: OpenOut,
    Opcode.CREATE: CreateOut,
    Opcode.READ: ReadOut,
    Opcode.WRITE: WriteOut,
    Opcode.READDIR: ReaddirOut,
    Opcode.READDIRPLUS: ReaddirplusOut,
    Opcode.GETLK: LkOut,
    Opcode.SETLK: EmptyOut,
    Opcode.SETLKW: EmptyOut,
    Opcode.UNLINK: EmptyOut,
    Opcode.RMDIR: EmptyOut,
    Opcode.RENAME: EmptyOut,
    Opcode.RELEASE: EmptyOut,
    Opcode.FSYNC: EmptyOut,
    Opcode.FLUSH: EmptyOut,
    Opcode.READLINK: BytesOut,
    Opcode.SYMLINK: EntryOut,
    Opcode.MKNOD: EntryOut,
    Opcode.LINK: EntryOut,
    Opcode.STATFS: StatfsOut,
    Opcode.SETXATTR: EmptyOut,
    Opcode.GETXATTR: BytesOut,
    Opcode.LISTXATTR: BytesOut,
    Opcode.REMOVEXATTR: EmptyOut,
    Opcode.FSYNCDIR: EmptyOut,
    Opcode.FALLOCATE: EmptyOut,
    Opcode.RENAME2: EmptyOut,
    Opcode.LSEEK: LseekOut,
    Opcode.COPY_FILE_RANGE: WriteOut,
}

_Dirents = GreedyRange(fuse.Dirent)
_DirentsPlus = GreedyRange(fuse.DirentPlus)
_NAME_FIELDS = {"name", "oldname", "newname", "target"}
_MAX_ERRNO = 4095


def _fields(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


def _from_container(cls: type, container) -> object:
    return cls(**{name: container[name] for name in _fields(cls)})


def _check_names(op: object) -> None:
    for name in _NAME_FIELDS.intersection(_fields(type(op))):
        value = getattr(op, name)
        if not isinstance(value, (bytes, bytearray)) or b"\x00" in value:
            raise LocalProtocolError(f"{type(op).__name__}.{name} must be bytes without NUL")


def _build(schema, value, what: str) -> bytes:
    try:
        return schema.build(value)
    except (ConstructError, TypeError, ValueError, KeyError, OverflowError) as exc:
        raise LocalProtocolError(f"cannot encode {what}: {exc}") from None


def _parse(schema, data, what: str):
    try:
        return schema.parse(data)
    except (ConstructError, ValueError, UnicodeDecodeError, OverflowError) as exc:
        detail = str(exc).replace("\n", ": ")
        raise RemoteProtocolError(f"malformed {what}: {detail}") from None


# --- encoding -----------------------------------------------------------------


def _attr_dict(attr: Attr) -> dict:
    return dataclasses.asdict(attr)


def _entry_dict(entry: EntryOut) -> dict:
    d = {name: getattr(entry, name) for name in _fields(EntryOut)}
    d["attr"] = _attr_dict(entry.attr)
    return d


def _dirent(e: DirEntry) -> bytes:
    if not e.name or b"\x00" in e.name or b"/" in e.name:
        raise LocalProtocolError(f"bad directory entry name {e.name!r}")
    return _build(fuse.Dirent, {"ino": e.ino, "off": e.off, "namelen": len(e.name),
                                "type": e.type, "name": e.name}, "fuse_dirent")


def _encode_reply_body(body) -> bytes:
    match body:
        case EmptyOut():
            return b""
        case EntryOut():
            return _build(fuse.EntryOut, _entry_dict(body), "fuse_entry_out")
        case AttrOut():
            d = {"attr_valid": body.attr_valid, "attr_valid_nsec": body.attr_valid_nsec,
                 "attr": _attr_dict(body.attr)}
            return _build(fuse.AttrOut, d, "fuse_attr_out")
        case OpenOut():
            return _build(fuse.OpenOut, dataclasses.asdict(body), "fuse_open_out")
        case CreateOut():
            return _encode_reply_body(body.entry) + _encode_reply_body(body.open)
        case ReadOut() | BytesOut():
            return bytes(body.data)
        case StatfsOut():
            return _build(fuse.StatfsOut, dataclasses.asdict(body), "fuse_statfs_out")
        case LseekOut():
            return _build(fuse.LseekOut, {"offset": body.offset}, "fuse_lseek_out")
        case LkOut():
            return _build(fuse.LkOut, dataclasses.asdict(body), "fuse_lk_out")
        case WriteOut():
            return _build(fuse.WriteOut, {"size": body.size}, "fuse_write_out")
        case ReaddirOut():
            return b"".join(_dirent(e) for e in body.entries)
        case ReaddirplusOut():
            return b"".join(_encode_reply_body(e.entry) + _dirent(e.dirent)
                            for e in body.entries)
    raise LocalProtocolError(f"unknown reply body {type(body).__name__}")


def encode_payload(message: Message) -> tuple[wire.Request, int, bytes]:
    """Encode `message` into (request code, flags, payload).

    Raises LocalProtocolError if a field does not fit its wire type.
    """
    version = wire.PROTOCOL_VERSION
    match message:
        case Hello():
            payload = _build(wire.HelloPayload, dataclasses.asdict(message), "HELLO")
            return wire.Request.HELLO, version | wire.FLAG_NEED_REPLY, payload
        case HelloReply():
            if len(message.boot_id) != 16 or len(message.nonce) != wire.NONCE_SIZE:
                raise LocalProtocolError("HelloReply.boot_id and .nonce must be 16 bytes")
            d = dataclasses.asdict(message)
            d["policy"] = int(message.policy)
            d["detector"] = int(message.detector)
            d["granularity"] = int(message.granularity)
            d["reserved"] = 0
            return wire.Request.HELLO, version | wire.FLAG_REPLY, _build(
                wire.HelloReplyPayload, d, "HELLO reply")
        case Auth():
            return wire.Request.AUTH, version | wire.FLAG_NEED_REPLY, _build(
                wire.AuthPayload, dataclasses.asdict(message), "AUTH")
        case AuthReply():
            return wire.Request.AUTH, version | wire.FLAG_REPLY, _build(
                wire.AuthReplyPayload, dataclasses.asdict(message), "AUTH reply")
        case FsRequest():
            opcode = message.op.opcode
            cls, schema = REQUEST_BODIES[opcode]
            _check_names(message.op)
            d = {name: getattr(message.op, name) for name in _fields(cls)}
            if opcode in _SIZED_DATA:
                d["size"] = len(getattr(message.op, _SIZED_DATA[opcode]))
            ext = _encode_groups(message.groups)
            body = _build(schema, d, f"{opcode.name} body") + ext
            extlen = len(ext) // 8
            header = {"len": fuse.FUSE_IN_HEADER_SIZE + len(body), "opcode": int(opcode),
                      "unique": message.unique, "nodeid": message.nodeid, "uid": message.uid,
                      "gid": message.gid, "pid": message.pid, "total_extlen": extlen,
                      "padding": 0}
            flags = version | (wire.FLAG_NEED_REPLY if message.needs_reply else 0)
            return wire.Request.FS, flags, _build(fuse.FuseInHeader, header, "fuse_in_header") + body
        case FsReply():
            if not -_MAX_ERRNO <= message.error <= 0:
                raise LocalProtocolError(f"FsReply.error {message.error} is not 0 or -errno")
            if message.error and not isinstance(message.body, EmptyOut):
                raise LocalProtocolError("FsReply: an error reply carries no body (use EmptyOut)")
            body = b"" if message.error else _encode_reply_body(message.body)
            header = {"len": fuse.FUSE_OUT_HEADER_SIZE + len(body), "error": message.error,
                      "unique": message.unique}
            lease = dataclasses.asdict(message.lease)
            return wire.Request.FS, version | wire.FLAG_REPLY, (
                _build(fuse.FuseOutHeader, header, "fuse_out_header") + body
                + _build(wire.LeaseTrailer, lease, "lease trailer"))
        case Invalidate():
            body = _build(fuse.NotifyInvalInodeOut, {"ino": message.ino, "off": message.offset,
                                                     "len": message.length}, "INVALIDATE")
            header = {"len": fuse.FUSE_OUT_HEADER_SIZE + len(body),
                      "error": int(fuse.NotifyCode.INVAL_INODE), "unique": 0}
            trailer = _build(wire.NotifyTrailer, {"seq": message.seq,
                                                  "generation": message.generation}, "INVALIDATE")
            return wire.Request.INVALIDATE, version | wire.FLAG_NEED_REPLY, (
                _build(fuse.FuseOutHeader, header, "fuse_out_header") + body + trailer)
        case InvalEntry():
            _check_names(message)
            body = _build(fuse.NotifyInvalEntryOut, {"parent": message.parent,
                                                     "namelen": len(message.name),
                                                     "flags": message.flags}, "INVAL_ENTRY")
            body += message.name + b"\x00"
            header = {"len": fuse.FUSE_OUT_HEADER_SIZE + len(body),
                      "error": int(fuse.NotifyCode.INVAL_ENTRY), "unique": 0}
            trailer = _build(wire.NotifyTrailer, {"seq": message.seq,
                                                  "generation": message.generation}, "INVAL_ENTRY")
            return wire.Request.INVAL_ENTRY, version | wire.FLAG_NEED_REPLY, (
                _build(fuse.FuseOutHeader, header, "fuse_out_header") + body + trailer)
        case Heartbeat():
            return wire.Request.HEARTBEAT, version | wire.FLAG_NEED_REPLY, _build(
                wire.HeartbeatPayload, {"seq": message.seq}, "HEARTBEAT")
        case HeartbeatReply():
            if not -_MAX_ERRNO <= message.error <= 0:
                raise LocalProtocolError(f"HeartbeatReply.error {message.error} is not 0 or -errno")
            return wire.Request.HEARTBEAT, version | wire.FLAG_REPLY, _build(
                wire.HeartbeatReplyPayload, {"seq": message.seq, "error": message.error,
                                             "reserved": 0}, "HEARTBEAT reply")
        case Witness():
            return wire.Request.WITNESS, version | wire.FLAG_NEED_REPLY, _build(
                wire.WitnessPayload, {"guest_id": message.guest_id}, "WITNESS")
        case WitnessReply():
            if not -_MAX_ERRNO <= message.error <= 0:
                raise LocalProtocolError(f"WitnessReply.error {message.error} is not 0 or -errno")
            return wire.Request.WITNESS, version | wire.FLAG_REPLY, _build(
                wire.WitnessReplyPayload, {"error": message.error}, "WITNESS reply")
        case Purge():
            return wire.Request.PURGE, version, _build(
                wire.PurgePayload, {"reason": message.reason}, "PURGE")
        case Purged():
            return wire.Request.PURGED, version, _build(
                wire.PurgedPayload, {"reason": message.reason, "inodes": message.inodes},
                "PURGED")
    raise LocalProtocolError(f"cannot encode {type(message).__name__}")


def _encode_groups(groups) -> bytes:
    """The FUSE_EXT_GROUPS extension carrying `groups` (b"" for none)."""
    if not groups:
        return b""
    if not isinstance(groups, tuple) or len(groups) > MAX_GROUPS:
        raise LocalProtocolError(f"FsRequest.groups must be a tuple of at most {MAX_GROUPS}")
    body = _build(fuse.SuppGroups, {"nr_groups": len(groups), "groups": list(groups)},
                  "fuse_supp_groups")
    size = fuse.FuseExtHeader.sizeof() + len(body)
    size += (8 - size % 8) % 8
    header = _build(fuse.FuseExtHeader, {"size": size, "type": fuse.FUSE_EXT_GROUPS},
                    "fuse_ext_header")
    return (header + body).ljust(size, b"\x00")


def _decode_extensions(ext: bytes) -> tuple[int, ...]:
    """The supplementary groups carried in the request extensions `ext`: exactly one
    FUSE_EXT_GROUPS, whose size is its header, its groups and the padding to 8 bytes."""
    h = _parse(fuse.FuseExtHeader, ext[:8], "fuse_ext_header")
    if h.type != fuse.FUSE_EXT_GROUPS:
        raise RemoteProtocolError(f"malformed request extension: type {h.type} "
                                  f"(only FUSE_EXT_GROUPS, {fuse.FUSE_EXT_GROUPS}, is known)")
    nr = _parse(fuse.Int32ul, ext[8:12], "fuse_supp_groups")
    used = 12 + 4 * nr
    expected = used + (8 - used % 8) % 8
    if nr > MAX_GROUPS or h.size != expected or len(ext) != expected:
        raise RemoteProtocolError(f"malformed fuse_supp_groups: {nr} groups in an extension "
                                  f"of {h.size} bytes ({len(ext)} carried)")
    return tuple(_parse(fuse.SuppGroups, ext[8:used], "fuse_supp_groups").groups)


def encode_ack(message: Ack, request: wire.Request) -> tuple[wire.Request, int, bytes]:
    """An ACK is a reply frame to an INVALIDATE or INVAL_ENTRY; the caller names which."""
    return request, wire.PROTOCOL_VERSION | wire.FLAG_REPLY, _build(
        wire.AckPayload, {"seq": message.seq}, "ACK")


def encode_header(request: int, flags: int, size: int) -> bytes:
    return _build(wire.FrameHeader, {"request": request, "flags": flags, "size": size},
                  "frame header")


# --- decoding -----------------------------------------------------------------


def decode_header(data: bytes) -> tuple[int, int, int]:
    """Parse the 12-byte frame header into (request, flags, size)."""
    h = _parse(wire.FrameHeader, data, "frame header")
    return h.request, h.flags, h.size


def _attr(container) -> Attr:
    return _from_container(Attr, container)


def _entry(container) -> EntryOut:
    fields = {name: container[name] for name in _fields(EntryOut) if name != "attr"}
    return EntryOut(attr=_attr(container.attr), **fields)


def _decode_reply_body(opcode: Opcode, body: bytes):
    cls = REPLY_BODIES.get(opcode)
    what = f"{opcode.name} reply"
    if cls is None:
        raise RemoteProtocolError(f"no reply is defined for {opcode.name}")
    if cls is EmptyOut:
        if body:
            raise RemoteProtocolError(f"malformed {what}: {len(body)} unexpected body bytes")
        return EmptyOut()
    if cls is ReadOut:
        return ReadOut(bytes(body))
    if cls is BytesOut:
        return BytesOut(bytes(body))
    if cls is StatfsOut:
        c = _parse(_StatfsExact, body, what)
        return StatfsOut(**{name: c[name] for name in _fields(StatfsOut)})
    if cls is LseekOut:
        return LseekOut(_parse(_LseekExact, body, what).offset)
    if cls is LkOut:
        c = _parse(_LkExact, body, what)
        return LkOut(c.start, c.end, c.type, c.pid)
    if cls is EntryOut:
        return _entry(_parse(_EntryExact, body, what))
    if cls is AttrOut:
        c = _parse(_AttrExact, body, what)
        return AttrOut(c.attr_valid, c.attr_valid_nsec, _attr(c.attr))
    if cls is OpenOut:
        c = _parse(_OpenExact, body, what)
        return OpenOut(c.fh, c.open_flags, c.backing_id)
    if cls is CreateOut:
        c = _parse(_CreateExact, body, what)
        return CreateOut(_entry(c.entry), OpenOut(c.open.fh, c.open.open_flags, c.open.backing_id))
    if cls is WriteOut:
        return WriteOut(_parse(_WriteExact, body, what).size)
    if cls is ReaddirOut:
        items = _parse(_DirentsExact, body, what)
        for d in items:
            if not d.name or b"\x00" in d.name or b"/" in d.name:
                raise RemoteProtocolError(
                    f"malformed {what}: bad directory entry name {bytes(d.name)!r}")
        return ReaddirOut(tuple(DirEntry(d.ino, d.off, d.type, bytes(d.name)) for d in items))
    if cls is ReaddirplusOut:
        items = _parse(_DirentsPlusExact, body, what)
        for d in items:
            if not d.dirent.name or b"\x00" in d.dirent.name or b"/" in d.dirent.name:
                raise RemoteProtocolError(
                    f"malformed {what}: bad directory entry name {bytes(d.dirent.name)!r}")
        return ReaddirplusOut(tuple(
            DirEntryPlus(_entry(d.entry), DirEntry(d.dirent.ino, d.dirent.off, d.dirent.type,
                                                   bytes(d.dirent.name))) for d in items))
    raise RemoteProtocolError(f"no decoder for {what}")  # pragma: no cover


class _Exact:
    """A schema that must consume its whole input (trailing bytes are an error)."""

    def __init__(self, schema):
        self._s = Struct("value" / schema, Terminated)

    def parse(self, data):
        return self._s.parse(data).value


_EntryExact = _Exact(fuse.EntryOut)
_AttrExact = _Exact(fuse.AttrOut)
_OpenExact = _Exact(fuse.OpenOut)
_WriteExact = _Exact(fuse.WriteOut)
_DirentsExact = _Exact(_Dirents)
_DirentsPlusExact = _Exact(_DirentsPlus)
_CreateExact = _Exact(Struct("entry" / fuse.EntryOut, "open" / fuse.OpenOut))
_InvalInodeExact = _Exact(fuse.NotifyInvalInodeOut)
_StatfsExact = _Exact(fuse.StatfsOut)
_LseekExact = _Exact(fuse.LseekOut)
_LkExact = _Exact(fuse.LkOut)


def decode_payload(request: int, flags: int, payload: bytes,
                   reply_opcode: Callable[[int], Opcode | None]) -> Message:
    """Decode one frame's payload into a message.

    `reply_opcode(unique)` returns the opcode of the outstanding request a FS
    reply answers, or None if there is none.  ACK frames decode to `Ack`.
    Raises RemoteProtocolError naming the field for anything malformed.
    """
    version = flags & wire.FLAG_VERSION_MASK
    if version != wire.PROTOCOL_VERSION:
        raise RemoteProtocolError(f"frame header: version {version}, expected {wire.PROTOCOL_VERSION}")
    if flags & ~wire.KNOWN_FLAGS:
        raise RemoteProtocolError(f"frame header: unknown flag bits {flags & ~wire.KNOWN_FLAGS:#x}")
    is_reply = bool(flags & wire.FLAG_REPLY)
    if is_reply and flags & wire.FLAG_NEED_REPLY:
        raise RemoteProtocolError("frame header: REPLY and NEED_REPLY both set")
    try:
        code = wire.Request(request)
    except ValueError:
        raise RemoteProtocolError(f"frame header: unknown request code {request}") from None

    if code == wire.Request.HELLO:
        if is_reply:
            c = _parse(wire.HelloReplyPayload, payload, "HELLO reply")
            try:
                policy, detector = Policy(c.policy), Detector(c.detector)
                granularity = Granularity(c.granularity)
            except ValueError:
                raise RemoteProtocolError(
                    f"malformed HELLO reply: policy {c.policy} / detector {c.detector} / "
                    f"granularity {c.granularity}") from None
            return HelloReply(c.error, c.version, c.features, policy, detector, c.lease_term_ms,
                              c.ttl_ms, c.max_frame, c.guest_id, bytes(c.boot_id), bytes(c.nonce),
                              granularity)
        c = _parse(wire.HelloPayload, payload, "HELLO")
        return Hello(c.version, c.features, c.max_frame, c.name, bytes(c.client_id))

    if code == wire.Request.AUTH:
        if is_reply:
            c = _parse(wire.AuthReplyPayload, payload, "AUTH reply")
            return AuthReply(c.error, bytes(c.proof))
        c = _parse(wire.AuthPayload, payload, "AUTH")
        return Auth(bytes(c.nonce), bytes(c.proof))

    if code == wire.Request.FS:
        return _decode_fs_reply(payload, reply_opcode) if is_reply else _decode_fs_request(flags, payload)

    if code in (wire.Request.INVALIDATE, wire.Request.INVAL_ENTRY):
        if is_reply:
            return Ack(_parse(wire.AckPayload, payload, f"{code.name} ACK").seq)
        return _decode_notify(code, payload)

    if code == wire.Request.HEARTBEAT:
        if is_reply:
            c = _parse(wire.HeartbeatReplyPayload, payload, "HEARTBEAT reply")
            if not -_MAX_ERRNO <= c.error <= 0:
                raise RemoteProtocolError(f"malformed HEARTBEAT reply: error {c.error} is not 0 or -errno")
            return HeartbeatReply(c.seq, c.error)
        return Heartbeat(_parse(wire.HeartbeatPayload, payload, "HEARTBEAT").seq)

    if code == wire.Request.WITNESS:
        if is_reply:
            c = _parse(wire.WitnessReplyPayload, payload, "WITNESS reply")
            if not -_MAX_ERRNO <= c.error <= 0:
                raise RemoteProtocolError(f"malformed WITNESS reply: error {c.error} is not 0 or -errno")
            return WitnessReply(c.error)
        return Witness(_parse(wire.WitnessPayload, payload, "WITNESS").guest_id)
    if code in (wire.Request.PURGE, wire.Request.PURGED):
        if is_reply or flags & wire.FLAG_NEED_REPLY:
            raise RemoteProtocolError(f"frame header: {code.name} is a one-way message "
                                      f"(flags {flags:#x}, expected 0x1)")
        if code == wire.Request.PURGE:
            return Purge(_parse(wire.PurgePayload, payload, "PURGE").reason)
        c = _parse(wire.PurgedPayload, payload, "PURGED")
        return Purged(c.reason, c.inodes)
    raise RemoteProtocolError(f"frame header: unhandled request code {request}")  # pragma: no cover


def _decode_fs_request(flags: int, payload: bytes) -> FsRequest:
    h = _parse(fuse.FuseInHeader, payload[: fuse.FUSE_IN_HEADER_SIZE], "fuse_in_header")
    if h.len != len(payload):
        raise RemoteProtocolError(
            f"malformed fuse_in_header: len {h.len} but the frame carries {len(payload)} bytes")
    end = len(payload) - 8 * h.total_extlen
    if end < fuse.FUSE_IN_HEADER_SIZE:
        raise RemoteProtocolError(
            f"malformed fuse_in_header: total_extlen {h.total_extlen} is past the body")
    try:
        opcode = Opcode(h.opcode)
        cls, schema = REQUEST_BODIES[opcode]
    except (ValueError, KeyError):
        raise UnsupportedOpcode(h.unique, h.opcode,
                                bool(flags & wire.FLAG_NEED_REPLY)) from None
    what = f"{opcode.name} body"
    body = _parse(schema, payload[fuse.FUSE_IN_HEADER_SIZE:end], what)
    groups = _decode_extensions(payload[end:]) if h.total_extlen else ()
    if opcode in _SIZED_DATA:
        field = _SIZED_DATA[opcode]
        if body.size != len(body[field]):
            raise RemoteProtocolError(f"malformed {what}: size {body.size} but "
                                      f"{len(body[field])} {field} bytes follow")
        op = cls(**{name: bytes(body[name]) if name == field else body[name]
                    for name in _fields(cls)})
    else:
        op = _from_container(cls, body)
    needs_reply = opcode not in NO_REPLY_OPCODES
    if bool(flags & wire.FLAG_NEED_REPLY) != needs_reply:
        raise RemoteProtocolError(
            f"frame header: NEED_REPLY must be {'set' if needs_reply else 'clear'} for {opcode.name}")
    return FsRequest(h.unique, h.nodeid, op, h.uid, h.gid, h.pid, groups)


class UnsupportedOpcode(RemoteProtocolError):
    """A well-formed FS request with an opcode this server does not implement.

    Not fatal: the server answers it with -ENOSYS and keeps the connection,
    unless the frame's NEED_REPLY flag is clear (`needs_reply` False): then
    the sender awaits no reply, and the server sends none (a reply to a
    `unique` the sender does not await would be fatal at its end).
    """

    def __init__(self, unique: int, opcode: int, needs_reply: bool = True):
        super().__init__(f"unsupported FUSE opcode {opcode}")
        self.unique = unique
        self.opcode = opcode
        self.needs_reply = needs_reply


def _decode_fs_reply(payload: bytes, reply_opcode) -> FsReply:
    minimum = fuse.FUSE_OUT_HEADER_SIZE + wire.LEASE_TRAILER_SIZE
    if len(payload) < minimum:
        raise RemoteProtocolError(f"malformed FS reply: {len(payload)} bytes, at least {minimum} needed")
    h = _parse(fuse.FuseOutHeader, payload[: fuse.FUSE_OUT_HEADER_SIZE], "fuse_out_header")
    if h.len != len(payload) - wire.LEASE_TRAILER_SIZE:
        raise RemoteProtocolError(
            f"malformed fuse_out_header: len {h.len} but the frame carries "
            f"{len(payload) - wire.LEASE_TRAILER_SIZE} FUSE bytes")
    if not -_MAX_ERRNO <= h.error <= 0:
        raise RemoteProtocolError(f"malformed fuse_out_header: error {h.error} is not 0 or -errno")
    opcode = reply_opcode(h.unique)
    if opcode is None:
        raise RemoteProtocolError(f"FS reply for unique {h.unique}, which is not outstanding")
    body_bytes = payload[fuse.FUSE_OUT_HEADER_SIZE: h.len]
    if h.error:
        if body_bytes:
            raise RemoteProtocolError("malformed FS reply: an error reply carries a body")
        body = EmptyOut()
    else:
        body = _decode_reply_body(opcode, body_bytes)
    t = _parse(wire.LeaseTrailer, payload[h.len:], "lease trailer")
    return FsReply(h.unique, h.error, body, LeaseGrant(t.ino, t.generation, t.term_ms, t.flags))


def _decode_notify(code: wire.Request, payload: bytes):
    what = code.name
    h = _parse(fuse.FuseOutHeader, payload[: fuse.FUSE_OUT_HEADER_SIZE], f"{what} fuse_out_header")
    if h.unique != 0:
        raise RemoteProtocolError(f"malformed {what}: fuse_out_header.unique must be 0")
    if h.len != len(payload) - wire.NOTIFY_TRAILER_SIZE or h.len < fuse.FUSE_OUT_HEADER_SIZE:
        raise RemoteProtocolError(f"malformed {what}: fuse_out_header.len {h.len} does not match the frame")
    expected = fuse.NotifyCode.INVAL_INODE if code == wire.Request.INVALIDATE else fuse.NotifyCode.INVAL_ENTRY
    if h.error != expected:
        raise RemoteProtocolError(f"malformed {what}: notify code {h.error}, expected {int(expected)}")
    body = payload[fuse.FUSE_OUT_HEADER_SIZE: h.len]
    t = _parse(wire.NotifyTrailer, payload[h.len:], f"{what} trailer")
    if code == wire.Request.INVALIDATE:
        b = _parse(_InvalInodeExact, body, what)
        return Invalidate(t.seq, b.ino, b.off, b.len, t.generation)
    fixed = fuse.NotifyInvalEntryOut.sizeof()
    b = _parse(fuse.NotifyInvalEntryOut, body[:fixed], what)
    name = body[fixed:]
    if len(name) != b.namelen + 1 or name[-1:] != b"\x00" or b"\x00" in name[:-1]:
        raise RemoteProtocolError(f"malformed {what}: namelen {b.namelen} does not match the name")
    return InvalEntry(t.seq, b.parent, bytes(name[:-1]), t.generation, b.flags)
