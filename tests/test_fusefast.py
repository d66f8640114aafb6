"""protocol/fusefast.py gives what construct gives (protocol/fuse.py), for every
hot FUSE structure of the mount: random bodies parsed, random values built."""

from __future__ import annotations

import construct
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import fuse, fusefast
from protocol.messages import Attr

u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)
FIXED = (fuse.ReadIn, fuse.GetattrIn, fuse.OpenIn, fuse.ReleaseIn, fuse.FlushIn, fuse.FsyncIn,
         fuse.ForgetIn)


def _plain(container) -> dict:
    return {k: v for k, v in dict(container).items() if not k.startswith("_")}


@settings(max_examples=80, deadline=None)
@given(st.binary(min_size=40, max_size=64))
def test_in_header_agrees(buf):
    fast = fusefast.parse_in_header(buf)
    assert fast._asdict() == _plain(fuse.FuseInHeader.parse(buf[:40]))


@settings(max_examples=120, deadline=None)
@given(st.sampled_from(FIXED), st.data())
def test_fixed_bodies_agree_at_any_length(schema, data):
    size = fusefast._FIXED[id(schema)].size
    body = data.draw(st.binary(min_size=max(0, size - 2), max_size=size + 2))
    try:
        expected = _plain(schema.parse(body))
    except construct.ConstructError as exc:
        with pytest.raises(type(exc)):
            fusefast.parse(schema, memoryview(body))
        return
    assert fusefast.parse(schema, memoryview(body))._asdict() == expected


@settings(max_examples=80, deadline=None)
@given(st.binary(max_size=80))
def test_write_in_agrees(body):
    try:
        expected = _plain(fuse.WriteIn.parse(body))
    except construct.ConstructError as exc:
        with pytest.raises(type(exc)):
            fusefast.write_in(memoryview(body))
        return
    got = fusefast.write_in(memoryview(body))
    assert type(got.data) is bytes and got._asdict() == expected


@settings(max_examples=120, deadline=None)
@given(st.one_of(st.binary(max_size=12),
                 st.binary(min_size=1, max_size=12).map(lambda b: b.replace(b"\0", b"a") + b"\0")))
def test_lookup_name_agrees(body):
    try:
        expected = fuse.LookupIn.parse(body).name
    except construct.ConstructError as exc:
        with pytest.raises(type(exc)):
            fusefast.lookup_name(memoryview(body))
        return
    assert fusefast.lookup_name(memoryview(body)) == expected


attrs = st.builds(Attr, u64, u64, u64, u64, u64, u64, u32, u32, u32, u32, u32, u32, u32, u32,
                  u32, u32)


@settings(max_examples=80, deadline=None)
@given(u64, u64, u64, u64, u32, u32, attrs)
def test_entry_and_attr_out_agree(nodeid, gen, ev, av, evn, avn, attr):
    as_dict = dict(attr.__dict__)
    assert fusefast.entry_out(nodeid, gen, ev, av, evn, avn, attr) == fuse.EntryOut.build(
        {"nodeid": nodeid, "generation": gen, "entry_valid": ev, "attr_valid": av,
         "entry_valid_nsec": evn, "attr_valid_nsec": avn, "attr": as_dict})
    assert fusefast.attr_out(av, avn, attr) == fuse.AttrOut.build(
        {"attr_valid": av, "attr_valid_nsec": avn, "attr": as_dict})


@settings(max_examples=100, deadline=None)
@given(u64, u32, st.integers(-2**31, 2**31 - 1), st.integers(-4095, 0), st.integers(0, 1 << 20))
def test_small_replies_agree(fh, flags, backing, error, length):
    assert fusefast.open_out(fh, flags, backing) == fuse.OpenOut.build(
        {"fh": fh, "open_flags": flags, "backing_id": backing})
    assert fusefast.write_out(flags) == fuse.WriteOut.build({"size": flags})
    assert fusefast.out_header(fh, error, length) == fuse.FuseOutHeader.build(
        {"len": 16 + length, "error": error, "unique": fh})


def test_out_of_range_values_raise():
    with pytest.raises(Exception):
        fusefast.write_out(-1)
    with pytest.raises(Exception):
        fusefast.open_out(2**64, 0)
