"""A mounted guest that is stopped or killed (issue 11, item 5).

Once the guest's lease term has run out without a renewal, no application on
its mount may read bytes older than a completed write, through read(2) or a
mapping, whether the guest process is alive, stopped or dead: blocking or an
error is allowed, old bytes are not.  The host fences a silent guest once its
term has surely run out and lets the write through; so when the write below
returns, the old bytes must be unreachable.  docs/mount.md, "When the term
runs out", has the design (the mount's watchdog process) and the kernel facts.

Every application is a child process: one reads with pread(2), one reads
through a shared mapping (a SIGBUS kills it: an error, which is allowed).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from guest.fuse_device import unavailable_reason
from tests.conftest import Child
from tests.test_mount import _fanotify_usable, mount_guest  # noqa: F401  (a fixture)

_why = unavailable_reason()
pytestmark = pytest.mark.skipif(_why is not None, reason=f"FUSE mount not possible: {_why}")

WAIT = 10.0
ACK_TIMEOUT_MS, TERM_MS = 300, 1000
OLD, NEW = b"o" * 8192, b"N" * 8192

_APP = """
import ctypes, mmap, os, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                      ctypes.c_long]
fd = os.open(sys.argv[1], os.O_RDONLY)
base = libc.mmap(None, 8192, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
assert base not in (None, ctypes.c_void_p(-1).value), ctypes.get_errno()
print("OPEN", flush=True)
for line in sys.stdin:
    what, offset, size = line.split()
    offset, size = int(offset), int(size)
    try:
        if what == "pread":
            print("OK", os.pread(fd, size, offset).hex(), flush=True)
        else:  # through the mapping: a SIGBUS kills this process
            print("OK", ctypes.string_at(base + offset, size).hex(), flush=True)
    except OSError as exc:
        print("ERR", exc.errno, flush=True)
"""


class App:
    """An application on the mount: the file open and mapped (8 KiB)."""

    def __init__(self, path: str):
        self.child = Child([sys.executable, "-c", _APP, path], f"app {path}")
        assert self.child.line(WAIT).strip() == "OPEN"

    def ask(self, what: str, offset: int = 0, size: int = len(OLD)):
        """("ok", bytes), ("error", errno) or ("killed", signal number)."""
        self.child.proc.stdin.write(f"{what} {offset} {size}\n".encode())
        self.child.proc.stdin.flush()
        try:
            line = self.child.line(WAIT).split()
        except AssertionError:
            status = self.child.proc.poll()
            if status is not None and status < 0:
                return "killed", -status
            raise
        return ("ok", bytes.fromhex(line[1])) if line[0] == "OK" else ("error", int(line[1]))


@pytest.fixture
def apps():
    started: list[App] = []

    def start(path: str) -> App:
        app = App(path)
        started.append(app)
        return app

    yield start
    for app in started:
        app.child.stop()


def _assert_no_old_bytes(outcome, how: str) -> None:
    assert not (outcome[0] == "ok" and OLD[:16] in outcome[1]), f"{how} returned old bytes"
    assert outcome[0] in ("error", "killed") or outcome == ("ok", NEW), (how, outcome)


def _host_local_write(export) -> float:
    fd = os.open(export / "f", os.O_WRONLY)
    try:
        started = time.monotonic()
        os.pwrite(fd, NEW, 0)  # fanotify: waits until the host recalled or fenced b
        return time.monotonic() - started
    finally:
        os.close(fd)


def _setup(export, start_host, start_guest, mount_guest, apps, via):  # noqa: F811
    if via == "host-local" and not _fanotify_usable(export):
        pytest.skip("host-local writes are seen before they land only with fanotify")
    (export / "f").write_bytes(OLD)
    args = ["--ack-timeout", str(ACK_TIMEOUT_MS), "--lease-term", str(TERM_MS)]
    if via == "host-local":
        args += ["--detector", "fanotify"]
    _, address = start_host(export, *args)
    b = mount_guest(address, "b")
    reader, mapper, later = (apps(b.path("f")) for _ in range(3))
    assert reader.ask("pread") == ("ok", OLD)
    assert mapper.ask("map") == ("ok", OLD)
    assert later.ask("map") == ("ok", OLD)
    assert b.stats()["opens_cached"] >= 1  # cached under a lease: the kernel keeps it
    if via == "host-local":
        write = lambda: _host_local_write(export)  # noqa: E731
    else:
        a = start_guest(address, "A")
        a.do(op="open", path="f", mode="rw")

        def write() -> float:
            started = time.monotonic()
            a.do(op="write", path="f", data=NEW.decode())
            return time.monotonic() - started
    return b, reader, mapper, later, write


@pytest.mark.parametrize("via", ["host-local", "other guest"])
def test_a_stopped_guest_leaves_no_old_bytes_once_its_term_has_run_out(
        export, start_host, start_guest, mount_guest, apps, via):  # noqa: F811
    """Failed before the fix: the mapping returned the old bytes after the write,
    and again after SIGCONT and the guest's unmount."""
    b, reader, mapper, later, write = _setup(export, start_host, start_guest, mount_guest,
                                             apps, via)
    b.child.proc.send_signal(signal.SIGSTOP)
    try:
        waited = write()  # b does not ACK: the host fences it once its term has run out
        assert waited >= ACK_TIMEOUT_MS / 1000.0, waited
        _assert_no_old_bytes(mapper.ask("map"), "the mapping")
        _assert_no_old_bytes(reader.ask("pread"), "pread")
    finally:
        b.child.proc.send_signal(signal.SIGCONT)
    # b learns it was fenced (or finds its connection gone) and unmounts.
    status = b.child.proc.wait(WAIT)
    assert status == 1, b.child.stderr()  # fenced: not a clean unmount
    _assert_no_old_bytes(later.ask("map"), "a mapping made before the stop, after SIGCONT")
    # Its witness purged it when the host asked, at the ack timeout (host/witness.py).
    assert "cleanlease watchdog: the host asked" in b.child.stderr()


@pytest.mark.parametrize("via", ["host-local", "other guest"])
def test_a_killed_guest_leaves_no_old_bytes_once_its_term_has_run_out(
        export, start_host, start_guest, mount_guest, apps, via):  # noqa: F811
    """Failed before the fix: the mapping returned the old bytes after the write."""
    b, reader, mapper, later, write = _setup(export, start_host, start_guest, mount_guest,
                                             apps, via)
    b.child.proc.kill()
    b.child.proc.wait(WAIT)
    # A lost connection is not an ACK: the host waits until b's watchdog, its
    # witness, reports the purge (at once: it saw b die), or else out b's term.
    write()
    assert "the host was told" in b.child.stderr()
    _assert_no_old_bytes(mapper.ask("map"), "the mapping")
    _assert_no_old_bytes(reader.ask("pread"), "pread")
    _assert_no_old_bytes(later.ask("pread", 4096, 4096), "pread of the second page")


def test_a_guest_that_stops_with_files_still_mapped_leaves_no_old_bytes(
        export, start_host, start_guest, mount_guest, apps):  # noqa: F811
    """SIGTERM: the guest unmounts, but a mapping keeps the file system (and its
    pages) alive.  Its connection is aborted and every inode purged before it
    exits, so the mapping cannot show old bytes after the host lets a write
    through (it counts the departed guest silent until its term has run out)."""
    b, reader, mapper, later, write = _setup(export, start_host, start_guest, mount_guest,
                                             apps, "other guest")
    b.child.proc.send_signal(signal.SIGTERM)
    assert b.child.proc.wait(WAIT) == 0
    write()
    _assert_no_old_bytes(mapper.ask("map"), "the mapping")
    _assert_no_old_bytes(reader.ask("pread"), "pread")
