"""The mount's hot FUSE structures through `struct` instead of construct.

`protocol/fuse.py` defines every structure once, with construct; parsing or
building one of them that way costs 15-25 µs here, three to five times per
kernel request (fuse_in_header, the request's body, fuse_out_header, the
reply's body).  This module derives a `struct` format from each of the hot
ones (`fastcodec.derive`, which checks each format's size against the schema)
and offers the same results:

* `parse_in_header(buf)`: a `InHeader` named tuple with the fields of
  `fuse.FuseInHeader` (attribute access, as construct's Container);
* `parse(schema, body)`: a named tuple of a fixed-size, `Terminated` request
  body; a body of another length goes to `schema.parse`, which raises as
  before (construct's own errors);
* `write_in(body)`: fuse_write_in and its data (bytes, copied once);
* `lookup_name(body)`: the name of a LOOKUP (falls back to construct on
  anything but "name, then one NUL");
* `out_header`, `entry_out`, `attr_out`, `open_out`, `write_out`: the bytes
  `Struct.build` would give (tests/test_fusefast.py checks both agree).

Values out of range raise `struct.error` where construct raised its own
error; the mount answers EIO for either.
"""

from __future__ import annotations

import struct
from collections import namedtuple

from protocol import fuse
from protocol.fastcodec import derive

_IN = derive(fuse.FuseInHeader)
_IN_STRUCT = struct.Struct("<" + _IN.fmt)
InHeader = namedtuple("InHeader", _IN.fields)
IN_HEADER_SIZE = _IN.size
assert IN_HEADER_SIZE == fuse.FUSE_IN_HEADER_SIZE


def parse_in_header(buf) -> InHeader:
    """fuse_in_header at the start of `buf` (at least 40 bytes, else struct.error)."""
    return InHeader._make(_IN_STRUCT.unpack_from(buf, 0))


_OUT = derive(fuse.FuseOutHeader)
assert _OUT.fields == ("len", "error", "unique")
_OUT_PACK = struct.Struct("<" + _OUT.fmt).pack
OUT_HEADER_SIZE = _OUT.size


def out_header(unique: int, error: int, body_len: int) -> bytes:
    return _OUT_PACK(OUT_HEADER_SIZE + body_len, error, unique)


class _Fixed:
    """One fixed-size, Terminated request body."""

    __slots__ = ("schema", "size", "unpack", "tuple")

    def __init__(self, schema, name: str):
        layout = derive(schema)
        if layout.tail is not None or not layout.terminated:
            raise TypeError(f"{name}: not a fixed-size, Terminated body")
        self.schema = schema
        self.size = layout.size
        self.unpack = struct.Struct("<" + layout.fmt).unpack
        self.tuple = namedtuple(name, layout.fields)


_FIXED = {id(schema): _Fixed(schema, name) for name, schema in (
    ("ReadIn", fuse.ReadIn), ("GetattrIn", fuse.GetattrIn), ("OpenIn", fuse.OpenIn),
    ("ReleaseIn", fuse.ReleaseIn), ("FlushIn", fuse.FlushIn), ("FsyncIn", fuse.FsyncIn),
    ("ForgetIn", fuse.ForgetIn))}


def parse(schema, body):
    """`schema.parse(bytes(body))` for the hot fixed-size bodies, through struct."""
    fixed = _FIXED.get(id(schema))
    if fixed is None or len(body) != fixed.size:
        return schema.parse(bytes(body))
    return fixed.tuple._make(fixed.unpack(body))


_WRITE = derive(fuse.WriteIn)
assert _WRITE.tail == "greedy" and _WRITE.tail_field == "data"
_WRITE_UNPACK = struct.Struct("<" + _WRITE.fmt).unpack_from
WriteIn = namedtuple("WriteIn", _WRITE.fields + ("data",))


def write_in(body) -> WriteIn:
    """fuse_write_in and the data after it (bytes)."""
    if len(body) < _WRITE.size:
        return fuse.WriteIn.parse(bytes(body))  # raises as construct does
    return WriteIn._make(_WRITE_UNPACK(body, 0) + (bytes(body[_WRITE.size:]),))


def lookup_name(body) -> bytes:
    """The name of a LOOKUP: the body is the name and one NUL."""
    end = len(body) - 1
    if end >= 0 and body[end] == 0:
        name = bytes(body[:end])
        if b"\x00" not in name:
            return name
    return fuse.LookupIn.parse(bytes(body)).name


_ATTR = derive(fuse.FuseAttr)
_ATTR_FIELDS = _ATTR.fields
_ENTRY = derive(fuse.EntryOut)
_ENTRY_PACK = struct.Struct("<" + _ENTRY.fmt).pack
assert _ENTRY.fields[:6] == ("nodeid", "generation", "entry_valid", "attr_valid",
                             "entry_valid_nsec", "attr_valid_nsec")
assert _ENTRY.fields[6:] == tuple("attr." + f for f in _ATTR_FIELDS)
_ATTR_OUT = derive(fuse.AttrOut)
_ATTR_OUT_PACK = struct.Struct("<" + _ATTR_OUT.fmt).pack
assert _ATTR_OUT.fields == ("attr_valid", "attr_valid_nsec") + tuple("attr." + f
                                                                     for f in _ATTR_FIELDS)


def _attr_values(attr) -> tuple:
    """The fuse_attr values of a `messages.Attr` (same field names), in ABI order."""
    d = attr.__dict__
    return tuple(d[f] for f in _ATTR_FIELDS)


def entry_out(nodeid: int, generation: int, entry_valid: int, attr_valid: int,
              entry_valid_nsec: int, attr_valid_nsec: int, attr) -> bytes:
    return _ENTRY_PACK(nodeid, generation, entry_valid, attr_valid, entry_valid_nsec,
                       attr_valid_nsec, *_attr_values(attr))


def attr_out(attr_valid: int, attr_valid_nsec: int, attr) -> bytes:
    return _ATTR_OUT_PACK(attr_valid, attr_valid_nsec, *_attr_values(attr))


_OPEN = derive(fuse.OpenOut)
assert _OPEN.fields == ("fh", "open_flags", "backing_id")
_OPEN_PACK = struct.Struct("<" + _OPEN.fmt).pack


def open_out(fh: int, open_flags: int, backing_id: int = 0) -> bytes:
    return _OPEN_PACK(fh, open_flags, backing_id)


_WRITE_OUT = derive(fuse.WriteOut)
assert _WRITE_OUT.fields == ("size",)
_WRITE_OUT_PACK = struct.Struct("<" + _WRITE_OUT.fmt).pack


def write_out(size: int) -> bytes:
    return _WRITE_OUT_PACK(size)
