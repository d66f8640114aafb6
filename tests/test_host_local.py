"""Host-local writers against a real daemon: fanotify pre-content events (clean-lease)
and kernel read leases (open-lease), with separate writer processes.

Every writer is its own process (`python -c`, fork+exec), prints
`time.monotonic_ns()` right after its system call returns, and the scripted
guest prints `t_ack_ns` just before it writes its ACK (CLOCK_MONOTONIC is
one clock for every process).  Every wait is bounded.  The export is a
directory under tmp_path (ext4 here); the daemon bind-mounts it over itself
and unmounts on exit, and the start_host fixture detaches whatever a killed
daemon left behind.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time

import pytest

from host import bindmount
from tests.conftest import Child, unmount_binds_under, wait_until

WAIT = 10.0


def _skip_unless_fanotify(export) -> None:
    from host.fanotify_detector import FanotifyDetector

    ok, why = FanotifyDetector.usable(str(export))
    if not ok:
        pytest.skip(f"fanotify detector unavailable: {why}")


def _skip_unless_kernel_leases(export) -> None:
    from host.open_lease_detector import KernelLeaseDetector

    ok, why = KernelLeaseDetector.usable(str(export))
    if not ok:
        pytest.skip(f"kernel read leases unavailable: {why}")


def _host(start_host, export, *args):
    host, address = start_host(export, "--detector", "fanotify", *args)
    return host, address


def _lease(guest, path, size=200):
    """Open `path`, read it twice: the second read is a hit, so the guest holds a lease."""
    guest.do(op="open", path=path)
    first = guest.do(op="read", path=path, size=size)
    second = guest.do(op="read", path=path, size=size)
    assert second["hit"] is True, second
    return first["data"]


def _next_event(guest, kind, timeout=WAIT, name=None) -> dict:
    """The next invalidation event of `kind` (for `name`, if given) the guest prints
    (it prints them unprompted, just before its ACK)."""
    def wanted(event):
        return event["event"] == kind and (name is None or event.get("name") == name)

    for event in guest.events:
        if wanted(event):
            guest.events.remove(event)
            return event
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        assert left > 0, f"{guest.name}: no {kind} event within {timeout}s; got {guest.events}"
        try:
            obj = json.loads(guest.line(left))
        except AssertionError as exc:
            raise AssertionError(f"{exc}; no {kind} {name or ''} event, got {guest.events}") from None
        assert "event" in obj, f"unexpected result {obj}"
        if wanted(obj):
            return obj
        guest.events.append(obj)


def _no_line(child, timeout) -> bool:
    """True if the child prints nothing for `timeout` seconds (a bounded negative check)."""
    ready, _, _ = select.select([child.proc.stdout], [], [], timeout)
    return not ready


def _hits_again(guest, path, expect, size=200, timeout=WAIT) -> None:
    """Read until a read is a hit (the lease came back), bounded; every read returns `expect`."""
    def hit():
        r = guest.do(op="read", path=path, size=size)
        assert r["data"] == expect, r
        return r["hit"]
    wait_until(hit, timeout, f"{guest.name} to be granted a lease on {path} again")


# A host-local writer: opens `path` through the export (the marked bind), says
# "ready", waits for a line, does one operation, prints monotonic_ns after it
# returned, waits for a line, exits.
WRITER = r"""
import mmap, os, sys, time
op, path = sys.argv[1], sys.argv[2]
fd = os.open(path, os.O_RDWR)
print("ready", flush=True)
sys.stdin.readline()
if op == "pwrite":
    os.pwrite(fd, b"NEW!", 0)
elif op == "write":
    os.write(fd, b"NEW!")
elif op == "ftruncate":
    os.ftruncate(fd, 4)
elif op == "fallocate":
    os.posix_fallocate(fd, 0, 8192)
elif op == "mmap":
    m = mmap.mmap(fd, 4096)
print(time.monotonic_ns(), flush=True)
if op == "mmap":
    sys.stdin.readline()
    m[0:4] = b"MMAP"
    print("stored", flush=True)
