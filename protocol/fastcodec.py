"""The fast path of the codec: `struct.Struct` layouts derived from the construct schemas.

The construct schemas (`protocol/wire.py`, `protocol/fuse.py`) stay the one
definition of the wire format, and `protocol/codec.py` stays the reference
codec.  At import time this module walks the schemas' `subcons` and turns
their fixed parts into `struct` formats (`Int32ul` -> `L`, `Int64sl` -> `q`,
`Padding(4)` -> `4x`, `Bytes(16)` -> `16s`, a nested `Struct` inlined), checks
each format's size against construct's own `sizeof()`, and joins the pieces a
hot frame is made of (frame header + FUSE header + body + trailer) into one
`struct.Struct`: a whole frame is packed or unpacked by one C call.  No
format, size or offset in this module is typed in by hand.

The fast path only ever *succeeds*.  `decode()` returns the message or None;
`encode_frame()` returns the frame's bytes or None.  None means "ask the
reference codec": everything the fast path does not handle (cold messages:
HELLO, SETATTR, CREATE, READDIR, INVAL_ENTRY, the namespace, xattr,
fallocate, lseek and copy-range opcodes, any request carrying supplementary
groups in a FUSE_EXT_GROUPS extension, ...) and everything it
would have to refuse (a wrong length, a bad field, a value out of range)
goes to `protocol/codec.py`, which decodes it or raises its usual error
naming the field.  Errors are therefore the reference's by construction;
`tests/test_codec_agreement.py` checks that the fast path never accepts what
the reference refuses and that, when both accept, the messages are equal and
the bytes identical.

Decoded messages are the frozen dataclasses of `protocol/messages.py`, built
without running their generated `__init__` (`object.__new__`, then the fields
stored in the instance dict in field order, much as `pickle` does): that is
still most of what a decode costs.
`_fields_of` checks at import time that nothing is skipped that way (no
`__post_init__`, no `__slots__`, only init fields).
"""

from __future__ import annotations

import dataclasses
import struct
from typing import Callable

from construct import Bytes as ConstructBytes
from construct import (
    FormatField,
    GreedyBytes,
    NullTerminated,
    Padded,
    Pass,
    Renamed,
    Struct,
    Terminated,
)

from protocol import codec, fuse, wire
from protocol.fuse import Opcode
from protocol.messages import (
    Ack,
    Attr,
    AttrOut,
    EmptyOut,
    EntryOut,
    Flush,
    Forget,
    FsReply,
    FsRequest,
    Fsync,
    Getattr,
    Heartbeat,
    Invalidate,
    LeaseGrant,
    Lookup,
    Open,
    OpenOut,
    Read,
    ReadOut,
    Release,
    Write,
    WriteOut,
)

# --- deriving struct formats from the construct schemas ---------------------------------


class UnsupportedSchema(TypeError):
    """A construct element that has no struct equivalent here."""


@dataclasses.dataclass(frozen=True)
class Layout:
    """The struct form of one construct `Struct`.

    `fmt`: the format of the fixed part, without the byte-order prefix.
    `fields`: the name of each value `struct` yields, in order; fields of a
    nested struct are "outer.inner".  `offsets`: each field's byte offset.
    `tail`: what follows the fixed part: None, "name" (bytes up to a consumed
    NUL, `fuse.Name`) or "greedy" (the rest, `GreedyBytes`), in field
    `tail_field`.  `terminated`: the schema ends with `Terminated`.
    """

    fmt: str
    fields: tuple[str, ...]
    offsets: tuple[int, ...]
    size: int
    tail: str | None = None
    tail_field: str | None = None
    terminated: bool = False


