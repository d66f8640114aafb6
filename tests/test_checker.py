"""The operation log, the stale-read checker and the oracle, on hand-made
histories whose right answer is known, and against a brute-force checker on
random ones."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from workload.checker import MAX_EXAMPLES, check
from workload.oplog import (
    LogFormatError,
    LogWriter,
    ReadRecord,
    WriteRecord,
    parse_record,
    read_logs,
)
from workload.oracle import oracle
from workload.stamp import BLOCK_SIZE

# --- helpers -----------------------------------------------------------------

_ops: dict[str, int] = {}


def w(start: int, end: int, writer: int, seq: int, *, block: int = 0, actor: str = "hostw",
      file_id: int = 1, via: str = "host-local") -> WriteRecord:
    return WriteRecord(actor, file_id, block, writer, seq, start, end, None, via)


def r(start: int, end: int, writer: int, seq: int, *, block: int = 0, actor: str = "g1",
      file_id: int = 1, op: int | None = None, corrupt: str | None = None) -> ReadRecord:
    if op is None:  # a fresh op per read unless the test groups blocks itself
        op = _ops[actor] = _ops.get(actor, 0) + 1
    return ReadRecord(actor, file_id, block, writer, seq, start, end, False, op, corrupt)


def is_clean(result) -> bool:
    return result.stale_reads == 0 and result.phantom == 0 and not result.corrupt


# --- oplog -------------------------------------------------------------------

def test_records_round_trip_through_json() -> None:
    write = WriteRecord("g1", 3, 4, 7, 8, 100, 200, True, "guest")
    read = ReadRecord("g2", 3, 4, -1, -1, 150, 160, False, 9, "zero")
    assert WriteRecord.from_json(write.to_json()) == write
    assert ReadRecord.from_json(read.to_json()) == read
    assert parse_record(write.to_json()) == write
    assert "\n" not in write.to_json()
    with pytest.raises(LogFormatError):
        ReadRecord.from_json(write.to_json())


@pytest.mark.parametrize(
    "line",
    ["", "{", "[]", "3", '{"type":"nope"}', '{"type":"read","actor":"g"}',
     WriteRecord("g", 1, 1, 1, 1, 1, 2, None, "guest").to_json()[:-1]],
)
def test_bad_lines_are_refused(line: str) -> None:
    with pytest.raises(LogFormatError):
        parse_record(line)


def test_records_check_their_fields() -> None:
    with pytest.raises(ValueError):
        WriteRecord("g", 1, 1, 1, 1, 0, 1, None, "carrier-pigeon")
    with pytest.raises(ValueError):
        ReadRecord("g", 1, 1, 1, 1, 5, 4, False, 1, None)


def test_logs_merge_sorted_by_start(tmp_path) -> None:
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    with LogWriter(a) as log:
        log.write(w(10, 20, 1, 1))
        log.write(w(30, 40, 1, 2))
    with LogWriter(b) as log:
        log.write(r(5, 6, 0, 0))
        log.write(r(30, 31, 1, 1))
    records = read_logs([a, b])
    assert [x.start_ns for x in records] == [5, 10, 30, 30]
    # Ties keep the order of the paths.
    assert isinstance(records[2], WriteRecord) and isinstance(records[3], ReadRecord)


def test_read_logs_names_the_bad_line(tmp_path) -> None:
    path = tmp_path / "torn.jsonl"
    path.write_text(w(1, 2, 1, 1).to_json() + "\n" + '{"type":"wri')
    with pytest.raises(LogFormatError, match="torn.jsonl:2"):
        read_logs([path])


# --- checker: hand-made histories ---------------------------------------------

def test_a_initial_version_after_a_finished_write_is_stale() -> None:
    result = check([w(100, 200, 1, 1), r(250, 260, 0, 0)])
    assert result.stale_reads == 1 and result.stale_ops == 1
    assert result.worst_stale_age_ns == 50
    (example,) = result.examples
    assert example.age_ns == 50
    assert example.version is None
    assert (example.overwrite.writer, example.overwrite.seq) == (1, 1)


def test_read_at_the_instant_a_write_ends_may_return_old() -> None:
    assert is_clean(check([w(100, 200, 1, 1), r(200, 210, 0, 0)]))


def test_write_starting_at_zero_does_not_overwrite_the_initial_version() -> None:
    # The initial version "ends" at 0; only a write starting after it counts.
    assert is_clean(check([w(0, 10, 1, 1), r(20, 30, 0, 0)]))


@pytest.mark.parametrize("read", [(150, 180), (50, 150), (50, 300), (120, 250)])
def test_b_read_overlapping_a_write_may_return_old(read) -> None:
    assert is_clean(check([w(100, 200, 1, 1), r(*read, 0, 0)]))


@pytest.mark.parametrize("read", [(150, 180), (50, 150), (50, 300), (120, 250), (300, 310)])
def test_c_read_overlapping_or_after_a_write_may_return_new(read) -> None:
    assert is_clean(check([w(100, 200, 1, 1), r(*read, 1, 1)]))


@pytest.mark.parametrize("version", [(1, 1), (2, 1)])
def test_d_overlapping_writes_either_may_win(version) -> None:
    history = [w(100, 200, 1, 1), w(150, 250, 2, 1, actor="g2", via="guest")]
    assert is_clean(check([*history, r(300, 310, *version)]))


def test_e_sequential_writes_then_read_of_the_first_is_stale() -> None:
    result = check([w(100, 200, 1, 1), w(300, 400, 1, 2), r(1000, 1010, 1, 1)])
    assert result.stale_reads == 1
    assert result.worst_stale_age_ns == 600
    # ... and the initial version is stale too, aged by the FIRST overwrite.
    result = check([w(100, 200, 1, 1), w(300, 400, 1, 2), r(1000, 1010, 0, 0)])
    assert result.worst_stale_age_ns == 800
    assert result.examples[0].overwrite.seq == 1


def test_stale_is_per_block() -> None:
    result = check([w(100, 200, 1, 1, block=0), r(300, 310, 0, 0, block=1)])
    assert is_clean(result)
    result = check([w(100, 200, 1, 1, file_id=1), r(300, 310, 0, 0, file_id=2)])
    assert is_clean(result)


def test_version_written_twice_is_judged_by_its_last_write() -> None:
    history = [w(100, 200, 1, 1), w(300, 400, 2, 1), w(500, 600, 1, 1)]
    assert is_clean(check([*history, r(700, 710, 1, 1)]))
    assert check([*history, r(700, 710, 2, 1)]).stale_reads == 1


def test_f_phantom() -> None:
    result = check([w(100, 200, 1, 1), r(300, 310, 1, 2), r(300, 310, 7, 7, block=5)])
    assert result.phantom == 2
    assert result.stale_reads == 0


def test_future_version_is_counted() -> None:
    result = check([w(500, 600, 1, 1), r(100, 200, 1, 1)])
    assert result.future == 1 and not result.ok


def test_g_corrupt() -> None:
    result = check([
        w(100, 200, 1, 1),
        r(300, 310, -1, -1, corrupt="checksum"),
        r(300, 310, -1, -1, corrupt="checksum"),
        r(300, 310, -1, -1, corrupt="zero"),
    ])
    assert result.corrupt == {"checksum": 2, "zero": 1}
    assert result.reads == 3 and result.stale_reads == 0 and result.phantom == 0
    assert not result.ok


def test_h_per_actor_counts() -> None:
    records = [
        w(100, 200, 1, 1),
        w(300, 400, 1, 2),
        # g1: one op of two blocks, one of them stale; one clean op.
        r(500, 510, 0, 0, actor="g1", op=1, block=0),
        r(500, 510, 0, 0, actor="g1", op=1, block=1),
        r(600, 610, 1, 2, actor="g1", op=2),
        # g2: two stale ops, one phantom, one corrupt.
        r(450, 460, 1, 1, actor="g2", op=1),
        r(700, 710, 0, 0, actor="g2", op=2),
        r(700, 710, 9, 9, actor="g2", op=3),
        r(700, 710, -1, -1, actor="g2", op=4, corrupt="magic"),
    ]
    result = check(records)
    g1, g2 = result.per_actor["g1"], result.per_actor["g2"]
    assert set(result.per_actor) == {"g1", "g2"}
    assert (g1.reads, g1.read_ops, g1.stale_reads, g1.stale_ops) == (3, 2, 1, 1)
    assert g1.worst_stale_age_ns == 300 and g1.phantom == 0 and g1.corrupt == {}
    assert (g2.reads, g2.read_ops, g2.stale_reads, g2.stale_ops) == (4, 4, 2, 2)
    assert g2.worst_stale_age_ns == 500 and g2.phantom == 1 and g2.corrupt == {"magic": 1}
    assert (result.reads, result.read_ops, result.stale_reads, result.stale_ops) == (7, 6, 3, 3)
    assert result.worst_stale_age_ns == 500
    assert [e.age_ns for e in result.examples] == [500, 300, 50]


def test_examples_keep_the_worst() -> None:
    reads = [r(1000 + i, 1000 + i, 0, 0) for i in range(3 * MAX_EXAMPLES)]
    result = check([w(10, 20, 1, 1), *reads])
    assert result.stale_reads == 3 * MAX_EXAMPLES
    ages = [e.age_ns for e in result.examples]
    assert ages == sorted(range(980, 980 + 3 * MAX_EXAMPLES), reverse=True)[:MAX_EXAMPLES]


def test_empty_log() -> None:
    result = check([])
    assert result.reads == 0 and result.ok and result.examples == ()


def test_check_refuses_other_objects() -> None:
    with pytest.raises(TypeError):
        check([object()])


# --- checker against a brute-force reference --------------------------------

def brute_force(writes: list[WriteRecord], read: ReadRecord) -> tuple[str, int]:
    """Classify one read straight from the definition, in O(writes^2)."""
    if read.corrupt is not None:
        return "corrupt", 0
    same_block = [x for x in writes if (x.file_id, x.block) == (read.file_id, read.block)]
    instances = [(x.start_ns, x.end_ns) for x in same_block if (x.writer, x.seq) == (read.writer, read.seq)]
    if not instances:
        if (read.writer, read.seq) != (0, 0):
            return "phantom", 0
        instances = [(0, 0)]
    if min(start for start, _ in instances) > read.end_ns:
        return "future", 0
    # w2 overwrites an instance when it starts after the instance ends and
    # ends before the read starts. The read is stale when some w2 overwrites
    # every write of the version it returned.
    overwriting = [
        x.end_ns for x in same_block
        if x.end_ns < read.start_ns and all(end < x.start_ns for _, end in instances)
    ]
    if overwriting:
        return "stale", read.start_ns - min(overwriting)
    return "ok", 0


times = st.integers(min_value=0, max_value=60)
durations = st.integers(min_value=0, max_value=15)
versions = st.tuples(st.integers(0, 2), st.integers(0, 2))  # small, so versions repeat


@st.composite
def histories(draw):
    writes = []
    for _ in range(draw(st.integers(0, 8))):
        start, length, (writer, seq) = draw(times), draw(durations), draw(versions)
        writes.append(w(start, start + length, writer, seq, block=draw(st.integers(0, 1))))
    reads = []
    for i in range(draw(st.integers(1, 8))):
        start, length, (writer, seq) = draw(times), draw(durations), draw(versions)
        corrupt = draw(st.sampled_from([None, None, None, None, "checksum"]))
        if corrupt:
            writer = seq = -1
        # One actor per read, so per_actor gives each read's verdict.
        reads.append(ReadRecord(f"r{i}", 1, draw(st.integers(0, 1)), writer, seq,
                                start, start + length, False, 0, corrupt))
    return writes, reads


@settings(max_examples=500, deadline=None)
@given(histories())
def test_check_matches_brute_force(history) -> None:
    writes, reads = history
    result = check([*reads, *writes])
    expected_ages = []
    for read in reads:
        verdict, age = brute_force(writes, read)
        counts = result.per_actor[read.actor]
        got = {
            "corrupt": sum(counts.corrupt.values()),
            "phantom": counts.phantom,
            "future": counts.future,
            "stale": counts.stale_reads,
        }
        assert got == {k: int(k == verdict) for k in got}, (verdict, read)
        assert counts.worst_stale_age_ns == age
        if verdict == "stale":
            expected_ages.append(age)
    assert result.stale_reads == len(expected_ages)
    assert result.worst_stale_age_ns == max(expected_ages, default=0)
    assert sorted(e.age_ns for e in result.examples) == sorted(expected_ages)[-MAX_EXAMPLES:]
    for example in result.examples:
        assert example.read.start_ns - example.overwrite.end_ns == example.age_ns


# --- oracle ------------------------------------------------------------------

PAGE = BLOCK_SIZE


def test_oracle_second_read_hits() -> None:
    result = oracle([r(10, 20, 1, 1), r(30, 40, 1, 1)], cache_bytes=10 * PAGE)
    assert (result.read_ops, result.hits, result.hit_rate) == (2, 1, 0.5)


def test_oracle_write_between_reads_invalidates() -> None:
    records = [r(10, 20, 0, 0), w(22, 25, 2, 1, actor="g2", via="guest"), r(30, 40, 2, 1)]
    result = oracle(records, cache_bytes=10 * PAGE)
    assert result.hits == 0
    # The writer, having only written, has no cache and no read ops.
    assert set(result.per_actor) == {"g1"}


def test_oracle_write_of_another_block_does_not_invalidate() -> None:
    records = [r(10, 20, 0, 0), w(22, 25, 2, 1, block=1), r(30, 40, 0, 0)]
    assert oracle(records, cache_bytes=10 * PAGE).hits == 1


def test_oracle_invalidates_at_write_end() -> None:
    # The write is still in flight when the second read starts: it may
    # legally return the old version, so the oracle counts a hit.
    records = [r(10, 20, 0, 0), w(25, 100, 2, 1), r(30, 40, 0, 0)]
    assert oracle(records, cache_bytes=10 * PAGE).hits == 1
    # A read starting in the very nanosecond the write ends, likewise.
    records = [r(10, 20, 0, 0), w(25, 30, 2, 1), r(30, 40, 0, 0)]
    assert oracle(records, cache_bytes=10 * PAGE).hits == 1


def test_oracle_capacity_one_page_alternating_blocks() -> None:
    records = [r(10 * i, 10 * i + 5, 0, 0, block=i % 2) for i in range(10)]
    assert oracle(records, cache_bytes=PAGE).hits == 0
    assert oracle(records, cache_bytes=2 * PAGE).hits == 8
    # Less than a page is no cache at all.
    assert oracle(records, cache_bytes=PAGE - 1).hits == 0


def test_oracle_caches_are_per_guest() -> None:
    records = [r(10, 20, 0, 0, actor="A"), r(30, 40, 0, 0, actor="B"), r(50, 60, 0, 0, actor="B")]
    result = oracle(records, cache_bytes=10 * PAGE)
    assert result.per_actor["A"].hits == 0 and result.per_actor["A"].read_ops == 1
    assert result.per_actor["B"].hits == 1 and result.per_actor["B"].read_ops == 2
    assert result.hits == 1 and result.read_ops == 3


def test_oracle_op_hits_only_if_every_block_is_cached() -> None:
    records = [
        r(10, 20, 0, 0, op=1, block=0),
        r(30, 40, 0, 0, op=2, block=0),
        r(30, 40, 0, 0, op=2, block=1),  # op 2 misses on block 1 ...
        r(50, 60, 0, 0, op=3, block=0),
        r(50, 60, 0, 0, op=3, block=1),  # ... which op 2 brought in
    ]
    result = oracle(records, cache_bytes=10 * PAGE)
    assert (result.read_ops, result.hits) == (3, 1)


def test_oracle_groups_an_op_even_when_interleaved() -> None:
    # Blocks of A's op 2 are logged around B's op of the same instant, and
    # one of them with a later start: still one op per actor, at its start.
    records = [
        r(10, 20, 0, 0, actor="A", op=1, block=0),
        r(10, 20, 0, 0, actor="A", op=1, block=1),
        r(10, 20, 0, 0, actor="B", op=1, block=0),
        r(30, 40, 0, 0, actor="A", op=2, block=0),
        r(30, 40, 0, 0, actor="B", op=2, block=0),
        r(35, 40, 0, 0, actor="A", op=2, block=1),
        w(31, 32, 1, 1, block=1),  # ends after A's op 2 started: no effect on it
    ]
    result = oracle(records, cache_bytes=10 * PAGE)
    assert (result.per_actor["A"].read_ops, result.per_actor["A"].hits) == (2, 1)
    assert (result.per_actor["B"].read_ops, result.per_actor["B"].hits) == (2, 1)


def test_oracle_lru_keeps_recently_used() -> None:
    # Capacity 2: reading 0, 1, 0, 2 evicts 1 (least recently used), not 0.
    records = [r(10 * i, 10 * i + 1, 0, 0, block=b) for i, b in enumerate([0, 1, 0, 2, 0, 1])]
    result = oracle(records, cache_bytes=2 * PAGE)
    assert result.hits == 2  # the second and third reads of block 0


def test_oracle_actors_selects_the_guests() -> None:
    records = [r(10, 20, 0, 0, actor="A"), r(30, 40, 0, 0, actor="A"), r(30, 40, 0, 0, actor="X")]
    result = oracle(records, cache_bytes=10 * PAGE, actors=["A", "C"])
    assert set(result.per_actor) == {"A", "C"}
    assert result.per_actor["C"].read_ops == 0 and result.per_actor["C"].hit_rate == 0.0
    assert (result.read_ops, result.hits) == (2, 1)


def test_oracle_empty_and_bad_size() -> None:
    result = oracle([], cache_bytes=PAGE)
    assert (result.read_ops, result.hits, result.hit_rate) == (0, 0, 0.0)
    with pytest.raises(ValueError):
        oracle([], cache_bytes=-1)
