"""host/kernel_lease.py against the real kernel (F_SETLEASE, signalfd).

Writers run in separate ``python -c`` processes; every wait is bounded and
the lease is always released (or the child killed) in teardown, so no child
waits for lease-break-time.
"""

from __future__ import annotations

import errno
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import pytest

from host import kernel_lease
from host.kernel_lease import LeaseBreakWatcher, LeaseUnavailable, ReadLease

WAIT = 10.0
QUIET = 0.3


class Child:
    def __init__(self, code: str, *args: str) -> None:
        self.p = subprocess.Popen(
            [sys.executable, "-c", code, *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd="/",
        )
        self._buf = b""

    def has_line(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            r, _, _ = select.select([self.p.stdout.fileno()], [], [], max(deadline - time.monotonic(), 0))
            if not r:
                return False
            chunk = os.read(self.p.stdout.fileno(), 4096)
            if not chunk:
                raise AssertionError(f"child exited rc={self.p.wait()} stderr={self.p.stderr.read()!r}")
            self._buf += chunk
        return True

    def line(self, timeout: float = WAIT) -> str:
        assert self.has_line(timeout), f"no line from child within {timeout}s"
        line, _, self._buf = self._buf.partition(b"\n")
        return line.decode()

    def kill(self) -> None:
        if self.p.poll() is None:
            self.p.kill()
        self.p.wait(timeout=WAIT)
        self.p.stdout.close()
        self.p.stderr.close()


@pytest.fixture
def spawn():
    children: list[Child] = []

    def _spawn(code: str, *args: str) -> Child:
        c = Child(code, *args)
        children.append(c)
        return c

    yield _spawn
    for c in children:
        c.kill()


@pytest.fixture
def files():
    d = tempfile.mkdtemp(prefix="cleanlease-lease-", dir="/tmp")
    try:
        ok, why = kernel_lease.available(d)
        if not ok:
            pytest.skip(f"kernel leases in {d}: {why}")
        paths = []
        for name in ("a", "b"):
            p = os.path.join(d, name)
            with open(p, "wb") as f:
                f.write(name.encode() * 100)
            paths.append(p)
        yield paths
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def watcher():
    w = LeaseBreakWatcher()
    try:
        yield w
    finally:
        w.close()


def readable(fd: int, timeout: float) -> bool:
    return bool(select.select([fd], [], [], timeout)[0])


OPENER = r"""
import os, sys
how, path = sys.argv[1], sys.argv[2]
if how == "truncate":
    os.truncate(path, 1)
else:
    os.close(os.open(path, {"wronly": os.O_WRONLY, "rdwr": os.O_RDWR, "rdonly": os.O_RDONLY}[how]))
print("done", flush=True)
"""


@pytest.mark.parametrize("how", ["wronly", "rdwr", "truncate"])
def test_write_open_blocks_until_release_and_watcher_names_the_fd(files, watcher, spawn, how):
    a, b = files
    la = watcher.lease(a)
    lb = watcher.lease(b)
    try:
        c = spawn(OPENER, how, b)
        assert readable(watcher.fileno(), WAIT), "no lease-break signal"
        assert watcher.read_breaks() == [lb.fd]
        assert lb.breaking() and not la.breaking()
        assert not c.has_line(QUIET), "the opener was not blocked by the lease"
        lb.release()
        assert c.line() == "done"
        assert watcher.read_breaks() == []
    finally:
        la.close()
        lb.close()


def test_read_open_does_not_break(files, watcher, spawn):
    with watcher.lease(files[0]) as lease:
        c = spawn(OPENER, "rdonly", files[0])
        assert c.line() == "done"
        assert not readable(watcher.fileno(), QUIET)
        assert watcher.read_breaks() == []
        assert not lease.breaking()


def test_lease_refused_while_open_for_write(files):
    fd = os.open(files[0], os.O_RDWR | os.O_CLOEXEC)
    try:
        with pytest.raises(LeaseUnavailable) as ei:
            ReadLease(files[0])
        assert isinstance(ei.value, OSError) and ei.value.errno == errno.EAGAIN
    finally:
        os.close(fd)
    ReadLease(files[0]).close()  # fine once the writer is gone


def test_lease_from_opath_fd(files, watcher, spawn):
    op = os.open(files[1], os.O_PATH | os.O_CLOEXEC)
    try:
        lease = watcher.lease(op)
        try:
            assert lease.fd != op
            c = spawn(OPENER, "wronly", files[1])
            assert readable(watcher.fileno(), WAIT)
            assert watcher.read_breaks() == [lease.fd]
            lease.release()
            assert c.line() == "done"
        finally:
            lease.close()
    finally:
        os.close(op)


def test_own_nonblocking_write_open_fails_and_starts_a_break(files, watcher):
    """The holder's process is an opener like any other."""
    with watcher.lease(files[0]) as lease:
        with pytest.raises(BlockingIOError):
            os.open(files[0], os.O_WRONLY | os.O_NONBLOCK)
        assert readable(watcher.fileno(), WAIT)
        assert watcher.read_breaks() == [lease.fd]


def test_released_lease_breaks_are_not_reported(files, watcher, spawn):
    lease = watcher.lease(files[0])
    c = spawn(OPENER, "wronly", files[0])
    assert readable(watcher.fileno(), WAIT)
    lease.release()  # before reading the signal
    assert c.line() == "done"
    assert watcher.read_breaks() == []
    lease.close()


def test_watcher_refuses_when_a_thread_does_not_block_the_signal():
    signum = int(signal.SIGRTMIN) + 6  # no lease uses it: nothing can be delivered
    ready, stop = threading.Event(), threading.Event()

    def run():
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signum})
        ready.set()
        stop.wait(WAIT)

    t = threading.Thread(target=run)
    t.start()
    try:
        assert ready.wait(WAIT)
        with pytest.raises(RuntimeError, match="not blocked"):
            LeaseBreakWatcher(signum)
    finally:
        stop.set()
        t.join(WAIT)
    LeaseBreakWatcher(signum).close()  # fine once every thread blocks it