def derive(schema: Struct, _prefix: str = "") -> Layout:
    """Walk `schema.subcons` into a Layout, checking its size against `sizeof()`."""
    if not isinstance(schema, Struct):
        raise UnsupportedSchema(f"not a Struct: {schema!r}")
    fmt: list[str] = []
    fields: list[str] = []
    offsets: list[int] = []
    size = 0
    tail = tail_field = None
    terminated = False
    for sub in schema.subcons:
        name, inner = (sub.name, sub.subcon) if isinstance(sub, Renamed) else (None, sub)
        if terminated:
            raise UnsupportedSchema("an element after Terminated")
        if tail is not None and inner is not Terminated:
            raise UnsupportedSchema(f"an element after the variable-length {tail_field!r}")
        if isinstance(inner, FormatField):
            order, code = inner.fmtstr[0], inner.fmtstr[1:]
            if order != "<" or len(code) != 1:
                raise UnsupportedSchema(f"{name}: format {inner.fmtstr!r} is not little-endian")
            fmt.append(code)
            fields.append(_prefix + name)
            offsets.append(size)
        elif (isinstance(inner, Padded) and inner.subcon is Pass and isinstance(inner.length, int)
              and inner.pattern == b"\x00"):
            fmt.append(f"{inner.length}x")  # written as zeros, not checked when parsed
        elif isinstance(inner, ConstructBytes) and isinstance(inner.length, int):
            fmt.append(f"{inner.length}s")
            fields.append(_prefix + name)
            offsets.append(size)
        elif isinstance(inner, Struct):
            nested = derive(inner, _prefix + name + ".")
            if nested.tail is not None or nested.terminated:
                raise UnsupportedSchema(f"{name}: a nested Struct must be of fixed size")
            fmt.append(nested.fmt)
            fields.extend(nested.fields)
            offsets.extend(size + o for o in nested.offsets)
        elif inner is Terminated:
            terminated = True
            continue
        elif inner is GreedyBytes:
            tail, tail_field = "greedy", name
            continue
        elif (isinstance(inner, NullTerminated) and inner.subcon is GreedyBytes
              and inner.term == b"\x00" and not inner.include and inner.consume and inner.require):
            tail, tail_field = "name", name
            continue
        else:
            raise UnsupportedSchema(f"{name or type(inner).__name__}: no struct equivalent")
        size += sub.sizeof()
    joined = "".join(fmt)
    layout = Layout(joined, tuple(fields), tuple(offsets), struct.calcsize("<" + joined), tail,
                    tail_field, terminated)
    # `size` is the sum of construct's sizeof() of each fixed element; a schema without
    # Terminated or a tail can be asked as a whole too.
    if layout.size != size or (tail is None and not terminated and layout.size != schema.sizeof()):
        raise UnsupportedSchema(f"derived format {joined!r} is {layout.size} bytes, construct "
                                f"says {size}")
    return layout


def join(*parts: tuple[str, Layout]) -> tuple[struct.Struct, tuple[str, ...]]:
    """One little-endian struct.Struct for consecutive fixed layouts, and its value names
    qualified by each part's label ("frame.size", "out.len", "body.attr.ino", ...)."""
    names: list[str] = []
    for label, layout in parts:
        names.extend(f"{label}.{name}" for name in layout.fields)
    return struct.Struct("<" + "".join(layout.fmt for _, layout in parts)), tuple(names)


# --- building dataclass instances ---------------------------------------------------------

_new = object.__new__


def _fields_of(cls: type) -> tuple[str, ...]:
    """The fields of `cls`, after checking that skipping its __init__ skips nothing."""
    if not dataclasses.is_dataclass(cls) or hasattr(cls, "__post_init__"):
        raise TypeError(f"{cls.__name__}: fast construction needs a plain dataclass")
    if "__slots__" in cls.__dict__:
        raise TypeError(f"{cls.__name__}: fast construction needs an instance __dict__")
    fields = dataclasses.fields(cls)
    if any(not f.init for f in fields):
        raise TypeError(f"{cls.__name__}: every field must be an init field")
    return tuple(f.name for f in fields)


def _generate(src: str, namespace: dict, name: str) -> Callable:
    namespace.update(_new=_new)
    exec(src, namespace)  # noqa: S102 - generated from field names only, as dataclasses does
    return namespace[name]


