"""The control socket (issue 16): freeze/thaw, the change journal, backup.

Real parts: a `cleanlease host` process with the fanotify detector on an
ext4 export, host-local writers as separate processes (pwrite, O_DIRECT,
truncate, fallocate, an fd opened before the freeze), scripted guest
processes, and the control socket.  Orderings are forced by watching the
daemon's count of held writers through the control socket (`_until_waiting`),
never by sleeping.  The codec and journal tests at the top are unit tests
of one piece each.
"""

from __future__ import annotations

import json
import mmap
import os
import random
import select
import signal
import socket
import subprocess
import sys
import time

import pytest

from benchmarks.seeds import LOOPER  # a writer that pwrites at random offsets below its span
from host.control.client import ControlClient, ControlError, parse_mark
from host.control.journal import EVERYTHING, PAGE, ChangeJournal
from protocol import control as cp
from protocol.errors import RemoteProtocolError
from tests.conftest import ROOT, Child, wait_until

WAIT = 15.0


# --- the codec and the journal, alone ---------------------------------------------------


def test_control_frames_round_trip_and_bad_ones_are_refused():
    server, client = cp.ControlConnection(cp.Role.SERVER), cp.ControlConnection(cp.Role.CLIENT)
    requests = [cp.Freeze(b"/x/f", 1500, seq=1), cp.Thaw(b"/x/f", seq=2),
                cp.Changes(b"/x/\xff", bytes(range(16)), 7, seq=3), cp.Status(b"/x", seq=4)]
    for r in requests:
        server.receive_data(client.send(r))
    assert [server.next_event() for _ in requests] == requests
    assert server.next_event() is None
    replies = [cp.ControlReply(cp.ControlCode.FREEZE, 1, 0, "", cp.Held(5, 2)),
               cp.ControlReply(cp.ControlCode.THAW, 2, -22, "not frozen"),
               cp.ControlReply(cp.ControlCode.CHANGES, 3, 0, "", cp.ChangesOut(
                   cp.ChangesStatus.RANGES, 9000, ((0, 4096), (8192, 4096)))),
               cp.ControlReply(cp.ControlCode.STATUS, 4, 0, "", cp.StatusOut(1, 0, 3, 1, 1, 9))]
    for r in replies:
        client.receive_data(server.send(r))
    assert [client.next_event() for _ in replies] == replies
    # A reply to nothing asked, an unknown code, a guest frame: refused, not crashed on.
    for bad in (cp.encode_reply(replies[0]),  # to a server: a reply
                bytes.fromhex("ff00000009000000") + b"\0" * 4,  # unknown code, size 0
                b"\x01\0\0\0\x09\0\0\0\x04\0\0\0abcd"):  # the guest protocol's HELLO code
        s = cp.ControlConnection(cp.Role.SERVER)
        s.receive_data(bad)
        with pytest.raises(RemoteProtocolError):
            s.next_event()
    huge = cp.ControlConnection(cp.Role.SERVER)
    huge.receive_data(bytes.fromhex("0101000009000000") + (cp.MAX_CONTROL_FRAME + 1).to_bytes(4, "little"))
    with pytest.raises(RemoteProtocolError):
        huge.next_event()


