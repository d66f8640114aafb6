"""Locks across guests: POSIX record locks and flock(2) on one mount are seen by
another mount and by host-local processes (they are the host's:
host/exportfs/locks.py), are released when their owner closes the file, and
are lost with a guest that dies.  Real host, guest and application processes."""

from __future__ import annotations

import fcntl
import os
import signal
import struct
import sys
import tempfile
import time

import pytest

from tests.conftest import Child, wait_until
from tests.test_mount import MountedGuest

HOLD = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
kind = sys.argv[2]
if kind == "flock":
    fcntl.flock(fd, fcntl.LOCK_EX)
else:
    fcntl.lockf(fd, fcntl.LOCK_EX, 100, 0)
print("LOCKED", flush=True)
sys.stdin.readline()
open(sys.argv[3], "w").write("released")  # before the close that releases the lock
os.close(fd)
print("DONE", flush=True)
sys.stdin.readline()
"""

TRY = """
import errno, fcntl, os, struct, sys
fd = os.open(sys.argv[1], os.O_RDWR)
kind = sys.argv[2]
try:
    if kind == "flock":
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    elif kind == "getlk":
        got = fcntl.fcntl(fd, fcntl.F_GETLK, struct.pack("hhqqi4x", fcntl.F_WRLCK, 0, 10, 1, 0))
        print("GETLK", struct.unpack("hhqqi4x", got)[0], flush=True)
        sys.exit(0)
    elif kind == "wait":
        fcntl.lockf(fd, fcntl.LOCK_EX, 100, 0)
        print("GOT", open(sys.argv[3]).read(), flush=True)
        sys.exit(0)
    else:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 100, 0)
    print("GOT", flush=True)
except OSError as e:
    print(errno.errorcode[e.errno], flush=True)
"""


@pytest.fixture
def mounts(export, start_host):
    (export / "f").write_bytes(b"x" * 200)
    _, address = start_host(export, "--detector", "none")
    base = tempfile.mkdtemp(prefix="cleanlease-locks.", dir="/tmp")
    guests = [MountedGuest(address, os.path.join(base, name), name) for name in ("a", "b")]
    yield guests
    for g in guests:
        g.stop()


def _try(path: str, kind: str, marker: str = "") -> str:
    child = Child([sys.executable, "-c", TRY, path, kind, marker], f"try {kind}")
    return child.line(20).strip()


def _host_local_try(path) -> str:
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 100, 0)
        return "GOT"
    except OSError:
        return "EAGAIN"
    finally:
        os.close(fd)


@pytest.mark.parametrize("kind", ["posix", "flock"])
def test_a_lock_on_one_mount_holds_on_the_other_and_on_the_host(export, mounts, kind):
    a, b = mounts
    marker = str(export / "marker")
    holder = Child([sys.executable, "-c", HOLD, a.path("f"), kind, marker], "holder")
    assert holder.line(20).strip() == "LOCKED"
    assert _try(b.path("f"), kind) in ("EAGAIN", "EACCES", "EWOULDBLOCK")
    if kind == "posix":
        assert _try(b.path("f"), "getlk") == f"GETLK {fcntl.F_WRLCK}"
        assert _host_local_try(export / "f") == "EAGAIN"
    # A waiter on mount b gets the lock once the holder on mount a closed the file,
    # and only then: the holder writes the marker before it closes.
    waiter = Child([sys.executable, "-c", TRY, b.path("f"), "wait" if kind == "posix" else
                    "flock", marker], "waiter") if kind == "posix" else None
    holder.proc.stdin.write(b"\n")
    holder.proc.stdin.flush()
    assert holder.line(20).strip() == "DONE"
    if waiter is not None:
        assert waiter.line(20).strip() == "GOT released"
    else:
        assert _try(b.path("f"), kind) == "GOT"


def test_a_guest_that_dies_loses_its_locks(export, mounts):
    a, _ = mounts
    holder = Child([sys.executable, "-c", HOLD, a.path("f"), "posix", str(export / "m")],
                   "holder")
    assert holder.line(20).strip() == "LOCKED"
    assert _host_local_try(export / "f") == "EAGAIN"
    a.child.proc.send_signal(signal.SIGKILL)  # the guest (its mount), not the application
    wait_until(lambda: _host_local_try(export / "f") == "GOT", 20,
               "the dead guest's lock to be released")
    holder.proc.kill()


GIVES_UP = """
import fcntl, os, signal, sys
class GaveUp(Exception):
    pass
def give_up(*_):
    raise GaveUp()  # so that fcntl is not retried after EINTR (PEP 475)
signal.signal(signal.SIGUSR1, give_up)
fd = os.open(sys.argv[1], os.O_RDWR)
print("WAITING", flush=True)
try:
    fcntl.lockf(fd, fcntl.LOCK_EX, 100, 0)
    print("GOT", flush=True)
except GaveUp:
    print("GAVE UP", flush=True)
sys.stdin.readline()  # the file stays open: a lock its owner took would stay too
"""


def _waits_in_fuse(pid: int) -> bool:
    """The process sleeps in the kernel waiting for a FUSE answer (its request
    was queued to the mount)."""
    try:
        with open(f"/proc/{pid}/wchan") as f:
            return f.read().strip() in ("request_wait_answer", "fuse_simple_request")
    except OSError:
        return False


def _host_local_getlk(path) -> int:
    """The type of the first lock on bytes 0..99 of `path`, as a host process
    sees it (F_UNLCK: none)."""
    fd = os.open(path, os.O_RDWR)
    try:
        got = fcntl.fcntl(fd, fcntl.F_OFD_GETLK,
                          struct.pack("hhqqi4x", fcntl.F_WRLCK, 0, 0, 100, 0))
        return struct.unpack("hhqqi4x", got)[0]
    finally:
        os.close(fd)


def test_a_setlkw_whose_caller_gave_up_ends_on_the_host(export, mounts):
    """A process on mount b waits for a lock held on mount a, and gives up (a
    signal: the kernel sends INTERRUPT).  Its wait must end on the host too:
    before, the host went on trying, and once the holder let go it took the
    lock for the process that had given up, which then held it, unknowing,
    until it closed the file.  After the holder lets go, nobody may hold it."""
    a, b = mounts
    holder = Child([sys.executable, "-c", HOLD, a.path("f"), "posix", str(export / "m")],
                   "holder")
    assert holder.line(20).strip() == "LOCKED"
    waiter = Child([sys.executable, "-c", GIVES_UP, b.path("f")], "waiter")
    assert waiter.line(20).strip() == "WAITING"
    wait_until(lambda: _waits_in_fuse(waiter.proc.pid), 20, "the waiter's SETLKW on the mount")
    wait_until(lambda: b.stats().get("lock_waits") == 1, 20, "the SETLKW to reach the host")
    waiter.proc.send_signal(signal.SIGUSR1)
    assert waiter.line(20).strip() == "GAVE UP"
    assert b.stats()["lock_waits"] == 0
    holder.proc.stdin.write(b"\n")
    holder.proc.stdin.flush()
    assert holder.line(20).strip() == "DONE"  # its close released the lock
    # A SETLKW still waiting on the host would take it within its 50 ms retry.
    deadline = time.monotonic() + 0.5
    while time.monotonic() < deadline:
        assert _host_local_getlk(export / "f") == fcntl.F_UNLCK, "the lock was taken"
        time.sleep(0.02)
    assert _try(a.path("f"), "posix") == "GOT"
    waiter.proc.kill()
    holder.proc.kill()