def _build_src(var: str, cls_ref: str, cls: type, sources: dict[str, str], indent: str = "    "
               ) -> str:
    """Source lines that set `var` to a `cls` whose field f holds the expression sources[f].

    Every field gets a source, set in the dataclass's own order: the instance
    is the one `cls(**values)` would build (equal, same hash, same repr)."""
    names = _fields_of(cls)
    if set(sources) != set(names):
        raise TypeError(f"{cls.__name__}: sources {sorted(sources)} != fields {sorted(names)}")
    lines = [f"{indent}{var} = _new({cls_ref})\n", f"{indent}_d = {var}.__dict__\n"]
    lines += [f"{indent}_d[{name!r}] = {sources[name]}\n" for name in names]
    return "".join(lines)


def maker(cls: type, sources: dict[str, str], args: tuple[str, ...]) -> Callable:
    """A function of `args` returning the `cls` of `_build_src`."""
    src = (f"def make({', '.join(args)}):\n" + _build_src("o", "_cls", cls, sources)
           + "    return o\n")
    return _generate(src, {"_cls": cls}, "make")


def _locals_for(names: tuple[str, ...]) -> dict[str, str]:
    """A local variable name for each value of a struct tuple."""
    return {name: f"v{i}" for i, name in enumerate(names)}


def _sources(cls: type, var: dict[str, str], label: str, extra: dict[str, str] | None = None,
             rename: dict[str, str] | None = None) -> dict[str, str]:
    """Field f of `cls` <- the value named f"{label}.{rename.get(f, f)}", or extra[f]."""
    extra, rename = extra or {}, rename or {}
    return {f: extra[f] if f in extra else var[f"{label}.{rename.get(f, f)}"]
            for f in _fields_of(cls)}


def _unpacker(cls: type, layout_label: str, layout: Layout) -> Callable:
    """`make(buf, offset)`: unpack one fixed layout and build `cls` from it (a nested
    `attr` field from the "attr." values)."""
    unpack, names = join((layout_label, layout))
    var = _locals_for(names)
    src = f"def make(buf, offset):\n    {', '.join(var.values())}, = _unpack(buf, offset)\n"
    extra = {}
    if "attr" in _fields_of(cls):
        src += _build_src("attr", "_Attr", Attr, _sources(Attr, var, f"{layout_label}.attr"))
        extra["attr"] = "attr"
    src += _build_src("o", "_cls", cls, _sources(cls, var, layout_label, extra)) + "    return o\n"
    return _generate(src, {"_cls": cls, "_Attr": Attr, "_unpack": unpack.unpack_from}, "make")


def _take(buf, start: int, end: int) -> bytes:
    """bytes of buf[start:end], copied once (a bytearray slice would copy twice)."""
    if type(buf) is bytes:
        return buf[start:end]
    with memoryview(buf) as view:
        return bytes(view[start:end])


# --- the layouts ---------------------------------------------------------------------------

HEADER = derive(wire.FrameHeader)
IN_HEADER = derive(fuse.FuseInHeader)
OUT_HEADER = derive(fuse.FuseOutHeader)
LEASE = derive(wire.LeaseTrailer)
NOTIFY = derive(wire.NotifyTrailer)
INVAL_INODE = derive(fuse.NotifyInvalInodeOut)
SEQ = derive(wire.AckPayload)

assert HEADER.fields == ("request", "flags", "size") and HEADER.size == wire.HEADER_SIZE
assert IN_HEADER.size == fuse.FUSE_IN_HEADER_SIZE and OUT_HEADER.size == fuse.FUSE_OUT_HEADER_SIZE
assert LEASE.size == wire.LEASE_TRAILER_SIZE and NOTIFY.size == wire.NOTIFY_TRAILER_SIZE
assert derive(wire.HeartbeatPayload) == SEQ and SEQ.fields == ("seq",) and SEQ.terminated
assert NOTIFY.terminated

FRAME_HEADER = struct.Struct("<" + HEADER.fmt)  # Connection reads every frame header with it
_OUT = struct.Struct("<" + OUT_HEADER.fmt)
_LEASE = struct.Struct("<" + LEASE.fmt)
_SEQ = struct.Struct("<" + SEQ.fmt)
_OPCODE = struct.Struct("<" + IN_HEADER.fmt[IN_HEADER.fields.index("opcode")])
_OPCODE_AT = IN_HEADER.offsets[IN_HEADER.fields.index("opcode")]
_IN_SIZE = IN_HEADER.size
assert OUT_HEADER.fields == ("len", "error", "unique")  # as _decode_fs_reply unpacks it

