"""Shared fixtures: a real export directory, a real host process, scripted guest processes."""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def export(tmp_path):
    """An export directory on a real file system (/tmp is ext4 here)."""
    path = tmp_path / "export"
    path.mkdir()
    return path


class Child:
    """A child process that speaks JSON lines (scripted guests) or plain lines (the host)."""

    def __init__(self, argv, name, env=None):
        self.name = name
        # Unbuffered: select() on stdout must see every line not read yet (a
        # buffered readline() can swallow lines that arrived together).
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, cwd=ROOT, bufsize=0, env=env)
        self.events: list[dict] = []

    def line(self, timeout=20.0) -> str:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            raise AssertionError(f"{self.name}: no output within {timeout}s; stderr: {self.stderr()}")
        line = self.proc.stdout.readline().decode()
        if not line:
            raise AssertionError(f"{self.name} exited ({self.proc.wait()}); stderr: {self.stderr()}")
        return line

    def stderr(self) -> str:
        if self.proc.poll() is None:
            return "(still running)"
        return self.proc.stderr.read().decode(errors="replace")[-2000:]

    def result(self, timeout=20.0) -> dict:
        """The next command result; invalidation events seen on the way go to .events."""
        while True:
            obj = json.loads(self.line(timeout))
            if "event" in obj:
                self.events.append(obj)
            else:
                return obj

    def do(self, **cmd) -> dict:
        self.proc.stdin.write((json.dumps(cmd) + "\n").encode())
        self.proc.stdin.flush()
        result = self.result()
        assert result.get("ok"), f"{self.name}: {cmd} failed: {result}"
        return result

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def start_host(tmp_path):
    """start_host(export, *args, address=None) -> (Child, address): a real `cleanlease host`
    process, listening on a fresh socket or on `address` (to restart a host in place).
    The address returned is the one the host says it bound (tcp:HOST:0 gets a port)."""
    started = []

    def start(export_dir, *args, address=None):
        address = address or f"unix:{tmp_path / f'host{len(started)}.sock'}"
        host = Child([sys.executable, "-m", "workload.cli", "host", "--export", str(export_dir),
                      "--listen", address, *args], "host")
        started.append(host)
        line = host.line(30)
        assert line.startswith("READY"), line
        return host, line.split()[1]

    yield start
    for host in started:
        host.stop()
    unmount_binds_under(tmp_path)


def unmount_binds_under(root) -> None:
    """Detach every mount below `root`: a host stopped with SIGKILL leaves the
    private bind of its export (fanotify detector) behind, and a failed mount
    test may leave a FUSE mount.  A FUSE mount's connection is aborted first
    (workload/mount_agent.abort_mount): detached alone, it would live on for
    as long as a process killed with a file open there waits, in do_exit, for
    an answer its dead server will never send."""
    from host import bindmount
    from workload.mount_agent import abort_mount

    root = os.path.realpath(root)
    for _ in range(16):  # binds stacked by restarted hosts come off one per pass
        left = [m.mount_point for m in bindmount.mountinfo()
                if m.mount_point == root or m.mount_point.startswith(root + os.sep)]
        if not left:
            return
        for mount_point in reversed(left):
            try:
                if not abort_mount(mount_point):  # not FUSE: a bind
                    bindmount.unmount(mount_point)
            except OSError:
                pass


@pytest.fixture
def start_guest():
    """start_guest(address, name) -> Child: a scripted guest process, connected."""
    started = []

    def start(address, name):
        guest = Child([sys.executable, os.path.join(ROOT, "tests", "scripted_guest.py"), address,
                       name], name)
        started.append(guest)
        ready = guest.result(30)
        assert "ready" in ready, ready
        return guest

    yield start
    for guest in started:
        guest.stop()


def wait_until(predicate, timeout=10.0, what="condition"):
    """Poll `predicate` (for state only observable by polling); fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)
