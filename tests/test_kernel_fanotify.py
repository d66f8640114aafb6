"""host/fanotify.py against the real kernel (root, ext4, Linux >= 6.14).

Every test that blocks a writer does it in a separate process (``python -c``
started with subprocess, i.e. fork+exec), answers every event (fixtures
close the group, which allows whatever is pending), and bounds every wait.
The test process itself never reads or writes file data through the marked
mount (it would wait for itself): files are created before the mark.
"""

from __future__ import annotations

import errno
import os
import select
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from types import SimpleNamespace

import pytest

from host import bindmount, fanotify
from host.fanotify import Access, PreContentEvent, PreContentGroup, classify

WAIT = 10.0  # bound for every positive wait
QUIET = 0.3  # short window for negative checks only

DATA = b"x" * 65536


# ---------------------------------------------------------------- helpers


class Child:
    """A ``python -c`` child with line I/O; stdout is read with os.read so
    select() on it is exact."""

    def __init__(self, code: str, *args: str, pass_fds: tuple[int, ...] = ()) -> None:
        self.p = subprocess.Popen(
            [sys.executable, "-c", code, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd="/",
            pass_fds=pass_fds,
        )
        self.pid = self.p.pid
        self._buf = b""

    def _fill(self, timeout: float) -> bool:
        r, _, _ = select.select([self.p.stdout.fileno()], [], [], timeout)
        if not r:
            return False
        chunk = os.read(self.p.stdout.fileno(), 4096)
        if not chunk:
            raise AssertionError(f"child exited: rc={self.p.poll()} stderr={self._stderr()}")
        self._buf += chunk
        return True

    def has_line(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            if not self._fill(max(deadline - time.monotonic(), 0)):
                return False
        return True

    def line(self, timeout: float = WAIT) -> str:
        assert self.has_line(timeout), f"no line from child within {timeout}s; stderr={self._stderr()}"
        line, _, self._buf = self._buf.partition(b"\n")
        return line.decode()

    def send(self, text: str = "go") -> None:
        self.p.stdin.write(text.encode() + b"\n")
        self.p.stdin.flush()

    def _stderr(self) -> str:
        if self.p.poll() is None:
            return "<running>"
        return self.p.stderr.read().decode(errors="replace")

    def kill(self) -> None:
        if self.p.poll() is None:
            self.p.kill()
        self.p.wait(timeout=WAIT)
        for f in (self.p.stdin, self.p.stdout, self.p.stderr):
            f.close()


@pytest.fixture
def spawn():
    children: list[Child] = []

    def _spawn(code: str, *args: str, pass_fds: tuple[int, ...] = ()) -> Child:
        c = Child(code, *args, pass_fds=pass_fds)
        children.append(c)
        return c

    yield _spawn
    for c in children:
        c.kill()


def same_file(fd: int, path_or_fd) -> bool:
    a = os.fstat(fd)
    b = os.fstat(path_or_fd) if isinstance(path_or_fd, int) else os.stat(path_or_fd)
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def next_event(group: PreContentGroup, path: str, timeout: float = WAIT) -> PreContentEvent:
    """Wait (bounded) for an event on ``path``; events on other files are
    allowed on the spot."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        assert left > 0, f"no pre-content event on {path} within {timeout}s"
        r, _, _ = select.select([group.fileno()], [], [], left)
        if not r:
            continue
        found = None
        for ev in group.read_events():
            if found is None and ev.fd >= 0 and same_file(ev.fd, path):
                found = ev
            elif ev.fd >= 0:
                group.respond(ev)
        if found is not None:
            return found


def events_on(group: PreContentGroup, path: str, timeout: float) -> list[PreContentEvent]:
    """Collect (and allow) events on ``path`` for ``timeout`` seconds."""
    seen = []
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        r, _, _ = select.select([group.fileno()], [], [], left)
        if r:
            for ev in group.read_events():
                if ev.fd >= 0:
                    if same_file(ev.fd, path):
                        seen.append(ev)
                    group.respond(ev)
    return seen


def finish(child: Child, group: PreContentGroup, timeout: float = WAIT) -> str:
    """Wait (bounded) for the child's next line, allowing any event meanwhile."""
    deadline = time.monotonic() + timeout
    while not child.has_line(0):
        left = deadline - time.monotonic()
        assert left > 0, "child did not finish"
        r, _, _ = select.select([group.fileno(), child.p.stdout.fileno()], [], [], left)
        if group.fileno() in r:
            for ev in group.read_events():
                if ev.fd >= 0:
                    group.respond(ev)
    return child.line(0)


def completes_unseen(child: Child, group: PreContentGroup, path: str) -> None:
    """The child's operation completes and no event about ``path`` arrives."""
    seen: list[PreContentEvent] = []
    deadline = time.monotonic() + WAIT
    while not child.has_line(0):
        left = deadline - time.monotonic()
        assert left > 0, "child did not finish"
        r, _, _ = select.select([group.fileno(), child.p.stdout.fileno()], [], [], left)
        if group.fileno() in r:
            for ev in group.read_events():
                if ev.fd >= 0:
                    if same_file(ev.fd, path):
                        seen.append(ev)
                    group.respond(ev)
    assert child.line(0) == "done"
    assert seen == [], f"unexpected events {seen}"


# A child that opens the file, says "ready", waits for a line, does one
# operation, says "done".  The open happens before the operation so that
# the event we see is the operation's, and so that the test can change marks
# between open and operation.
OP_CHILD = r"""
import mmap, os, sys
op, path = sys.argv[1], sys.argv[2]
dirfd = int(sys.argv[3]) if len(sys.argv) > 3 else None
flags = {"pread": os.O_RDONLY, "mmap_ro": os.O_RDONLY, "append": os.O_WRONLY | os.O_APPEND}.get(op, os.O_RDWR)
fd = os.open(path, flags, dir_fd=dirfd) if op != "truncate" else None
print("ready", flush=True)
sys.stdin.readline()
try:
    if op == "pwrite":
        os.pwrite(fd, b"new", 8192)
    elif op == "write":
        os.write(fd, b"new")
    elif op == "writev":
        os.writev(fd, [b"a", b"b"])
    elif op == "pwritev2":
        os.pwritev(fd, [b"a", b"b"], 4096, os.RWF_DSYNC)
    elif op == "append":
        os.write(fd, b"tail")
    elif op == "ftruncate":
        os.ftruncate(fd, 100)
    elif op == "truncate":
        os.truncate(path, 100)
    elif op == "fallocate":
        os.posix_fallocate(fd, 0, 1 << 20)
    elif op == "pread":
        os.pread(fd, 10, 4096)
    elif op == "mmap_shared_rw":
        m = mmap.mmap(fd, 8192)
    elif op == "mmap_ro":
        m = mmap.mmap(fd, 8192, prot=mmap.PROT_READ)
    elif op == "mmap_shared_ro_rdwr":
        m = mmap.mmap(fd, 8192, prot=mmap.PROT_READ)
    elif op == "mmap_private":
        m = mmap.mmap(fd, 8192, access=mmap.ACCESS_COPY)
    else:
        raise SystemExit("bad op " + op)
except OSError as e:
    print("err", e.errno, flush=True)
    raise SystemExit(0)
print("done", flush=True)
"""


# ---------------------------------------------------------------- fixtures


@pytest.fixture
def export():
    """A directory under /tmp (ext4 here) with one 64 KiB file, private-bind-
    mounted over itself; always unmounted and removed in teardown.
    ``prebind_dirfd`` is a directory fd taken before the bind: it reaches
    the same files through the ORIGINAL mount."""
    ok, why = bindmount.available("/tmp")
    if not ok:
        pytest.skip(f"bind mounts: {why}")
    base = tempfile.mkdtemp(prefix="cleanlease-fan-", dir="/tmp")
    try:
        ok, why = fanotify.available(base)
        if not ok:
            pytest.skip(f"fanotify pre-content events on {base}: {why}")
        path = os.path.join(base, "export")
        os.mkdir(path)
        f = os.path.join(path, "f")
        with open(f, "wb") as fh:
            fh.write(DATA)
        dirfd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            bindmount.bind_over_itself(path)
            try:
                yield SimpleNamespace(base=base, path=path, file=f, prebind_dirfd=dirfd)
            finally:
                bindmount.unmount(path)
        finally:
            os.close(dirfd)
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def group(export):
    g = PreContentGroup.open()
    try:
        g.mark_mount(export.path)
        yield g
    finally:
        g.close()  # allows every pending event


# ---------------------------------------------------------------- tests


def test_available_on_tmp_and_reason_on_tmpfs():
    ok, why = fanotify.available("/tmp")
    if not ok:
        pytest.skip(why)
    assert why == "ok"
    if not os.path.isdir("/dev/shm") or bindmount.find_mount("/dev/shm").fstype != "tmpfs":
        pytest.skip("no tmpfs at /dev/shm to check the refusal reason")
    ok, why = fanotify.available("/dev/shm")
    assert not ok and "tmpfs" in why


def test_mark_mount_guard_refuses_non_bind_mounts(export):
    with PreContentGroup.open() as g:
        for bad in ("/", "/tmp", export.base, os.path.join(export.base, "export", "..")):
            with pytest.raises(ValueError):
                g.mark_mount(bad)
        g.mark_mount(export.path)  # the private bind itself is accepted


@pytest.mark.parametrize(
    "op", ["pwrite", "write", "writev", "pwritev2", "append", "ftruncate", "truncate", "fallocate"]
)
def test_modification_blocks_until_answered_and_classifies_modify(export, group, spawn, op):
    c = spawn(OP_CHILD, op, export.file)
    assert c.line() == "ready"
    c.send()
    ev = next_event(group, export.file)
    try:
        assert ev.mask & fanotify.FAN_PRE_ACCESS
        assert ev.pid == c.pid  # FAN_REPORT_TID: the child's (only) thread
        assert classify(ev.pid, ev.fd) is Access.MODIFY
        assert ev.offset is not None and ev.count and ev.offset % 4096 == 0
        if op == "pwrite":
            assert (ev.offset, ev.count) == (8192, 4096)
        # The writer is still blocked: "done" is not there yet.
        assert not c.has_line(QUIET), "the write completed before the event was answered"
    finally:
        group.respond(ev)
    assert finish(c, group) == "done"


def test_pread_blocks_and_classifies_read(export, group, spawn):
    c = spawn(OP_CHILD, "pread", export.file)
    assert c.line() == "ready"
    c.send()
    ev = next_event(group, export.file)
    try:
        assert classify(ev.pid) is Access.READ
        assert (ev.offset, ev.count) == (4096, 4096)
        assert not c.has_line(QUIET)
    finally:
        group.respond(ev)
    assert finish(c, group) == "done"


@pytest.mark.parametrize(
    "op, expected",
    [
        ("mmap_shared_rw", Access.MMAP_WRITE),
        ("mmap_shared_ro_rdwr", Access.MMAP_WRITE),  # mprotect() could add PROT_WRITE later
        ("mmap_ro", Access.MMAP_READ),
        ("mmap_private", Access.MMAP_READ),
    ],
)
def test_mmap_classification(export, group, spawn, op, expected):
    c = spawn(OP_CHILD, op, export.file)
    assert c.line() == "ready"
    c.send()
    ev = next_event(group, export.file)
    try:
        assert classify(ev.pid) is expected
        assert (ev.offset, ev.count) == (0, 8192)  # one event for the whole range
    finally:
        group.respond(ev)
    assert finish(c, group) == "done"


def test_deny_with_errno(export, group, spawn):
    c = spawn(OP_CHILD, "pwrite", export.file)
    assert c.line() == "ready"
    c.send()
    ev = next_event(group, export.file)
    group.respond(ev, allow=False, errno=errno.EIO)
    assert finish(c, group) == f"err {errno.EIO}"


def test_rejected_errno_still_answers(export, group, spawn):
    c = spawn(OP_CHILD, "pwrite", export.file)
    assert c.line() == "ready"
    c.send()
    ev = next_event(group, export.file)
    with pytest.raises(OSError):
        group.respond(ev, allow=False, errno=errno.ENOENT)  # not accepted by the kernel
    assert finish(c, group) == f"err {errno.EPERM}"  # plain FAN_DENY was sent instead
    assert group.pending == []


def test_closing_group_releases_blocked_writer(export, group, spawn):
    c = spawn(OP_CHILD, "pwrite", export.file)
    assert c.line() == "ready"
    c.send()
    next_event(group, export.file)  # never answered
    assert not c.has_line(QUIET)
    group.close()
    assert c.line() == "done"


def test_write_through_bind_path_seen_original_mount_not(export, group, spawn):
    """The mount mark sees opens made through the bind mount (the export's
    path, since the bind is over itself) and NOT opens made through the
    original mount underneath (here: a directory fd taken before the bind)."""
    seen = spawn(OP_CHILD, "pwrite", export.file)
    assert seen.line() == "ready"
    seen.send()
    ev = next_event(group, export.file)
    assert not seen.has_line(QUIET)
    group.respond(ev)
    assert finish(seen, group) == "done"

    fd = export.prebind_dirfd
    unseen = spawn(OP_CHILD, "pwrite", "f", str(fd), pass_fds=(fd,))
    assert unseen.line() == "ready"
    unseen.send()
    completes_unseen(unseen, group, export.file)


def test_bind_at_other_path_original_path_not_seen(spawn):
    """Bind export/ at view/ (two visible paths): a write through view/f
    is seen, the same write through export/f is not."""
    ok, why = bindmount.available("/tmp")
    if not ok:
        pytest.skip(why)
    base = tempfile.mkdtemp(prefix="cleanlease-fan-", dir="/tmp")
    try:
        ok, why = fanotify.available(base)
        if not ok:
            pytest.skip(why)
        src, view = os.path.join(base, "export"), os.path.join(base, "view")
        os.mkdir(src)
        os.mkdir(view)
        with open(os.path.join(src, "f"), "wb") as fh:
            fh.write(DATA)
        with bindmount.private_bind(src, view), PreContentGroup.open() as g:
            g.mark_mount(view)
            c = spawn(OP_CHILD, "pwrite", os.path.join(view, "f"))
            assert c.line() == "ready"
            c.send()
            ev = next_event(g, os.path.join(src, "f"))
            assert not c.has_line(QUIET)
            g.respond(ev)
            assert finish(c, g) == "done"

            c = spawn(OP_CHILD, "pwrite", os.path.join(src, "f"))
            assert c.line() == "ready"
            c.send()
            completes_unseen(c, g, os.path.join(src, "f"))
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_fd_opened_before_the_mark_is_blind(export, spawn):
    c = spawn(OP_CHILD, "pwrite", export.file)
    assert c.line() == "ready"  # opened before any mark exists
    with PreContentGroup.open() as g:
        g.mark_mount(export.path)
        c.send()
        completes_unseen(c, g, export.file)


def test_open_o_trunc_and_stores_through_mapping_not_seen(export, group, spawn):
    code = r"""
import mmap, os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
m = mmap.mmap(fd, 8192)
print("mapped", flush=True)
sys.stdin.readline()
m[0:5] = b"store"
m.flush()
os.close(os.open(sys.argv[1], os.O_WRONLY | os.O_TRUNC))
print("done", flush=True)
"""
    c = spawn(code, export.file)
    ev = next_event(group, export.file)  # the mmap() call itself
    assert classify(ev.pid) is Access.MMAP_WRITE
    group.respond(ev)
    assert c.line() == "mapped"
    c.send()
    completes_unseen(c, group, export.file)


def test_arm_disarm_cycle_with_ignore_marks(export, group, spawn):
    f = export.file
    # armed: seen
    c = spawn(OP_CHILD, "pwrite", f)
    assert c.line() == "ready"
    c.send()
    group.respond(next_event(group, f))
    assert finish(c, group) == "done"

    # disarmed by path: not seen, twice (the ignore mark survives modify)
    group.disarm(f)
    group.disarm(f)  # idempotent
    for _ in range(2):
        c = spawn(OP_CHILD, "pwrite", f)
        assert c.line() == "ready"
        c.send()
        completes_unseen(c, group, f)

    # an fd opened while disarmed is seen once re-armed
    c = spawn(OP_CHILD, "pwrite", f)
    assert c.line() == "ready"
    group.arm(f)
    group.arm(f)  # already armed: ENOENT is success
    c.send()
    ev = next_event(group, f)
    assert not c.has_line(QUIET)
    group.respond(ev)
    assert finish(c, group) == "done"

    # disarm/arm through an fd and through an O_PATH fd
    for flags in (os.O_RDONLY, os.O_PATH):
        fd = os.open(f, flags | os.O_CLOEXEC)  # open only: no data access
        try:
            group.disarm(fd)
            c = spawn(OP_CHILD, "pwrite", f)
            assert c.line() == "ready"
            c.send()
            completes_unseen(c, group, f)
            group.arm(fd)
        finally:
            os.close(fd)
        c = spawn(OP_CHILD, "pwrite", f)
        assert c.line() == "ready"
        c.send()
        group.respond(next_event(group, f))
        assert finish(c, group) == "done"


def test_inode_mark_readd_misses_fds_opened_in_between(export, spawn):
    """KERNEL-NOTES: removing and re-adding an inode mark does not work as
    re-arming: an fd opened while no mark existed stays blind."""
    f = os.path.join(export.base, "plain")
    with open(f, "wb") as fh:
        fh.write(DATA)
    with PreContentGroup.open() as g:
        g.mark_inode(f)
        g.unmark_inode(f)
        c = spawn(OP_CHILD, "pwrite", f)
        assert c.line() == "ready"  # opened while unmarked
        g.mark_inode(f)
        c.send()
        completes_unseen(c, g, f)


def test_inode_mark_with_ignore_toggle_sees_any_path(export, spawn):
    """A permanent inode mark + ignore-mark toggling needs no bind mount and
    sees writes through any path, including the original mount."""
    f = export.file
    with PreContentGroup.open() as g:
        g.mark_inode(f)
        g.disarm(f)
        fd = export.prebind_dirfd
        c = spawn(OP_CHILD, "pwrite", "f", str(fd), pass_fds=(fd,))  # original mount
        assert c.line() == "ready"  # opened while disarmed
        c.send()
        completes_unseen(c, g, f)

        c = spawn(OP_CHILD, "pwrite", "f", str(fd), pass_fds=(fd,))
        assert c.line() == "ready"  # opened while disarmed
        g.arm(f)
        c.send()
        ev = next_event(g, f)
        assert classify(ev.pid) is Access.MODIFY
        assert not c.has_line(QUIET)
        g.respond(ev)
        assert finish(c, g) == "done"


def test_classify_unknown_when_not_blocked_in_a_known_syscall(spawn):
    # A thread blocked in read(0) on a pipe is READ (by syscall number); a
    # sleeping thread is UNKNOWN; a thread that does not exist is UNKNOWN.
    c = spawn("import sys; print('ready', flush=True); sys.stdin.readline()")
    s = spawn("import time; print('ready', flush=True); time.sleep(60)")
    assert c.line() == "ready" and s.line() == "ready"
    for child, expected in ((c, Access.READ), (s, Access.UNKNOWN)):
        deadline = time.monotonic() + WAIT
        while classify(child.pid) is not expected:  # until it is inside that syscall
            assert time.monotonic() < deadline, f"{child.pid} never classified {expected}"
            select.select([], [], [], 0.01)
    assert classify(2**22 + 12345) is Access.UNKNOWN
    assert Access.UNKNOWN.may_modify and Access.MMAP_WRITE.may_modify
    assert not Access.READ.may_modify and not Access.MMAP_READ.may_modify


def test_parse_metadata_and_range_record():
    meta = struct.Struct("=IBBHQii")
    rng = struct.Struct("=BBHIQQ")
    ev1 = meta.pack(48, 3, 0, 24, fanotify.FAN_PRE_ACCESS, 7, 1234) + rng.pack(6, 0, 24, 0, 8192, 4096)
    ev2 = meta.pack(24, 3, 0, 24, fanotify.FAN_Q_OVERFLOW, -1, 0)
    got = list(fanotify._parse(ev1 + ev2))
    assert got[0] == PreContentEvent(fd=7, pid=1234, mask=fanotify.FAN_PRE_ACCESS, offset=8192, count=4096)
    assert got[1].fd == -1 and got[1].overflow and got[1].offset is None
    with pytest.raises(RuntimeError):
        list(fanotify._parse(meta.pack(24, 2, 0, 24, 0, 1, 1)))