FLAGS_REQUEST = wire.PROTOCOL_VERSION | wire.FLAG_NEED_REPLY  # 0x9
FLAGS_REPLY = wire.PROTOCOL_VERSION | wire.FLAG_REPLY  # 0x5
FLAGS_NO_REPLY = wire.PROTOCOL_VERSION  # 0x1: FORGET
_FS = int(wire.Request.FS)
_INVALIDATE = int(wire.Request.INVALIDATE)
_INVAL_ENTRY = int(wire.Request.INVAL_ENTRY)
_HEARTBEAT = int(wire.Request.HEARTBEAT)
_INVAL_INODE_CODE = int(fuse.NotifyCode.INVAL_INODE)
_MAX_ERRNO = 4095  # as codec._MAX_ERRNO
assert codec._MAX_ERRNO == _MAX_ERRNO


def _header_expr(name: str, request: str, flags: str) -> str:
    return {"frame.request": request, "frame.flags": flags, "frame.size": "plen"}[name]


# --- FS requests: frame header + fuse_in_header + body, per hot opcode --------------------------

HOT_REQUESTS = {
    Opcode.READ: Read,
    Opcode.WRITE: Write,
    Opcode.LOOKUP: Lookup,
    Opcode.GETATTR: Getattr,
    Opcode.OPEN: Open,
    Opcode.RELEASE: Release,
    Opcode.FLUSH: Flush,
    Opcode.FSYNC: Fsync,
}
# Sent without NEED_REPLY.  FORGET is hot when a peer floods it (issue 13): the
# reference codec's construct parse cost most of what a failing FORGET costs.
HOT_NO_REPLY_REQUESTS = {
    Opcode.FORGET: Forget,
}