sys.stdin.readline()
"""

OLD = "old-" * 25  # 100 bytes
AFTER = {
    "pwrite": "NEW!" + OLD[4:],
    "write": "NEW!" + OLD[4:],
    "ftruncate": OLD[:4],
    "fallocate": OLD + "\0" * 100,
}


def _writer(op, path) -> Child:
    w = Child([sys.executable, "-c", WRITER, op, str(path)], f"writer-{op}")
    assert w.line().strip() == "ready"
    return w


def _go(child) -> None:
    child.proc.stdin.write(b"go\n")
    child.proc.stdin.flush()


# --- clean-lease: fanotify pre-content events ------------------------------------------


@pytest.mark.parametrize("op", ["pwrite", "write", "ftruncate", "fallocate"])
def test_host_write_waits_for_the_guests_ack_then_guest_reads_new_bytes(
        export, start_host, start_guest, op):
    _skip_unless_fanotify(export)
    f = export / "f"
    f.write_bytes(OLD.encode())
    host, address = _host(start_host, export)
    g = start_guest(address, "G")
    assert _lease(g, "f") == OLD

    w = _writer(op, f)
    try:
        _go(w)
        t_returned = int(w.line())
        ack = _next_event(g, "invalidate")
        # The guest applied the INVALIDATE and ACKed before the writer's syscall returned.
        assert ack["t_ack_ns"] < t_returned
        r = g.do(op="read", path="f", size=200)
        assert r == {"ok": True, "data": AFTER[op], "hit": False}
        # Clean again: the daemon flushes the host-local write (--clean-after),
        # re-arms and leases the file again.
        _hits_again(g, "f", AFTER[op])
    finally:
        w.stop()


def test_fanotify_mark_is_on_the_private_bind_of_the_export_only(export, start_host):
    _skip_unless_fanotify(export)
    host, _ = _host(start_host, export)
    mounts = {m.mount_id: m for m in bindmount.mountinfo()}
    top = bindmount.find_mount(export)
    assert top.mount_point == str(export) and top.root == str(export) and not top.shared
    marks = []
    fd_dir = f"/proc/{host.proc.pid}/fd"
    for fd in os.listdir(fd_dir):
        try:
            if os.readlink(f"{fd_dir}/{fd}") != "anon_inode:[fanotify]":
                continue
            with open(f"/proc/{host.proc.pid}/fdinfo/{fd}") as info:
                marks += [line.split() for line in info if line.startswith("fanotify ")]
        except OSError:
            continue
    mount_marks = [m for m in marks if m[1].startswith("mnt_id:")]
    assert mount_marks, marks
    assert not [m for m in marks if m[1].startswith("sdev:")], "a file-system mark"
    for m in mount_marks:
        marked = mounts[int(m[1].split(":")[1], 16)]
        assert marked.mount_point == str(export) and marked.root == str(export)
    host.stop()
    assert bindmount.find_mount(export).mount_point != str(export), "the daemon left its bind"


def test_writer_held_by_a_stopped_guest_completes_when_the_daemon_is_killed(
        export, start_host, start_guest):
    _skip_unless_fanotify(export)
    f = export / "f"
    f.write_bytes(OLD.encode())
    host, address = _host(start_host, export, "--ack-timeout", "600000", "--lease-term", "600000")
    g = start_guest(address, "G")
    _lease(g, "f")
    g.proc.send_signal(signal.SIGSTOP)
    w = _writer("pwrite", f)
    try:
        _go(w)
        # The writer is held in pwrite64 (18 on x86_64) on the daemon's pre-content
        # event: the stopped guest cannot ACK.
        wait_until(lambda: open(f"/proc/{w.proc.pid}/syscall").read().split()[0] in ("18", "68"),
                   WAIT, "the writer to block in pwrite64")
        assert _no_line(w, 0.3), "the write went through without the guest's ACK"
        host.proc.send_signal(signal.SIGKILL)
        host.proc.wait(WAIT)
        # The kernel answers every pending event when the group's last fd goes away.
        t_returned = int(w.line(WAIT))
        assert t_returned > 0
        assert f.read_bytes().startswith(b"NEW!")
        # SIGKILL left the bind mount; the fixture detaches it.
        assert bindmount.find_mount(export).mount_point == str(export)
    finally:
        g.proc.send_signal(signal.SIGCONT)
        w.stop()


READER = r"""
import os, sys, time
fd = os.open(sys.argv[1], os.O_RDONLY)
data = os.pread(fd, 4, 0)
print(data.decode(), time.monotonic_ns(), flush=True)
sys.stdin.readline()
"""


def test_held_writer_blocks_nothing_else_and_sigterm_lets_it_go(export, start_host, start_guest):
    """While one writer waits for a recall that cannot finish, reads of armed files
    (host-local and through the daemon) are answered; stopping the daemon
    answers the held writer and removes the bind."""
    _skip_unless_fanotify(export)
    for name in ("f", "g"):
        (export / name).write_bytes(OLD.encode())
    host, address = _host(start_host, export, "--ack-timeout", "600000", "--lease-term", "600000")
    stopped = start_guest(address, "S")
    other = start_guest(address, "O")
    _lease(stopped, "f")
    _lease(stopped, "g")
    stopped.proc.send_signal(signal.SIGSTOP)
    w = _writer("pwrite", export / "f")
    try:
        _go(w)
        wait_until(lambda: open(f"/proc/{w.proc.pid}/syscall").read().split()[0] in ("18", "68"),
                   WAIT, "the writer to block in pwrite64")
        reader = Child([sys.executable, "-c", READER, str(export / "g")], "reader")
        assert reader.line(WAIT).split()[0] == OLD[:4]  # its pre-content event was answered at once
        reader.stop()
        other.do(op="open", path="g")
        assert other.do(op="read", path="g", size=4)["data"] == OLD[:4]
        assert _no_line(w, 0.2), "the write went through without the stopped guest's ACK"
        host.proc.terminate()
        assert int(w.line(WAIT)) > 0  # stop() allowed the pending event
        assert host.proc.wait(WAIT) == 0
        assert bindmount.find_mount(export).mount_point != str(export), "bind left behind"
    finally:
        stopped.proc.send_signal(signal.SIGCONT)
        w.stop()


RENAME_SAVE = r"""
import os, sys, time
path = sys.argv[1]
tmp = path + ".tmp"
with open(tmp, "w") as f:
    f.write("hello new world\n")
