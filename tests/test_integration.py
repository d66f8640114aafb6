"""End to end: a real host process, real guest processes, a real directory."""

from __future__ import annotations


def test_clean_lease_write_recalls_reader_before_reply_and_regrants_after_fsync(
        export, start_host, start_guest):
    (export / "f.txt").write_bytes(b"old-bytes-" * 10)
    # No idle flush during the test: only A's fsync may bring the inode back to clean.
    _, address = start_host(export, "--policy", "clean-lease", "--clean-after", "600000")
    a = start_guest(address, "A")
    b = start_guest(address, "B")

    b.do(op="open", path="f.txt", mode="r")
    first = b.do(op="read", path="f.txt", size=100)
    assert first == {"ok": True, "data": "old-bytes-" * 10, "hit": False}
    second = b.do(op="read", path="f.txt", size=100)
    assert second["hit"] is True and second["data"] == "old-bytes-" * 10

    a.do(op="open", path="f.txt", mode="rw")
    written = a.do(op="write", path="f.txt", offset=0, data="NEW-BYTES!")
    assert written["first_dirty"] is True

    # B applied the INVALIDATE and wrote its ACK before A received its WRITE reply.
    after = b.do(op="read", path="f.txt", size=100)
    acks = [e for e in b.events if e["event"] == "invalidate"]
    assert len(acks) == 1
    assert acks[0]["t_ack_ns"] < written["t_reply_ns"]
    # B's next read misses and returns A's bytes.
    assert after["hit"] is False
    assert after["data"] == "NEW-BYTES!" + "old-bytes-" * 9
    # While dirty, B gets no lease: it keeps missing.
    assert b.do(op="read", path="f.txt", size=100)["hit"] is False

    a.do(op="fsync", path="f.txt")
    # Clean again: the next read is granted a lease, and the one after it hits.
    regrant = b.do(op="read", path="f.txt", size=100)
    assert regrant["data"] == "NEW-BYTES!" + "old-bytes-" * 9
    hit = b.do(op="read", path="f.txt", size=100)
    assert hit["hit"] is True and hit["data"] == regrant["data"]


def test_second_write_while_dirty_sends_no_invalidation(export, start_host, start_guest):
    (export / "g.txt").write_bytes(b"x" * 64)
    _, address = start_host(export, "--policy", "clean-lease", "--clean-after", "600000")
    a = start_guest(address, "A")
    b = start_guest(address, "B")
    b.do(op="open", path="g.txt")
    b.do(op="read", path="g.txt", size=64)
    a.do(op="open", path="g.txt", mode="rw")
    assert a.do(op="write", path="g.txt", data="1")["first_dirty"] is True
    assert a.do(op="write", path="g.txt", data="2")["first_dirty"] is False
    b.do(op="read", path="g.txt", size=64)
    assert len(b.events) == 1


def test_never_policy_never_hits(export, start_host, start_guest):
    (export / "n.txt").write_bytes(b"n" * 10)
    _, address = start_host(export, "--policy", "never")
    b = start_guest(address, "B")
    b.do(op="open", path="n.txt")
    assert [b.do(op="read", path="n.txt", size=10)["hit"] for _ in range(3)] == [False] * 3