class _RequestCodec:
    """Decoding and encoding of the FS requests of one opcode."""

    def __init__(self, opcode: Opcode, cls: type, flags: int = FLAGS_REQUEST):
        ref_cls, schema = codec.REQUEST_BODIES[opcode]
        if ref_cls is not cls:
            raise TypeError(f"{opcode.name}: the reference codec maps it to {ref_cls.__name__}")
        body = derive(schema)
        if body.tail is None and not body.terminated:
            raise UnsupportedSchema(f"{opcode.name}: a fixed body must end with Terminated")
        self.payload, pnames = join(("in", IN_HEADER), ("body", body))
        self.fixed = self.payload.size  # payload bytes before the tail
        self.decode = self._decoder(cls, body, pnames)
        # Encoding: generated code over m (the FsRequest), op (m.op) and tail.
        whole, names = join(("frame", HEADER), ("in", IN_HEADER), ("body", body))
        computed = {"in.len": "plen", "in.opcode": str(int(opcode)), "in.total_extlen": "0",
                    "in.padding": "0"}
        if opcode == Opcode.WRITE:
            computed["body.size"] = "len(tail)"  # the reference sets it from the data too
        exprs = []
        for name in names:
            if name.startswith("frame."):
                exprs.append(_header_expr(name, str(_FS), str(flags)))
            elif name in computed:
                exprs.append(computed[name])
            elif name.startswith("in."):
                exprs.append(f"m.{name[3:]}")
            else:
                exprs.append(f"op.{name[5:]}")
        packed = f"_whole.pack({', '.join(exprs)})"
        if body.tail == "name":
            # codec._check_names: bytes without NUL (anything else: the reference decides)
            src = (f"    tail = op.{body.tail_field}\n"
                   f"    if type(tail) is not bytes or b'\\x00' in tail:\n"
                   f"        return None\n"
                   f"    plen = {self.fixed} + len(tail) + 1\n"
                   f"    return b''.join(({packed}, tail, b'\\x00'))\n")
        elif body.tail == "greedy":
            src = (f"    tail = op.{body.tail_field}\n"
                   f"    if type(tail) is not bytes:\n"
                   f"        return None\n"
                   f"    plen = {self.fixed} + len(tail)\n"
                   f"    return b''.join(({packed}, tail))\n")
        else:
            src = f"    plen = {self.fixed}\n    return {packed}\n"
        # Supplementary groups travel as an extension: the reference encodes them.
        src = "    if m.groups:\n        return None\n" + src
        self.encode = _generate("def encode(m, op):\n" + src, {"_whole": whole}, "encode")

    def _decoder(self, cls: type, body: Layout, pnames: tuple[str, ...]) -> Callable:
        """`decode(buf, start, n)`: the FsRequest in buf[start:start+n], or None (the
        reference must decide), as one generated function."""
        var = _locals_for(pnames)
        fixed = self.fixed
        lines = ["def decode(buf, start, n):\n"]
        if body.tail is None:
            lines.append(f"    if n != {fixed}:\n        return None\n")
        else:
            lines.append(f"    if n < {fixed}:\n        return None\n")
        lines.append(f"    {', '.join(var.values())}, = _unpack(buf, start)\n")
        lines.append(f"    if {var['in.len']} != n or {var['in.total_extlen']} != 0:\n"
                     f"        return None\n")
        extra = {}
        if body.tail == "name":
            # fuse.Name then Terminated: exactly one NUL, the payload's last byte
            lines.append(f"    end = start + n\n"
                         f"    if n == {fixed} or buf[end - 1] != 0 or "
                         f"buf.find(b'\\x00', start + {fixed}, end - 1) != -1:\n"
                         f"        return None\n"
                         f"    tail = _take(buf, start + {fixed}, end - 1)\n")
            extra[body.tail_field] = "tail"
        elif body.tail == "greedy":
            # WRITE: `size` must be the length of the data that follows
            lines.append(f"    if {var['body.size']} != n - {fixed}:\n        return None\n"
                         f"    tail = _take(buf, start + {fixed}, start + n)\n")
            extra[body.tail_field] = "tail"
        lines.append(_build_src("op", "_op", cls, _sources(cls, var, "body", extra)))
        lines.append(_build_src("m", "_FsRequest", FsRequest,
                                _sources(FsRequest, var, "in", {"op": "op", "groups": "()"})))
        lines.append("    return m\n")
        return _generate("".join(lines), {"_op": cls, "_FsRequest": FsRequest, "_take": _take,
                                          "_unpack": self.payload.unpack_from}, "decode")


_REQUESTS: dict[int, Callable] = {}  # opcode -> decode(buf, start, n), flags 0x9
_NO_REPLY_REQUESTS: dict[int, Callable] = {}  # the same for flags 0x1
_REQUEST_ENCODERS: dict[type, Callable] = {}  # op class -> encode(m, op)
for _opcode, _cls in HOT_REQUESTS.items():
    _c = _RequestCodec(_opcode, _cls)
    _REQUESTS[int(_opcode)], _REQUEST_ENCODERS[_cls] = _c.decode, _c.encode
for _opcode, _cls in HOT_NO_REPLY_REQUESTS.items():
    _c = _RequestCodec(_opcode, _cls, FLAGS_NO_REPLY)
    _NO_REPLY_REQUESTS[int(_opcode)], _REQUEST_ENCODERS[_cls] = _c.decode, _c.encode
del _c


# --- FS replies: frame header + fuse_out_header + body + lease trailer ---------------------------


