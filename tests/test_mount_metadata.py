"""Entries and attributes on a lease-policy mount live as long as the lease
(issue 17, item 3; docs/mount.md, "Entries and attributes under a lease").

Before, the kernel's entry and attribute timeouts were capped by the lease
term at the time of each reply, so once a term had passed every lstat asked
again (LOOKUP, GETATTR), although the lease had been renewed.  Now they are
the host's ("until invalidated"), and three things keep that coherent: a
recall drops them (a directory's also drops the names kept under it, and a
name change also drops the directory's attributes), and when the term runs
out the watchdog drops the attributes of every node id it was given.
"""

from __future__ import annotations

import os
import signal
import sys
import time

import pytest

from guest.fuse_device import unavailable_reason
from tests.conftest import Child
from tests.test_mount import mount_guest  # noqa: F401  (a fixture)

_why = unavailable_reason()
pytestmark = pytest.mark.skipif(_why is not None, reason=f"FUSE mount not possible: {_why}")

TERM_MS = 1000
WAIT = 10.0


def _tree(export, files: int = 20) -> list[str]:
    (export / "d").mkdir()
    names = [f"d/f{i}" for i in range(files)]
    for name in names:
        (export / name).write_bytes(b"abc")
    return names


def _host(start_host, export, *extra):
    return start_host(export, "--lease-term", str(TERM_MS), "--ack-timeout", "300", *extra)[1]


def test_a_warm_stat_after_the_term_sends_no_lookup(export, start_host, mount_guest):  # noqa: F811
    """Failed before the fix: after one term every name was looked up again
    (20 LOOKUPs here); now only the directories' attributes, which stay
    capped by the term, are asked for again."""
    names = _tree(export)
    a = mount_guest(_host(start_host, export, "--detector", "none"), "a")
    for name in names:
        os.stat(a.path(name))
    before = a.stats()
    time.sleep(1.5 * TERM_MS / 1000)  # the condition under test: a term has passed
    for name in names:
        assert os.stat(a.path(name)).st_size == 3
    after = a.stats()
    lookups = after["by_opcode"].get("LOOKUP", 0) - before["by_opcode"].get("LOOKUP", 0)
    host = after["host_requests"] - before["host_requests"]
    assert lookups == 0, after["by_opcode"]
    assert host <= 2, (host, after["by_opcode"])  # GETATTR of the root and of d


def test_changes_from_another_mount_are_seen_at_once_after_the_term(
        export, start_host, mount_guest):  # noqa: F811
    """A holder keeps names and attributes past the term; each change by another
    mount (chmod, append, a new subdirectory, a rename after the directory's
    own lease was recalled) is visible at once.  The nlink and rename checks
    failed before the fix (a directory's attributes and the names under it
    stayed valid up to a term after the change)."""
    _tree(export, 3)
    address = _host(start_host, export, "--detector", "none")
    a, b = mount_guest(address, "a"), mount_guest(address, "b")
    f, d = a.path("d/f0"), a.path("d")
    assert os.stat(f).st_mode & 0o777 == 0o644
    assert os.path.exists(a.path("d/f1"))
    links = os.stat(d).st_nlink
    time.sleep(1.5 * TERM_MS / 1000)
    assert os.stat(f).st_mode & 0o777 == 0o644  # still valid: no request needed
    os.chmod(b.path("d/f0"), 0o600)
    assert os.stat(f).st_mode & 0o777 == 0o600
    with open(b.path("d/f0"), "ab") as out:
        out.write(b"defg")
    assert os.stat(f).st_size == 7
    # A name change A never looked up: the kernel has no dentry to drop, so the
    # directory's attributes must be dropped on their own.
    os.stat(d)
    os.mkdir(b.path("d/sub"))
    assert os.stat(d).st_nlink == links + 1
    # The directory's own lease is recalled (chmod): the names A keeps under it
    # go with it, since the host no longer counts A among its holders.
    assert os.path.exists(a.path("d/f1"))
    os.chmod(b.path("d"), 0o750)
    os.rename(b.path("d/f1"), b.path("d/f9"))
    assert not os.path.exists(a.path("d/f1"))
    assert os.path.exists(a.path("d/f9"))
    assert a.stats()["notify_errors"] == 0


_FSTAT = """
import os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
print("OPEN", flush=True)
for line in sys.stdin:
    try:
        print(oct(os.fstat(fd).st_mode & 0o777), flush=True)
    except OSError as exc:
        print("ERR", exc.errno, flush=True)
"""


def test_a_stopped_guest_keeps_no_old_attributes_once_its_term_has_run_out(
        export, start_host, mount_guest):  # noqa: F811
    """The watchdog purges the attributes of every node id the kernel was given
    valid attributes for, not only of those with data.  An application holds
    the file open (no path walk, which the directories' capped attributes
    would stop) and never reads it.  With the node ids of attribute replies
    not announced to the watchdog (`_kept` emptied), its fstat returned the
    old mode after the change had landed."""
    _tree(export, 1)
    address = _host(start_host, export, "--detector", "none")
    a, b = mount_guest(address, "a"), mount_guest(address, "b")
    app = Child([sys.executable, "-c", _FSTAT, a.path("d/f0")], "app")
    try:
        assert app.line(WAIT).strip() == "OPEN"

        def fstat() -> str:
            app.proc.stdin.write(b"stat\n")
            app.proc.stdin.flush()
            return app.line(WAIT).strip()

        assert fstat() == oct(0o644)
        a.child.proc.send_signal(signal.SIGSTOP)
        try:
            started = time.monotonic()
            os.chmod(b.path("d/f0"), 0o600)  # waits until a is fenced (its term has run out)
            assert time.monotonic() - started >= 0.3
            assert fstat() != oct(0o644), "the stopped guest's kernel served the old attributes"
        finally:
            a.child.proc.send_signal(signal.SIGCONT)
        assert a.child.proc.wait(WAIT) == 1
    finally:
        app.stop()
