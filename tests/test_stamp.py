"""Stamped blocks: a whole block parses back to its stamp, anything else is
refused with the right kind."""

import pickle

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from workload.stamp import BLOCK_SIZE, MAGIC, CorruptBlock, Stamp, make_block, parse_block

u64 = st.integers(min_value=0, max_value=2**64 - 1)
stamps = st.builds(Stamp, u64, u64, u64, u64, u64)


@given(stamps)
def test_round_trip(stamp: Stamp) -> None:
    block = make_block(stamp)
    assert len(block) == BLOCK_SIZE
    assert block.startswith(MAGIC)
    assert parse_block(block) == stamp
    assert parse_block(bytearray(block)) == stamp
    assert parse_block(memoryview(block)) == stamp


def test_make_block_is_deterministic() -> None:
    stamp = Stamp(3, 7, 2, 41, 123_456_789)
    assert make_block(stamp) == make_block(Stamp(3, 7, 2, 41, 123_456_789))


def test_initial_stamp() -> None:
    stamp = Stamp.initial(5, 9)
    assert stamp == Stamp(5, 9, 0, 0, 0)
    assert stamp.is_initial
    assert not Stamp(5, 9, 1, 0, 0).is_initial
    assert parse_block(make_block(stamp)).is_initial


def test_torn_block_fails_checksum() -> None:
    old = make_block(Stamp(1, 4, 2, 10, 1_000))
    new = make_block(Stamp(1, 4, 3, 11, 2_000))
    half = BLOCK_SIZE // 2
    for torn in (old[:half] + new[half:], new[:half] + old[half:]):
        with pytest.raises(CorruptBlock) as info:
            parse_block(torn)
        assert info.value.kind == "checksum"


@given(stamps, stamps, st.integers(min_value=1, max_value=BLOCK_SIZE - 1))
def test_torn_anywhere_fails_checksum(a: Stamp, b: Stamp, cut: int) -> None:
    first, second = make_block(a), make_block(b)
    torn = first[:cut] + second[cut:]
    # A cut past the last differing byte leaves a whole block, not a torn one.
    assume(torn != first and torn != second)
    with pytest.raises(CorruptBlock) as info:
        parse_block(torn)
    assert info.value.kind == "checksum"


def test_flipped_bit_fails_checksum() -> None:
    block = bytearray(make_block(Stamp(1, 2, 3, 4, 5)))
    block[3000] ^= 0x10
    with pytest.raises(CorruptBlock) as info:
        parse_block(block)
    assert info.value.kind == "checksum"


def test_zero_block() -> None:
    with pytest.raises(CorruptBlock) as info:
        parse_block(bytes(BLOCK_SIZE))
    assert info.value.kind == "zero"
    assert isinstance(info.value, ValueError)


def test_bad_magic() -> None:
    block = bytearray(make_block(Stamp(1, 2, 3, 4, 5)))
    block[0] ^= 0xFF
    with pytest.raises(CorruptBlock) as info:
        parse_block(block)
    assert info.value.kind == "magic"

    # A zeroed header over a non-zero tail is not a hole.
    block[: len(MAGIC)] = bytes(len(MAGIC))
    with pytest.raises(CorruptBlock) as info:
        parse_block(block)
    assert info.value.kind == "magic"


@pytest.mark.parametrize("length", [0, 1, BLOCK_SIZE // 2, BLOCK_SIZE - 1, BLOCK_SIZE + 1])
def test_wrong_length(length: int) -> None:
    block = (make_block(Stamp(1, 2, 3, 4, 5)) * 2)[:length]
    with pytest.raises(CorruptBlock) as info:
        parse_block(block)
    assert info.value.kind == "length"


def test_short_zero_block_is_length_not_zero() -> None:
    with pytest.raises(CorruptBlock) as info:
        parse_block(bytes(100))
    assert info.value.kind == "length"


def test_corrupt_block_message_and_pickle() -> None:
    error = CorruptBlock("checksum", "crc mismatch")
    assert str(error) == "checksum: crc mismatch"
    again = pickle.loads(pickle.dumps(error))
    assert again.kind == "checksum" and again.detail == "crc mismatch"


@pytest.mark.parametrize(
    "fields",
    [(-1, 0, 0, 0, 0), (0, 2**64, 0, 0, 0), (0, 0, True, 0, 0), (0, 0, 0, 1.0, 0)],
)
def test_stamp_rejects_out_of_range(fields: tuple) -> None:
    with pytest.raises(ValueError):
        Stamp(*fields)