class _ReplyBody:
    """Decoding and encoding of one fixed-size reply body type (None: no body)."""

    def __init__(self, cls: type, schema: Struct | None):
        layout = derive(schema) if schema is not None else None
        parts = [("frame", HEADER), ("out", OUT_HEADER)]
        if layout is not None:
            parts.append(("body", layout))
        parts.append(("lease", LEASE))
        whole, names = join(*parts)
        self.size = layout.size if layout else 0
        self.decode = _unpacker(cls, "body", layout) if layout is not None else None
        nested = layout is not None and "attr" in _fields_of(cls)
        exprs = []
        for name in names:
            if name.startswith("frame."):
                exprs.append(_header_expr(name, str(_FS), str(FLAGS_REPLY)))
            elif name.startswith("out."):
                exprs.append({"out.len": "flen", "out.error": "0", "out.unique": "m.unique"}[name])
            elif name.startswith("lease."):
                exprs.append(f"l.{name[6:]}")
            elif name.startswith("body.attr."):
                exprs.append(f"a.{name[10:]}")
            else:
                exprs.append(f"b.{name[5:]}")
        # codec._entry_dict / _attr_dict need a real Attr: anything else, the reference decides
        guard = ("    a = b.attr\n    if type(a) is not _Attr:\n        return None\n"
                 if nested else "")
        src = ("def encode(m, b, l):\n" + guard
               + f"    flen = {OUT_HEADER.size + self.size}\n"
               + f"    plen = {OUT_HEADER.size + self.size + LEASE.size}\n"
               + f"    return _whole.pack({', '.join(exprs)})\n")
        self.encode = _generate(src, {"_whole": whole, "_Attr": Attr}, "encode")


_BODIES: dict[type, _ReplyBody] = {
    EntryOut: _ReplyBody(EntryOut, fuse.EntryOut),
    AttrOut: _ReplyBody(AttrOut, fuse.AttrOut),
    OpenOut: _ReplyBody(OpenOut, fuse.OpenOut),
    WriteOut: _ReplyBody(WriteOut, fuse.WriteOut),
    EmptyOut: _ReplyBody(EmptyOut, None),
}
# Which body a successful reply carries is the reference codec's table.  CREATE and
# READDIR (cold, variable-length) are left to the reference.
_REPLY_KIND: dict[int, object] = {}
for _opcode, _cls in codec.REPLY_BODIES.items():
    if _cls is ReadOut or _cls in _BODIES:
        _REPLY_KIND[int(_opcode)] = ReadOut if _cls is ReadOut else _BODIES[_cls]
del _opcode, _cls

_EMPTY = EmptyOut()
_READ_PREFIX, _read_prefix_names = join(("frame", HEADER), ("out", OUT_HEADER))
assert _read_prefix_names == ("frame.request", "frame.flags", "frame.size", "out.len",
                              "out.error", "out.unique")  # as _encode_fs_reply packs it


def _reply_finisher() -> Callable:
    """`finish(unique, error, body, buf, offset)`: the FsReply, with the LeaseGrant unpacked
    from the trailer at buf[offset:], in one generated function."""
    unpack, names = join(("lease", LEASE))
    var = _locals_for(names)
    src = ("def finish(unique, error, body, buf, offset):\n"
           f"    {', '.join(var.values())}, = _unpack(buf, offset)\n"
           + _build_src("lease", "_LeaseGrant", LeaseGrant, _sources(LeaseGrant, var, "lease"))
           + _build_src("m", "_FsReply", FsReply, {f: f for f in _fields_of(FsReply)})
           + "    return m\n")
    return _generate(src, {"_unpack": unpack.unpack_from, "_LeaseGrant": LeaseGrant,
                           "_FsReply": FsReply}, "finish")


_finish_reply = _reply_finisher()
_make_read_out = maker(ReadOut, {"data": "data"}, ("data",))
_OUT_SIZE, _LEASE_SIZE = OUT_HEADER.size, LEASE.size
_MIN_REPLY = _OUT_SIZE + _LEASE_SIZE


def _decode_fs_reply(buf, start: int, n: int, reply_opcode):
    if n < _MIN_REPLY:
        return None
    flen, error, unique = _OUT.unpack_from(buf, start)
    if flen != n - _LEASE_SIZE or not -_MAX_ERRNO <= error <= 0:
        return None
    opcode = reply_opcode(unique)
    if opcode is None:
        return None
    if error:
        if flen != _OUT_SIZE:
            return None
        body = _EMPTY
    else:
        kind = _REPLY_KIND.get(opcode)
        if kind is None:
            return None
        if kind is ReadOut:
            body = _make_read_out(_take(buf, start + _OUT_SIZE, start + flen))
        elif flen - _OUT_SIZE != kind.size:
            return None
        elif kind.decode is None:
            body = _EMPTY
        else:
            body = kind.decode(buf, start + _OUT_SIZE)
    return _finish_reply(unique, error, body, buf, start + flen)