def test_journal_reports_every_page_written_after_a_mark_and_never_an_older_boot():
    rng = random.Random(16)
    j = ChangeJournal(b"b" * 16, max_intervals=64)
    key = (1, 1)
    marks = []
    for step in range(2000):
        if step % 400 == 0:
            marks.append((j.mark(key), set()))
        start = rng.randrange(0, 2_000_000)
        end = start + rng.randrange(1, 20000)
        j.record(key, start, end)
        for _, pages in marks:
            pages.update(range(start // PAGE, (end - 1) // PAGE + 1))
    j.record(key, 5_000_000, EVERYTHING)  # a truncation: to the end, whatever it is
    for _, pages in marks:
        pages.update(range(5_000_000 // PAGE, 6_000_000 // PAGE))
    for mark, pages in marks:
        status, ranges, _ = j.since(key, b"b" * 16, mark, 6_000_000)
        assert status is cp.ChangesStatus.RANGES
        got = {p for o, n in ranges for p in range(o // PAGE, (o + n) // PAGE)}
        assert pages <= got  # never less (merged past max_intervals: maybe more)
        assert all(o % PAGE == 0 and n % PAGE == 0 for o, n in ranges)
    assert j.since(key, b"c" * 16, marks[0][0], 10)[0] is cp.ChangesStatus.UNKNOWN
    assert j.since(key, b"b" * 16, j.epoch + 5, 10)[0] is cp.ChangesStatus.UNKNOWN
    j.taint(key, "a shared writable mapping")
    assert j.since(key, b"b" * 16, marks[-1][0], 10)[0] is cp.ChangesStatus.WHOLE_FILE


# --- against a real daemon ----------------------------------------------------------------


def _skip_unless_fanotify(export) -> None:
    from host.fanotify_detector import FanotifyDetector

    ok, why = FanotifyDetector.usable(str(export))
    if not ok:
        pytest.skip(f"fanotify detector unavailable: {why}")


def _daemon(start_host, export, *args, **kw):
    host, address = start_host(export, "--detector", "fanotify", *args, **kw)
    return host, address, address[len("unix:"):] + ".control"


def _until_waiting(control: ControlClient, path, n: int, what: str) -> None:
    wait_until(lambda: control.status(path).waiting == n, WAIT, what)


def _until_waiting_at_least(control: ControlClient, path, n: int, what: str) -> None:
    wait_until(lambda: control.status(path).waiting >= n, WAIT, what)


# One host-local writer: opens `path` (mode per op), prints "ready", waits for a
# line, does its operation, prints monotonic_ns once it returned, then waits for
# stdin to close.
WRITER = r"""
import mmap, os, sys, time
op, path = sys.argv[1], sys.argv[2]
flags = os.O_RDWR | (os.O_DIRECT if op == "odirect" else 0)
fd = os.open(path, flags)
print("ready", flush=True)
sys.stdin.readline()
if op.startswith("pwrite"):
    os.pwrite(fd, op[len("pwrite"):].encode() * 4, 0)
elif op == "odirect":
    buf = mmap.mmap(-1, 4096)
    buf.write(b"3" * 4096)
    os.pwrite(fd, buf, 8192)
elif op == "fallocate":
    os.posix_fallocate(fd, 0, 65536)
elif op == "truncate":
    os.truncate(path, 32768)
elif op == "hole":
    os.pwrite(fd, b"h" * 100, 512 * 1024)
elif op == "grow":
    os.ftruncate(fd, 4 << 20)
elif op == "punch":
    from host.linux.fallocate import fallocate, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_KEEP_SIZE
    fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, 4096)
print(time.monotonic_ns(), flush=True)
sys.stdin.read()
"""


def _writer(op, path) -> Child:
    w = Child([sys.executable, "-c", "import sys; sys.path.insert(0, %r)\n" % ROOT + WRITER, op,
               str(path)], f"writer-{op}")
    assert w.line(WAIT).strip() == "ready"
    return w


def _go(child: Child) -> None:
    child.proc.stdin.write(b"go\n")
    child.proc.stdin.flush()


def test_freeze_holds_every_writer_until_thaw_then_they_land_in_arrival_order(
        export, start_host, start_guest):
    _skip_unless_fanotify(export)
    f = export / "f"
    original = b"o" * 20000
    f.write_bytes(original)
    host, address, ctl = _daemon(start_host, export)
    guest = start_guest(address, "G")
    guest.do(op="open", path="f", mode="rw")
    truncator = start_guest(address, "T")
    truncator.do(op="open", path="f", mode="rw")
    early = _writer("pwrite1", f)  # its fd is opened before the freeze
    writers = [early]
    with ControlClient(ctl) as control:
        held = control.freeze(str(f))
        assert held.drained == 0
        order = [early]
        _go(early)
        _until_waiting(control, f, 1, "the early writer to be held")
        for op in ("pwrite2", "odirect", "fallocate", "truncate"):
            w = _writer(op, f)
            writers.append(w)
            order.append(w)
            _go(w)
            _until_waiting(control, f, len(order), f"the {op} writer to be held")
        # A guest write, held at the daemon's gate.
        guest.proc.stdin.write(b'{"op": "write", "path": "f", "offset": 12288, "data": "GGGG"}\n')
        guest.proc.stdin.flush()
        _until_waiting(control, f, len(order) + 1, "the guest write to be held")
        # A guest SETATTR (truncate), held too.
        truncator.proc.stdin.write(b'{"op": "truncate", "path": "f", "size": 12290}\n')
        truncator.proc.stdin.flush()
        _until_waiting(control, f, len(order) + 2, "the guest truncate to be held")
        # Nothing landed, nobody returned, and reads go on.
        assert f.read_bytes() == original
        assert not select.select([w.proc.stdout for w in writers], [], [], 0)[0], \
            "a host writer returned while frozen"
        for g in (guest, truncator):  # what they printed: invalidations (recalls) only
            while select.select([g.proc.stdout], [], [], 0)[0]:
                line = json.loads(g.line())
                assert "event" in line, f"a guest's modification returned while frozen: {line}"
        released = control.thaw(str(f))
        assert released.released == len(order) + 2
        times = [int(w.line(WAIT)) for w in order]
        replies = [g.result(WAIT) for g in (guest, truncator)]
        assert all(r["ok"] for r in replies), replies
    assert times == sorted(times), "the host writers did not land in arrival order"
    # The guests' replies may cross on the way; their landing order shows in the
    # bytes: the truncate to 12290 cut the write of GGGG at 12288, so it came after.
    assert min(r["t_reply_ns"] for r in replies) > times[-1]
    data = f.read_bytes()
    assert data[:4] == b"2222"  # pwrite2 landed after pwrite1
    assert data[8192:12288] == b"3" * 4096
    assert data[12288:] == b"GG"  # the guests' write, then their truncate
    assert len(data) == 12290  # fallocate (65536), truncate (32768), then the guests' ones
    for w in writers:
        w.stop()


def test_a_frozen_host_writer_completes_when_the_daemon_is_killed(export, start_host):
    _skip_unless_fanotify(export)
    f = export / "f"
    f.write_bytes(b"old!" * 10)
    host, _address, ctl = _daemon(start_host, export)
    w = _writer("pwriteK", f)
    with ControlClient(ctl) as control:
        control.freeze(str(f))
        _go(w)
        _until_waiting(control, f, 1, "the writer to be held")
        host.proc.send_signal(signal.SIGKILL)
        host.proc.wait(WAIT)
        assert int(w.line(WAIT)) > 0  # the kernel lets it go when the group goes away
    assert f.read_bytes().startswith(b"KKKK")
    w.stop()


def test_a_freeze_is_lifted_when_its_client_dies_or_its_max_hold_runs_out(export, start_host):
    _skip_unless_fanotify(export)
    f = export / "f"
    f.write_bytes(b"old!" * 10)
    host, _address, ctl = _daemon(start_host, export)
    freezer = Child([sys.executable, "-m", "workload.cli", "freeze", "--control", ctl, str(f)],
                    "freezer")
    assert freezer.line(WAIT).startswith("FROZEN")
    w = _writer("pwriteA", f)
    with ControlClient(ctl) as control:
        _go(w)
        _until_waiting(control, f, 1, "the writer to be held")
        freezer.proc.send_signal(signal.SIGKILL)  # no thaw: the connection just closes
        freezer.proc.wait(WAIT)
        assert int(w.line(WAIT)) > 0
        assert f.read_bytes().startswith(b"AAAA")
        assert control.status(str(f)).freezes == 0
        # --max-hold: lifted by the daemon itself, the client still connected.
        w2 = _writer("pwriteB", f)
        with ControlClient(ctl) as holder:
            holder.freeze(str(f), max_hold_s=0.3)
            _go(w2)
            assert int(w2.line(WAIT)) > 0
            assert control.status(str(f)).freezes == 0
            with pytest.raises(ControlError):
                holder.thaw(str(f))  # nothing left to thaw: a clear error
    assert f.read_bytes().startswith(b"BBBB")
    for c in (w, w2):
        c.stop()


def test_changes_since_a_mark_cover_guest_and_host_writes_and_a_restart_answers_unknown(
        export, start_host, start_guest):
    _skip_unless_fanotify(export)
    f = export / "f"
    f.write_bytes(b"\0" * 300000)
    host, address, ctl = _daemon(start_host, export)
    guest = start_guest(address, "G")
    guest.do(op="open", path="f", mode="rw")
    with ControlClient(ctl) as control:
        mark = control.mark(str(f))
        fd = os.open(f, os.O_RDWR)
        os.pwrite(fd, b"h" * 10, 100000)  # this test process is a host-local writer too
        os.close(fd)
        guest.do(op="write", path="f", offset=5000, data="g" * 5000)
        changes = control.changes(str(f), (mark.boot_id, mark.epoch))
        assert changes.status is cp.ChangesStatus.RANGES
        assert changes.ranges == ((4096, 8192), (98304, 4096))
        later = control.mark(str(f))
        assert control.changes(str(f), (later.boot_id, later.epoch)).ranges == ()
        # open(O_TRUNC) raises no event; the write past the new end that follows
        # changes the gap too: [0, 12288), not only the page written.
        fd = os.open(f, os.O_WRONLY | os.O_TRUNC)
        os.pwrite(fd, b"t", 8192)
        os.close(fd)
        assert control.changes(str(f), (later.boot_id, later.epoch)).ranges == ((0, 12288),)
        truncated = control.mark(str(f))
        # A shared writable mapping made now: its stores are never seen again.
        fd = os.open(f, os.O_RDWR)
        mapping = mmap.mmap(fd, 4096)
        mapping[0:1] = b"m"
        mapping.close()
        os.close(fd)
        assert control.changes(str(f), (truncated.boot_id, truncated.epoch)).status is \
            cp.ChangesStatus.WHOLE_FILE
        with pytest.raises(ControlError) as refused:
            control.changes(str(export / "nope"), (later.boot_id, later.epoch))
        assert refused.value.errno == 2
    guest.stop()
    host.stop()
    _host2, _a, ctl2 = _daemon(start_host, export, address=address)
    with ControlClient(ctl2) as control:
        old = control.changes(str(f), (mark.boot_id, mark.epoch))
        assert old.status is cp.ChangesStatus.UNKNOWN  # never "nothing changed"


def test_under_inotify_changes_are_whole_file_and_a_freeze_says_what_it_cannot_hold(
        export, start_host):
    f = export / "f"
    f.write_bytes(b"x" * 9000)
    _host, address = start_host(export, "--detector", "inotify")
    ctl = address[len("unix:"):] + ".control"
    assert os.stat(ctl).st_mode & 0o777 == 0o600
    # Bad input closes that client only; a request for a file outside the export
    # gets an errno and a sentence.
    for bad in (b"\x01\x01\x00\x00\x09\x00\x00\x00\x03\x00\x00\x00abc",  # FREEZE, 3 bytes
                b"\x07\x07\x00\x00\x09\x00\x00\x00\x00\x00\x00\x00"):  # unknown code
        with socket.socket(socket.AF_UNIX) as raw:
            raw.connect(ctl)
            raw.sendall(bad)
            raw.settimeout(WAIT)
            assert raw.recv(100) == b""  # closed
    with ControlClient(ctl) as control:
        with pytest.raises(ControlError) as outside:
            control.freeze("/etc/passwd")
        assert outside.value.errno == 18 and "not inside the export" in str(outside.value)
        mark = control.mark(str(f))
        assert control.changes(str(f), (mark.boot_id, mark.epoch)).status is \
            cp.ChangesStatus.WHOLE_FILE
        control.freeze(str(f))
        assert "cannot hold host-local writers" in control.last_message


# A host-local writer process: random pwrites of random lengths until stdin closes.


def _pages_differing(a: bytes, b: bytes) -> set[int]:
    out = set()
    for p in range(0, max(len(a), len(b)), PAGE):
        if a[p:p + PAGE] != b[p:p + PAGE]:
            out.add(p // PAGE)
    return out


def test_incremental_backup_under_concurrent_writers_equals_the_file_at_the_freeze(
        export, start_host, start_guest, tmp_path):
    """The issue's 1 GiB run is `make seeds` (benchmarks/seeds.py); here 16 MiB."""
    from host.control.backup import backup

    _skip_unless_fanotify(export)
    size = 16 << 20
    f = export / "big"
    with open(f, "wb") as out:
        out.write(random.Random(1).randbytes(size))
    host, address, ctl = _daemon(start_host, export)
    dest = tmp_path / "backup"
    snapshots = []
    with ControlClient(ctl) as control:
        first = backup(control, str(f), str(dest), after_freeze=lambda: snapshots.append(
            f.read_bytes()))
        assert not first.incremental and first.bytes_copied == size
        assert dest.read_bytes() == snapshots[0]
        # It writes only the first eighth of the file (else it soon covers all of it).
        looper = Child([sys.executable, "-c", LOOPER, str(f), "7", str(size // 8 - 5000)],
                       "looper")
        assert looper.line(WAIT).strip() == "ready"
        guest = start_guest(address, "G")
        guest.do(op="open", path="big", mode="rw")
        rng = random.Random(2)
        for _ in range(40):  # queued: the guest carries them out one after another
            off = rng.randrange(0, size - 10000)
            guest.proc.stdin.write(('{"op": "write", "path": "big", "offset": %d, "data": "%s"}\n'
                                    % (off, "q" * rng.randrange(1, 9000))).encode())
        guest.proc.stdin.flush()
        wait_until(lambda: _pages_differing(f.read_bytes(), snapshots[0]), WAIT,
                   "the writers to change something")

        def at_the_freeze():
            # The looper is held now (so it was writing when the freeze began).
            _until_waiting_at_least(control, f, 1, "the looper to be held by the freeze")
            snapshots.append(f.read_bytes())

        second = backup(control, str(f), str(dest), first.mark, after_freeze=at_the_freeze)
        looper.proc.stdin.close()
        assert int(looper.line(WAIT)) > 0
        for _ in range(40):
            assert guest.result(WAIT)["ok"]
    assert second.incremental
    assert dest.read_bytes() == snapshots[1], "the backup is not the file at the freeze"
    changed = _pages_differing(snapshots[0], snapshots[1])
    reported = {p for o, n in second.ranges for p in range(o // PAGE, (o + n) // PAGE)}
    assert changed <= reported, "the journal missed changed pages"
    # the looper: its eighth and a page past it; each guest write: at most 4 pages
    assert second.bytes_copied <= size // 8 + 8192 + 40 * 16384
    excess = len(reported - changed) / max(1, len(reported))
    print(f"changed pages {len(changed)}, reported {len(reported)}, excess {excess:.1%}")
    looper.stop()


def test_control_golden_bytes():
    """The examples of docs/protocol.md, section 10, byte for byte."""
    def frame(text):
        return bytes.fromhex(text.replace(" ", ""))

    assert cp.encode_request(cp.Freeze(b"/srv/e/f", 1500, seq=1)) == frame(
        "01010000 09000000 16000000 0100000000000000 dc050000 0800 2f7372762f652f66")
    assert cp.encode_reply(cp.ControlReply(cp.ControlCode.FREEZE, 1, 0, "", cp.Held(20000, 2))) \
        == frame("01010000 05000000 1a000000 0100000000000000 00000000 0000 204e000000000000 "
                 "02000000")
    assert cp.encode_reply(cp.ControlReply(cp.ControlCode.THAW, 2, -22, "x")) == frame(
        "02010000 05000000 0f000000 0200000000000000 eaffffff 0100 78")
    assert cp.encode_request(cp.Changes(b"/srv/e/f", bytes(range(16)), 3, seq=4)) == frame(
        "05010000 09000000 2a000000 0400000000000000 000102030405060708090a0b0c0d0e0f "
        "0300000000000000 0800 2f7372762f652f66")
    assert cp.encode_reply(cp.ControlReply(cp.ControlCode.CHANGES, 4, 0, "", cp.ChangesOut(
        cp.ChangesStatus.RANGES, 20010, ((16384, 4096),)))) == frame(
        "05010000 05000000 2b000000 0400000000000000 00000000 0000 00 2a4e000000000000 "
        "01000000 0040000000000000 0010000000000000")


def test_a_seal_holds_layout_changes_lets_overwrites_go_and_keeps_the_map_still(
        export, start_host, start_guest):
    from host.linux.fiemap import data_segments, extents

    _skip_unless_fanotify(export)
    f = export / "sparse"
    with open(f, "wb") as out:  # data, a hole, data, a hole to the end
        out.write(b"d" * 65536)
        out.seek(1 << 20)
        out.write(b"d" * 65536)
        out.truncate(2 << 20)
        os.fsync(out.fileno())
    host, address, ctl = _daemon(start_host, export)
    guest = start_guest(address, "G")
    guest.do(op="open", path="sparse", mode="rw")
    fd = os.open(f, os.O_RDONLY)

    def layout():
        return extents(fd), data_segments(fd), os.fstat(fd).st_size

    before = layout()
    assert before[1] == [(0, 65536), (1 << 20, (1 << 20) + 65536)]
    looper = Child([sys.executable, "-c", LOOPER, str(f), "9", "55000"], "looper")
    assert looper.line(WAIT).strip() == "ready"  # overwrites in place, all along
    held = []
    with ControlClient(ctl) as control:
        control.seal(str(f))
        over = _writer("pwriteO", f)
        _go(over)
        assert int(over.line(WAIT)) > 0  # an overwrite of allocated blocks goes on
        for op in ("hole", "grow", "punch"):
            w = _writer(op, f)
            held.append(w)
            _go(w)
            _until_waiting(control, f, len(held), f"the {op} writer to be held")
        guest.proc.stdin.write(b'{"op": "write", "path": "sparse", "offset": 3000000, '
                               b'"data": "past the end"}\n')
        guest.proc.stdin.flush()
        _until_waiting(control, f, len(held) + 1, "the guest's write past the end to be held")
        guest.proc.stdin.write(b'{"op": "write", "path": "sparse", "offset": 100, "data": "o"}\n')
        # (queued behind the held one in the guest; its own overwrite is tested above)
        guest.proc.stdin.flush()
        assert layout() == before, "the extent map moved while sealed"
        assert not select.select([w.proc.stdout for w in held], [], [], 0)[0]
        assert f.read_bytes()[:4] == b"OOOO"
        released = control.unseal(str(f))
        assert released.released == len(held) + 1
        for w in held:
            assert int(w.line(WAIT)) > 0
        assert guest.result(WAIT)["ok"] and guest.result(WAIT)["ok"]
    looper.proc.stdin.close()
    assert int(looper.line(WAIT)) > 0
    after = layout()
    assert after != before and after[2] == 4 << 20
    os.close(fd)
    for c in (over, looper, *held):
        c.stop()


def test_a_host_write_held_by_a_freeze_is_not_served_stale_by_a_lease_granted_meanwhile(
        export, start_host, start_guest):
    """While a host write waits in the gate its file must not become CLEAN and
    leased again (its flush finishes meanwhile): the write lands when let go."""
    _skip_unless_fanotify(export)
    f = export / "f"
    f.write_bytes(b"OLD!" * 50)
    host, address, ctl = _daemon(start_host, export)
    g = start_guest(address, "G")
    g.do(op="open", path="f")
    g.do(op="read", path="f", size=200)
    assert g.do(op="read", path="f", size=200)["hit"]  # leased
    w = _writer("pwriteN", f)
    with ControlClient(ctl) as control:
        control.freeze(str(f))
        _go(w)
        _until_waiting(control, f, 1, "the writer to be held")
        # Re-armed after its flush (--clean-after 20 ms), the file would be leased
        # again within a few reads; it must not be while the write waits.
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            r = g.do(op="read", path="f", size=200)
            assert not r["hit"], "a lease was granted while a host write waited"
            assert r["data"].startswith("OLD!")
        control.thaw(str(f))
        assert int(w.line(WAIT)) > 0
    wait_until(lambda: g.do(op="read", path="f", size=200)["data"].startswith("NNNN"), WAIT,
               "the guest to read the new bytes")
    w.stop()