before = time.monotonic_ns()
os.rename(tmp, path)
print(before, time.monotonic_ns(), flush=True)
"""


def test_editor_save_by_rename_reaches_guest_as_inval_entry_after_the_fact(
        export, start_host, start_guest):
    _skip_unless_fanotify(export)
    doc = export / "doc.txt"
    doc.write_text("hello old world\n")
    _, address = _host(start_host, export)
    g = start_guest(address, "G")
    assert _lease(g, "doc.txt") == "hello old world\n"
    assert g.do(op="stat", path="doc.txt")["size"] == 16

    saver = Child([sys.executable, "-c", RENAME_SAVE, str(doc)], "saver")
    t_before, t_after = map(int, saver.line().split())
    entry = _next_event(g, "invalentry", name="doc.txt")
    # No pre-content event exists for names: rename() makes the new name visible,
    # then queues the inotify event; the daemon sends INVAL_ENTRY and the guest
    # drops the name.  Until its ACK a guest may still resolve the old name.
    # rename() may not even have returned by then; the window is bounded by
    # ACK - (start of rename()).  docs/kernel.md gives the figures.
    window_us = (entry["t_ack_ns"] - t_before) / 1000
    print(f"rename start -> INVAL_ENTRY ACK: {window_us:.0f} us "
          f"(rename returned {(t_after - t_before) / 1000:.0f} us after it started)")
    assert 0 < window_us < WAIT * 1e6
    g.do(op="open", path="doc.txt")  # by path again: a new lookup
    r = g.do(op="read", path="doc.txt", size=200)
    assert r["data"] == "hello new world\n" and r["hit"] is False


def test_sed_in_place_is_visible_to_the_guest_by_path(export, start_host, start_guest):
    _skip_unless_fanotify(export)
    doc = export / "notes.txt"
    doc.write_text("colour: old\n")
    _, address = _host(start_host, export)
    g = start_guest(address, "G")
    assert _lease(g, "notes.txt") == "colour: old\n"
    subprocess.run(["sed", "-i", "s/old/new/", str(doc)], check=True, timeout=WAIT, cwd="/")
    _next_event(g, "invalentry", name="notes.txt")
    g.do(op="open", path="notes.txt")
    assert g.do(op="read", path="notes.txt", size=100)["data"] == "colour: new\n"
    assert g.do(op="stat", path="notes.txt")["size"] == 12


def test_shared_writable_mapping_recalls_at_mmap_and_blocks_leases_while_mapped(
        export, start_host, start_guest):
    _skip_unless_fanotify(export)
    f = export / "f"
    f.write_bytes(b"x" * 4096)
    _, address = _host(start_host, export)
    g = start_guest(address, "G")
    _lease(g, "f", 4096)
    w = _writer("mmap", f)
    try:
        _go(w)
        t_mapped = int(w.line())
        assert _next_event(g, "invalidate")["t_ack_ns"] < t_mapped
        _go(w)
        assert w.line().strip() == "stored"
        # Stores through the mapping raise no event: while it exists the daemon
        # grants no lease, so every read goes to the host and sees them.
        deadline = time.monotonic() + 0.3  # several --clean-after periods (20 ms)
        while time.monotonic() < deadline:
            r = g.do(op="read", path="f", size=4)
            assert r == {"ok": True, "data": "MMAP", "hit": False}
    finally:
        w.stop()  # unmapped with the process
    _hits_again(g, "f", "MMAP", size=4)


PREOPENED = r"""
import os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR)
print("ready", flush=True)
sys.stdin.readline()
os.pwrite(fd, b"NEW!", 0)
print(time.monotonic_ns(), flush=True)
sys.stdin.readline()
"""

O_TRUNC_OPEN = r"""
import os, sys, time
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_TRUNC)
print(time.monotonic_ns(), flush=True)
sys.stdin.readline()
"""


def test_what_the_mark_cannot_hold_is_recalled_after_the_fact(export, start_host, start_guest,
                                                             tmp_path):
    """Two writes fanotify cannot hold: through another bind mount of the export,
    and open(O_TRUNC).  Each completes while the (stopped) guest cannot ACK
    anything; the inotify watch on the leased file then recalls it after the
    fact."""
    _skip_unless_fanotify(export)
    for name in ("b", "c"):
        (export / name).write_bytes(OLD.encode())
    view = tmp_path / "view"
    view.mkdir()
    bindmount.bind(export, view)  # detached by the fixture
    _, address = _host(start_host, export)
    g = start_guest(address, "G")
    for name in ("b", "c"):
        _lease(g, name)
    other = Child([sys.executable, "-c", PREOPENED, str(view / "b")], "other-mount")
    assert other.line().strip() == "ready"
    try:
        for name, child in (("b", other), ("c", None)):
            g.proc.send_signal(signal.SIGSTOP)
            try:
                if child is None:
                    child = Child([sys.executable, "-c", O_TRUNC_OPEN, str(export / name)], "o-trunc")
                else:
                    _go(child)
                t_returned = int(child.line())  # not held: nobody can ACK now
            finally:
                g.proc.send_signal(signal.SIGCONT)
            assert _next_event(g, "invalidate")["t_ack_ns"] > t_returned
            expect = "" if name == "c" else "NEW!" + OLD[4:]
            assert g.do(op="read", path=name, size=200) == {"ok": True, "data": expect, "hit": False}
    finally:
        other.stop()


def test_a_file_open_for_writing_from_before_the_daemon_started_is_not_leased_while_open(
        export, start_host, start_guest):
    """An fd opened before the daemon's bind is on the mount underneath: its writes
    raise no event the daemon sees.  So the daemon finds such fds when it starts
    (`FanotifyDetector._unmarked_writers`) and leases the file only once every
    one of them is closed.  Before, the file was leased, and a write through
    that fd was recalled only after the fact (inotify), while it was already
    in the file: `cleanlease chaos` counted these as documented stale reads."""
    _skip_unless_fanotify(export)
    (export / "a").write_bytes(OLD.encode())
    early = Child([sys.executable, "-c", PREOPENED, str(export / "a")], "early")
    assert early.line().strip() == "ready"  # its fd is on the mount the bind will cover
    _, address = _host(start_host, export)
    g = start_guest(address, "G")
    try:
        g.do(op="open", path="a")
        reads = [g.do(op="read", path="a", size=200)["hit"] for _ in range(3)]
        assert reads == [False, False, False], "leased while a writer we cannot see had it open"
        _go(early)
        early.line()
        assert g.do(op="read", path="a", size=200)["data"] == "NEW!" + OLD[4:]
    finally:
        early.stop()
    # Once that fd is closed, the file is leased again (checked at most every 100 ms).
    deadline = time.monotonic() + 10
    while not g.do(op="read", path="a", size=200)["hit"]:
        assert time.monotonic() < deadline, "never leased again after the early writer exited"
        time.sleep(0.05)


# --- open-lease: kernel read leases ----------------------------------------------------


OPENER = r"""
import os, sys, time
path, how = sys.argv[1], sys.argv[2]
flags = {"wronly": os.O_WRONLY, "rdwr": os.O_RDWR, "trunc": os.O_WRONLY | os.O_TRUNC}[how]
fd = os.open(path, flags)
print(time.monotonic_ns(), flush=True)
sys.stdin.readline()
os.pwrite(fd, b"NEW!", 0)
os.close(fd)
print("closed", flush=True)
sys.stdin.readline()
"""


@pytest.mark.parametrize("how", ["wronly", "trunc"])
def test_open_lease_host_open_for_write_breaks_guest_lease_before_open_returns(
        export, start_host, start_guest, how):
    _skip_unless_kernel_leases(export)
    f = export / "f"
    f.write_bytes(OLD.encode())
    host, address = start_host(export, "--policy", "open-lease", "--detector", "fanotify")
    g = start_guest(address, "G")
    assert _lease(g, "f") == OLD
    opener = Child([sys.executable, "-c", OPENER, str(f), how], f"opener-{how}")
    try:
        t_opened = int(opener.line())
        ack = _next_event(g, "invalidate")
        assert ack["t_ack_ns"] < t_opened
        # While the host holds it open for write, the kernel lease cannot be
        # taken again and the guest gets no lease.
        assert g.do(op="read", path="f", size=200)["hit"] is False
        assert g.do(op="read", path="f", size=200)["hit"] is False
        _go(opener)
        assert opener.line().strip() == "closed"
        expect = "NEW!" if how == "trunc" else "NEW!" + OLD[4:]
        # Closed: the daemon takes the kernel lease again and guests get leases.
        _hits_again(g, "f", expect)
    finally:
        opener.stop()


def test_open_lease_guest_writer_does_not_wait_for_the_daemons_own_kernel_lease(
        export, start_host, start_guest):
    _skip_unless_kernel_leases(export)
    (export / "f").write_bytes(OLD.encode())
    _, address = start_host(export, "--policy", "open-lease", "--detector", "kernel-lease")
    a = start_guest(address, "A")
    b = start_guest(address, "B")
    _lease(a, "f")
    _lease(b, "f")
    t0 = time.monotonic()
    a.do(op="open", path="f", mode="rw")  # the daemon drops its kernel lease, then opens
    a.do(op="write", path="f", data="NEW!")
    assert time.monotonic() - t0 < 5.0  # not lease-break-time (45 s)
    assert _next_event(b, "invalidate")
    assert b.do(op="read", path="f", size=200)["data"] == "NEW!" + OLD[4:]
    a.do(op="close", path="f")
    _hits_again(b, "f", "NEW!" + OLD[4:])


# --- choosing a detector ---------------------------------------------------------------


def test_auto_falls_back_to_inotify_and_says_why_on_tmpfs():
    from host.detectors import make_detector
    from protocol.messages import Policy

    if not os.path.isdir("/dev/shm") or bindmount.find_mount("/dev/shm").fstype != "tmpfs":
        pytest.skip("no tmpfs at /dev/shm")
    import tempfile

    with tempfile.TemporaryDirectory(dir="/dev/shm") as tmpfs_export:
        detector, why = make_detector("auto", tmpfs_export, Policy.CLEAN_LEASE)
        assert detector.label == "inotify"
        assert "fanotify pre-content events are not available" in why
        with pytest.raises(ValueError, match="not available"):
            make_detector("fanotify", tmpfs_export, Policy.CLEAN_LEASE)


@pytest.mark.parametrize("policy,expect", [("clean-lease", "fanotify"), ("open-lease", "kernel-lease")])
def test_auto_picks_the_detector_for_the_policy_and_ready_says_which(export, tmp_path, policy, expect):
    _skip_unless_fanotify(export)
    _skip_unless_kernel_leases(export)
    host = Child([sys.executable, "-m", "workload.cli", "host", "--export", str(export),
                  "--listen", f"unix:{tmp_path / 'h.sock'}", "--policy", policy], "host")
    try:
        line = host.line(30)
        assert line.startswith("READY") and f" detector={expect} " in line, line
    finally:
        host.stop()
        unmount_binds_under(tmp_path)


def test_make_detector_choices():
    from host.detectors import make_detector
    from protocol.messages import Policy

    detector, why = make_detector("auto", "/tmp", Policy.ALWAYS)
    assert detector.label == "inotify" and "grants no leases" in why
    assert make_detector("none", "/tmp", Policy.CLEAN_LEASE)[0].label == "none"
    with pytest.raises(ValueError, match="open-lease"):
        make_detector("kernel-lease", "/tmp", Policy.CLEAN_LEASE)
    with pytest.raises(ValueError, match="not known"):
        make_detector("dtrace", "/tmp", Policy.CLEAN_LEASE)
    # /tmp is a system directory: its mount is never marked, whatever else holds.
    with pytest.raises(ValueError, match="system directory|not available"):
        make_detector("fanotify", "/tmp", Policy.CLEAN_LEASE)