def _encode_fs_reply(m):
    lease, body, error = m.lease, m.body, m.error
    if type(lease) is not LeaseGrant or type(error) is not int:
        return None
    if error:
        if type(body) is not EmptyOut or not -_MAX_ERRNO <= error < 0:
            return None
        return _error_reply(m, error, lease)
    if type(body) is ReadOut:
        data = body.data
        if type(data) is not bytes:
            return None  # the reference takes bytes(data) of anything: let it
        flen = _OUT_SIZE + len(data)
        return b"".join((
            _READ_PREFIX.pack(_FS, FLAGS_REPLY, flen + _LEASE_SIZE, flen, 0, m.unique),
            data,
            _LEASE.pack(lease.ino, lease.generation, lease.term_ms, lease.flags)))
    kind = _BODIES.get(type(body))
    return None if kind is None else kind.encode(m, body, lease)


_ERROR_FRAME, _error_names = join(("frame", HEADER), ("out", OUT_HEADER), ("lease", LEASE))
_error_reply = _generate(
    "def error_reply(m, error, l):\n    return _whole.pack("
    + ", ".join({"frame.request": str(_FS), "frame.flags": str(FLAGS_REPLY),
                 "frame.size": str(_OUT_SIZE + _LEASE_SIZE), "out.len": str(_OUT_SIZE),
                 "out.error": "error", "out.unique": "m.unique"}.get(name, f"l.{name[6:]}")
                for name in _error_names) + ")\n",
    {"_whole": _ERROR_FRAME}, "error_reply")


# --- INVALIDATE, ACK, HEARTBEAT ------------------------------------------------------------------

_INVAL, _inval_names = join(("out", OUT_HEADER), ("body", INVAL_INODE), ("notify", NOTIFY))
_INVAL_FRAME, _inval_frame_names = join(("frame", HEADER), ("out", OUT_HEADER),
                                        ("body", INVAL_INODE), ("notify", NOTIFY))
_INVAL_FUSE_LEN = OUT_HEADER.size + INVAL_INODE.size  # fuse_out_header.len: no trailer
_I_LEN, _I_ERROR, _I_UNIQUE = (_inval_names.index(f"out.{f}") for f in ("len", "error", "unique"))
_make_invalidate = maker(Invalidate, {
    "seq": f"v[{_inval_names.index('notify.seq')}]",
    "ino": f"v[{_inval_names.index('body.ino')}]",
    "offset": f"v[{_inval_names.index('body.off')}]",
    "length": f"v[{_inval_names.index('body.len')}]",
    "generation": f"v[{_inval_names.index('notify.generation')}]"}, ("v",))
_encode_invalidate = _generate(
    "def encode(m):\n    return _whole.pack("
    + ", ".join({"frame.request": str(_INVALIDATE), "frame.flags": str(FLAGS_REQUEST),
                 "frame.size": str(_INVAL.size), "out.len": str(_INVAL_FUSE_LEN),
                 "out.error": str(_INVAL_INODE_CODE), "out.unique": "0", "body.ino": "m.ino",
                 "body.off": "m.offset", "body.len": "m.length", "notify.seq": "m.seq",
                 "notify.generation": "m.generation"}[name] for name in _inval_frame_names)
    + ")\n", {"_whole": _INVAL_FRAME}, "encode")

_SEQ_FRAME, _seq_names = join(("frame", HEADER), ("seq", SEQ))
assert _seq_names == ("frame.request", "frame.flags", "frame.size", "seq.seq")
_make_ack = maker(Ack, {"seq": "seq"}, ("seq",))
_make_heartbeat = maker(Heartbeat, {"seq": "seq"}, ("seq",))


def _decode_invalidate(buf, start: int, n: int):
    if n != _INVAL.size:
        return None
    v = _INVAL.unpack_from(buf, start)
    if v[_I_LEN] != _INVAL_FUSE_LEN or v[_I_ERROR] != _INVAL_INODE_CODE or v[_I_UNIQUE] != 0:
        return None
    return _make_invalidate(v)


# --- the entry points -----------------------------------------------------------------------------


def decode(request: int, flags: int, buf, start: int, n: int,
           reply_opcode: Callable[[int], int | None]):
    """The message in buf[start:start+n] (one frame's payload; buf is bytes or a
    bytearray), or None: then `codec.decode_payload` must decide.

    `reply_opcode` is as for `codec.decode_payload`.  Returns a message only
    where the reference codec would return an equal one.
    """
    if request == _FS:
        if flags == FLAGS_REQUEST or flags == FLAGS_NO_REPLY:
            if n < _IN_SIZE:
                return None
            decoders = _REQUESTS if flags == FLAGS_REQUEST else _NO_REPLY_REQUESTS
            decoder = decoders.get(_OPCODE.unpack_from(buf, start + _OPCODE_AT)[0])
            return None if decoder is None else decoder(buf, start, n)
        if flags == FLAGS_REPLY:
            return _decode_fs_reply(buf, start, n, reply_opcode)
        return None
    if n != _SEQ.size:
        if request == _INVALIDATE and flags == FLAGS_REQUEST:
            return _decode_invalidate(buf, start, n)
        return None
    if request == _HEARTBEAT:
        # (A HEARTBEAT reply, 16 bytes, is left to the reference codec: it is not hot.)
        if flags == FLAGS_REQUEST:
            return _make_heartbeat(_SEQ.unpack_from(buf, start)[0])
    elif (request == _INVALIDATE or request == _INVAL_ENTRY) and flags == FLAGS_REPLY:
        return _make_ack(_SEQ.unpack_from(buf, start)[0])
    return None


_IN = struct.Struct("<" + IN_HEADER.fmt)
_IN_FIELD = {name: i for i, name in enumerate(IN_HEADER.fields)}
_KNOWN_OPCODES = frozenset(int(op) for op in codec.REQUEST_BODIES)


def unsupported_request(request: int, flags: int, buf, start: int, n: int):
    """(unique, opcode) if buf[start:start+n] is an FS request that the reference
    codec refuses with `codec.UnsupportedOpcode` (a well-formed fuse_in_header,
    an opcode it does not know), else None: then the reference decides.  A
    flood of unknown opcodes (issue 13) costs a struct unpack each, not a
    construct parse and its exception."""
    if request != _FS or (flags != FLAGS_REQUEST and flags != FLAGS_NO_REPLY) or n < _IN_SIZE:
        return None
    fields = _IN.unpack_from(buf, start)
    if (fields[_IN_FIELD["len"]] != n or fields[_IN_FIELD["total_extlen"]] != 0
            or fields[_IN_FIELD["opcode"]] in _KNOWN_OPCODES):
        return None
    return fields[_IN_FIELD["unique"]], fields[_IN_FIELD["opcode"]]


def encode_frame(message) -> bytes | None:
    """The whole frame (12-byte header and payload) of `message`, or None: then
    `codec.encode_payload` must decide.  Bytes only where the reference builds the same."""
    cls = type(message)
    try:
        if cls is FsRequest:
            op = message.op
            encoder = _REQUEST_ENCODERS.get(type(op))
            return None if encoder is None else encoder(message, op)
        if cls is FsReply:
            return _encode_fs_reply(message)
        if cls is Invalidate:
            return _encode_invalidate(message)
        if cls is Heartbeat:
            return _SEQ_FRAME.pack(_HEARTBEAT, FLAGS_REQUEST, _SEQ.size, message.seq)
    except struct.error:
        pass  # a field out of range or of the wrong type: the reference says which
    return None


def encode_ack_frame(message: Ack, request: int) -> bytes | None:
    """The frame of an ACK answering an invalidation that came with `request`, or None."""
    if type(message) is not Ack:
        return None
    try:
        return _SEQ_FRAME.pack(request, FLAGS_REPLY, _SEQ.size, message.seq)
    except struct.error:
        return None
