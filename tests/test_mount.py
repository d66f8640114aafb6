"""A guest that mounts: the kernel page cache as the guest cache (guest/mount/).

Every guest here is a real `cleanlease guest --mount` process serving a real
FUSE mount through /dev/fuse, against a real `cleanlease host` process.  All
file access on a mount happens in child processes with bounded waits (a
request stuck in FUSE cannot be interrupted from inside the test process),
and every mount is unmounted in teardown even when the test fails: SIGTERM
to the guest, SIGKILL if it does not exit, then umount2(MNT_DETACH) if the
mount is still there.

Run as a script (`python tests/test_mount.py actor ...`) this file is one
actor of the seeded multi-writer run.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if __name__ == "__main__":  # run as an actor process: make the project importable
    sys.path.insert(0, ROOT)

from guest.fuse_device import is_mountpoint_of_fuse, umount, unavailable_reason  # noqa: E402
from workload import stamp as stamps  # noqa: E402
from workload.oplog import LogWriter, ReadRecord, WriteRecord  # noqa: E402

WAIT = 10.0
BLOCK = stamps.BLOCK_SIZE


# --- the actor of the multi-writer run (a child process) -------------------------------


def _actor_main(argv: list[str]) -> int:
    """actor NAME WRITER_ID SEED DURATION_S LOG DIR NFILES NBLOCKS VIA WRITE_SHARE"""
    name, writer, seed, duration, log_path, directory = argv[0], int(argv[1]), int(argv[2]), \
        float(argv[3]), argv[4], argv[5]
    nfiles, nblocks, via, write_share = int(argv[6]), int(argv[7]), argv[8], float(argv[9])
    rng = random.Random(seed)
    paths = [os.path.join(directory, f"f{i}") for i in range(nfiles)]
    # Long-lived read fds (opened once: cached while leased, then they go through
    # the unleased-read path) and per-read opens, both.
    held = [os.open(p, os.O_RDONLY) for p in paths]
    writable: dict[int, int] = {}
    seq = 0
    op = 0
    deadline = time.monotonic() + duration
    with LogWriter(log_path) as log:
        while time.monotonic() < deadline and op < 20000:
            op += 1
            file_id = rng.randrange(nfiles)
            block = rng.randrange(nblocks)
            if rng.random() < write_share:
                seq += 1
                fd = writable.get(file_id)
                if fd is None:
                    fd = writable[file_id] = os.open(paths[file_id], os.O_WRONLY)
                start = time.monotonic_ns()
                data = stamps.make_block(stamps.Stamp(file_id, block, writer, seq, start))
                os.pwrite(fd, data, block * BLOCK)
                if rng.random() < 0.2:
                    os.fsync(fd)
                end = time.monotonic_ns()
                log.write(WriteRecord(name, file_id, block, writer, seq, start, end, None, via))
            else:
                fresh = rng.random() < 0.5
                start = time.monotonic_ns()
                if fresh:
                    fd = os.open(paths[file_id], os.O_RDONLY)
                    data = os.pread(fd, BLOCK, block * BLOCK)
                    os.close(fd)
                else:
                    data = os.pread(held[file_id], BLOCK, block * BLOCK)
                end = time.monotonic_ns()
                try:
                    got = stamps.parse_block(data)
                    version, corrupt = (got.writer, got.seq), None
                    if (got.file_id, got.block) != (file_id, block):
                        version, corrupt = (-1, -1), "magic"
                except stamps.CorruptBlock as exc:
                    version, corrupt = (-1, -1), exc.kind
                log.write(ReadRecord(name, file_id, block, version[0], version[1], start, end,
                                     False, op, corrupt))
    for fd in list(held) + list(writable.values()):
        os.close(fd)
    print(f"DONE {op}", flush=True)
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["actor"]:
        sys.exit(_actor_main(sys.argv[2:]))
    sys.exit(f"usage: {sys.argv[0]} actor ...")


# --- the tests ---------------------------------------------------------------------------

import pytest  # noqa: E402

from tests.conftest import Child, wait_until  # noqa: E402

_why = unavailable_reason()
pytestmark = pytest.mark.skipif(_why is not None, reason=f"FUSE mount not possible: {_why}")


class MountedGuest:
    """A `cleanlease guest --mount` process, and its counters."""

    def __init__(self, address: str, mountpoint, name: str, read_delay_ms: int = 0,
                 env: dict[str, str] | None = None):
        self.mountpoint = str(mountpoint)
        os.makedirs(self.mountpoint, exist_ok=True)
        self.stats_path = self.mountpoint + ".stats.json"
        delay = f"CLEANLEASE_MOUNT_READ_DELAY_MS={read_delay_ms}"  # fault injection, 0: none
        extra = [f"{k}={v}" for k, v in (env or {}).items()]  # more fault injection
        self.child = Child(["env", delay, *extra, sys.executable, "-m", "workload.cli", "guest",
                            "--connect", address, "--mount", self.mountpoint,
                            "--stats", self.stats_path, "--actor", name], name)
        line = self.child.line(30)
        assert line.startswith("READY"), line

    def path(self, name: str) -> str:
        return os.path.join(self.mountpoint, name)

    def stats(self, after_ns: int | None = None) -> dict:
        """The counters, from a snapshot taken after `after_ns` (default: now)."""
        after_ns = time.monotonic_ns() if after_ns is None else after_ns
        found = {}

        def fresh():
            try:
                with open(self.stats_path) as f:
                    found.update(json.load(f))
            except (OSError, ValueError):
                return False
            return found.get("t_ns", 0) > after_ns

        wait_until(fresh, WAIT, f"{self.child.name}: a stats snapshot")
        return found

    def stop(self) -> None:
        if self.child.proc.poll() is None:
            self.child.proc.send_signal(signal.SIGTERM)
            try:
                self.child.proc.wait(WAIT)
            except subprocess.TimeoutExpired:
                self.child.proc.kill()
                self.child.proc.wait()
        if is_mountpoint_of_fuse(self.mountpoint):
            umount(self.mountpoint)


@pytest.fixture
def mount_guest(tmp_path):
    """mount_guest(address, name) -> MountedGuest mounted at tmp_path/mnt-NAME."""
    started: list[MountedGuest] = []

    def start(address: str, name: str, read_delay_ms: int = 0,
              env: dict[str, str] | None = None) -> MountedGuest:
        guest = MountedGuest(address, tmp_path / f"mnt-{name}", name, read_delay_ms, env)
        started.append(guest)
        return guest

    yield start
    for guest in reversed(started):
        guest.stop()


def _run(argv, timeout=WAIT, stdin: bytes = b"") -> str:
    done = subprocess.run(argv, capture_output=True, timeout=timeout, input=stdin)
    assert done.returncode == 0, f"{argv}: rc {done.returncode}: {done.stderr.decode()[-2000:]}"
    return done.stdout.decode("latin-1")


def cat(path: str) -> str:
    return _run(["cat", path])


def pwrite(path: str, offset: int, data: bytes, fsync: bool = True) -> None:
    """Write through a mount in a child process: open O_WRONLY, pwrite, fsync, close."""
    _run([sys.executable, "-c",
          "import os,sys; data=sys.stdin.buffer.read(); fd=os.open(sys.argv[1], os.O_WRONLY); "
          "assert os.pwrite(fd, data, int(sys.argv[2])) == len(data); "
          "sys.argv[3] == '1' and os.fsync(fd); os.close(fd)",
          path, str(offset), "1" if fsync else "0"], stdin=data)


class Reader:
    """A child process that holds one file open O_RDONLY and preads on request."""

    SCRIPT = ("import os,sys\nfd=os.open(sys.argv[1], os.O_RDONLY)\nprint('OPEN', flush=True)\n"
              "for line in sys.stdin:\n    off, size = map(int, line.split())\n"
              "    print(os.pread(fd, size, off).hex(), flush=True)\n")

    def __init__(self, path: str):
        self.child = Child([sys.executable, "-c", self.SCRIPT, path], f"reader {path}")
        assert self.child.line(WAIT).strip() == "OPEN"

    def pread(self, offset: int, size: int) -> bytes:
        self.child.proc.stdin.write(f"{offset} {size}\n".encode())
        self.child.proc.stdin.flush()
        return bytes.fromhex(self.child.line(WAIT).strip())


@pytest.fixture
def readers():
    started: list[Reader] = []

    def start(path: str) -> Reader:
        reader = Reader(path)
        started.append(reader)
        return reader

    yield start
    for reader in started:
        reader.child.stop()


def test_cat_twice_hits_then_host_local_write_is_seen(export, start_host, mount_guest):
    old = b"old content, version one\n" * 40
    (export / "f.txt").write_bytes(old)
    _, address = start_host(export)  # default policy (clean-lease) and detector
    g = mount_guest(address, "g0")

    assert cat(g.path("f.txt")) == old.decode()
    first = g.stats()
    assert first["cached_reads"] >= 1 and first["opens_cached"] == 1
    assert cat(g.path("f.txt")) == old.decode()
    second = g.stats()
    assert second["opens_cached"] == 2  # the second open was served, with KEEP_CACHE
    assert second["kernel_reads"] == first["kernel_reads"], "the second cat sent a READ"

    # A host-local writer changes the file directly in the export.
    new = old.replace(b"version one", b"VERSION TWO")
    fd = os.open(export / "f.txt", os.O_WRONLY)
    try:
        os.pwrite(fd, new, 0)
    finally:
        os.close(fd)
    wait_until(lambda: g.stats()["invalidations"] >= 1, WAIT, "the guest's invalidation")
    after = g.stats()
    assert after["notify_inval_inode"] >= 1 and after["acks_sent"] >= 1
    assert cat(g.path("f.txt")) == new.decode()


def test_two_mounts_write_fsync_then_read_on_the_other(export, start_host, mount_guest):
    (export / "shared.bin").write_bytes(b"A" * 8192)
    _, address = start_host(export, "--policy", "clean-lease")
    a = mount_guest(address, "a")
    b = mount_guest(address, "b")
    assert cat(b.path("shared.bin")) == "A" * 8192  # b caches it under a lease
    assert cat(b.path("shared.bin")) == "A" * 8192
    cached = b.stats()["kernel_reads"]

    pwrite(a.path("shared.bin"), 4096, b"B" * 4096)

    assert b.stats()["invalidations"] >= 1  # recalled before a's write landed
    assert cat(b.path("shared.bin")) == "A" * 4096 + "B" * 4096
    assert b.stats()["kernel_reads"] > cached


def test_open_cached_fd_never_serves_stale_pages_while_dirty(export, start_host, mount_guest,
                                                              readers):
    """A file opened with KEEP_CACHE whose inode turns dirty: reads on that same fd
    repopulate the page cache without a lease, and later writes while DIRTY are not
    notified; the reader must still see every completed write."""
    (export / "d.bin").write_bytes(b"0" * 8192)
    # No idle flush: the inode stays DIRTY for the whole test once written.
    _, address = start_host(export, "--clean-after", "600000")
    a = mount_guest(address, "a")
    b = mount_guest(address, "b")
    reader = readers(b.path("d.bin"))
    assert reader.pread(0, 8192) == b"0" * 8192
    assert b.stats()["opens_cached"] == 1

    # No fsync either (a flush re-arms the lease): the first write recalls b's
    # lease; each later one finds the inode DIRTY, and recalls b all the same,
    # since b read it without a lease in between and its kernel cached those
    # pages (FEATURE_CACHES_UNLEASED, docs/mount.md R5).
    for version in b"123456":
        pwrite(a.path("d.bin"), 0, bytes([version]) * 8192, fsync=False)
        assert reader.pread(0, 8192) == bytes([version]) * 8192
    stats = b.stats()
    assert stats["invalidations"] == 6  # every write recalled b
    assert stats["unleased_cached_replies"] >= 1  # the cached fd read without a lease


def test_seeded_multi_writer_run_through_mounts_has_no_stale_read(export, start_host, mount_guest,
                                                                  tmp_path):
    from workload.checker import check
    from workload.oplog import read_logs

    nfiles, nblocks, seed, duration = 3, 16, 7, 3.0
    for file_id in range(nfiles):
        (export / f"f{file_id}").write_bytes(b"".join(
            stamps.make_block(stamps.Stamp.initial(file_id, block)) for block in range(nblocks)))
    fanotify = _fanotify_usable(export)
    host_args = ("--detector", "fanotify") if fanotify else ()
    _, address = start_host(export, *host_args)
    mounts = [mount_guest(address, f"g{i}") for i in range(2)]
    actors = []
    # Two actors per mount (one writes more), plus a host-local writer when the
    # host sees host-local writes before they land (fanotify).
    plan = [(mounts[0], 0.3), (mounts[0], 0.0), (mounts[1], 0.3), (mounts[1], 0.1)]
    for index, (m, share) in enumerate(plan):
        actors.append((f"g{index}", m.mountpoint, "guest", share))
    if fanotify:
        actors.append(("h0", str(export), "host-local", 0.5))
    logs, procs = [], []
    try:
        for index, (name, directory, via, share) in enumerate(actors):
            log_path = str(tmp_path / f"{name}.log")
            logs.append(log_path)
            procs.append(subprocess.Popen(
                [sys.executable, __file__, "actor", name, str(index + 1), str(seed * 100 + index),
                 str(duration), log_path, directory, str(nfiles), str(nblocks), via, str(share)],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT))
        for proc in procs:
            out, err = proc.communicate(timeout=duration + 30)
            assert proc.returncode == 0 and out.startswith(b"DONE"), err.decode()[-2000:]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    records = read_logs(logs)
    result = check(records)
    assert result.reads > 200
    assert result.stale_reads == 0 and result.phantom == 0 and result.future == 0, (
        f"reads={result.reads} stale={result.stale_reads} phantom={result.phantom} "
        f"future={result.future} examples={result.examples[:3]}")
    # ext4 does not make a buffered pread atomic against a concurrent pwrite of
    # the same block (seen here), whatever any cache does.  So a torn block is
    # allowed only where two plain file-system calls raced on the host: a
    # host-local pwrite overlapping any read of that block (the daemon's pread
    # for a guest, or h0's own), or any write of it (the daemon's pwrite for a
    # guest, or h0's) overlapping a host-local read, which no lease covers.
    # A torn block read by a guest while only guests wrote it would be a bug.
    host_local = {name for name, _, via, _ in actors if via == "host-local"}
    writes = [r for r in records if isinstance(r, WriteRecord)]
    for read in (r for r in records if isinstance(r, ReadRecord) and r.corrupt):
        assert any(w.file_id == read.file_id and w.block == read.block
                   and w.start_ns <= read.end_ns and w.end_ns >= read.start_ns
                   and (w.via == "host-local" or read.actor in host_local)
                   for w in writes), f"corrupt block with no concurrent host-side race: {read}"
    stats = [m.stats() for m in mounts]
    print("multi-writer run:", {"reads": result.reads, "actors": len(actors)},
          [{k: s[k] for k in ("kernel_reads", "cached_reads", "direct_reads", "invalidations",
                              "unleased_cached_replies", "purges", "notify_max_ns")}
           for s in stats])
    assert sum(s["invalidations"] for s in stats) > 0  # coherency was exercised


def _fanotify_usable(export) -> bool:
    """True if the host can see host-local writes before they land (then a
    host-local writer joins the run: with an after-the-fact detector its writes
    could be read stale by design)."""
    try:
        from host.fanotify_detector import FanotifyDetector
    except ImportError:
        return False
    ok, _ = FanotifyDetector.usable(str(export))
    return ok


def test_fio_verify_crc32c_on_the_mount(export, start_host, mount_guest, tmp_path):
    fio = shutil.which("fio")
    if fio is None:
        pytest.skip("fio not installed; run `make fio-deps`")
    _, address = start_host(export)
    a = mount_guest(address, "a")
    b = mount_guest(address, "b")
    job = ["--name=cleanlease", "--size=4m", "--bs=4k", "--rw=randwrite", "--ioengine=psync",
           "--verify=crc32c", "--verify_fatal=1", "--fallocate=none", "--numjobs=2",
           "--randseed=1", "--group_reporting"]
    # cwd: fio leaves its verify state files (local-*-verify.state) there.
    done = subprocess.run([fio, f"--directory={a.mountpoint}", *job, "--do_verify=1"],
                          capture_output=True, timeout=240, cwd=tmp_path)
    assert done.returncode == 0, done.stdout.decode()[-3000:] + done.stderr.decode()[-2000:]
    assert b"verify" not in done.stderr.lower(), done.stderr.decode()
    # The same files, verified through the other guest's mount.
    done = subprocess.run([fio, f"--directory={b.mountpoint}", *job, "--verify_only"],
                          capture_output=True, timeout=240, cwd=tmp_path)
    assert done.returncode == 0, done.stdout.decode()[-3000:] + done.stderr.decode()[-2000:]


def test_cached_read_throughput_is_all_hits(export, start_host, mount_guest):
    size = 16 << 20
    with open(export / "big.bin", "wb") as f:
        f.write(os.urandom(size))
    _, address = start_host(export)
    g = mount_guest(address, "g0")
    out = _run([sys.executable, "-c",
                "import json,sys; from guest.mount import cached_read_throughput as t; "
                "print(json.dumps(t(sys.argv[1], sys.argv[2], rounds=5)))",
                g.path("big.bin"), str(export / "big.bin")], timeout=120)
    figures = json.loads(out)
    stats = g.stats()
    # Only the warm-up read fetched data through the guest: every later round hit.
    assert stats["kernel_read_bytes"] <= size + (1 << 20), stats
    assert figures["mount_MBps"] > 0 and figures["host_MBps"] > 0
    print("cached read throughput:", figures)


def test_unmounts_on_sigterm_and_when_the_host_goes_away(export, start_host, mount_guest):
    (export / "x").write_bytes(b"x")
    host, address = start_host(export)
    g1 = mount_guest(address, "g1")
    g2 = mount_guest(address, "g2")
    assert cat(g1.path("x")) == "x" and cat(g2.path("x")) == "x"

    g1.child.proc.send_signal(signal.SIGTERM)
    assert g1.child.proc.wait(WAIT) == 0
    assert not is_mountpoint_of_fuse(g1.mountpoint)

    host.stop()  # the host goes away for good: the guest unmounts and exits
    assert g2.child.proc.wait(WAIT) == 1
    assert not is_mountpoint_of_fuse(g2.mountpoint)


def test_mkdir_create_rename_truncate_symlink_unlink_statfs_work(export, start_host,
                                                                 mount_guest):
    _, address = start_host(export)
    g = mount_guest(address, "g0")
    script = (
        "import os,sys,errno\n"
        "m=sys.argv[1]\n"
        "os.mkdir(os.path.join(m,'d'))\n"
        "with open(os.path.join(m,'d','n.txt'),'w') as f: f.write('hi')\n"
        "os.rename(os.path.join(m,'d','n.txt'), os.path.join(m,'d','r.txt'))\n"
        "print(sorted(os.listdir(os.path.join(m,'d'))))\n"
        "print(open(os.path.join(m,'d','r.txt')).read())\n"
        "os.truncate(os.path.join(m,'d','r.txt'), 1)\n"
        "print(open(os.path.join(m,'d','r.txt')).read())\n"
        "os.symlink('r.txt', os.path.join(m,'d','l'))\n"
        "print(os.readlink(os.path.join(m,'d','l')))\n"
        "os.unlink(os.path.join(m,'d','r.txt'))\n"
        "os.unlink(os.path.join(m,'d','l'))\n"
        "os.rmdir(os.path.join(m,'d'))\n"
        "print(os.listdir(m))\n"
        "print(os.statvfs(m).f_blocks)\n")
    out = _run([sys.executable, "-c", script, g.mountpoint]).split("\n")
    assert out[:7] == ["['r.txt']", "hi", "h", "r.txt", "[]", str(os.statvfs(export).f_blocks),
                       ""]
    assert not (export / "d").exists()
    assert set(g.stats()["enosys"]) <= {"IOCTL"}  # (isatty on open: TCGETS)


def test_rename_through_one_mount_invalidates_the_others_dentry(export, start_host, mount_guest):
    (export / "old.txt").write_bytes(b"renamed file")
    _, address = start_host(export)
    a = mount_guest(address, "a")
    b = mount_guest(address, "b")
    assert cat(b.path("old.txt")) == "renamed file"  # b caches the dentry under the root's lease
    assert cat(b.path("old.txt")) == "renamed file"
    lookups = b.stats()["lookups"]
    assert lookups >= 1

    _run(["mv", a.path("old.txt"), a.path("new.txt")])

    stats = b.stats()
    assert stats["inval_entries"] >= 1 and stats["notify_inval_entry"] >= 1
    assert subprocess.run(["cat", b.path("old.txt")], capture_output=True,
                          timeout=WAIT).returncode != 0
    assert cat(b.path("new.txt")) == "renamed file"


def test_invalidation_while_a_read_of_the_same_pages_is_unanswered(export, start_host,
                                                                   mount_guest):
    """KERNEL-NOTES: the kernel holds a page locked until its READ is answered, and
    FUSE_NOTIFY_INVAL_INODE waits for that lock.  Guest b holds every READ reply
    for 400 ms; a write through a recalls b while b's READ is unanswered.  The
    notification (on a notifier thread) waits for the READ, the request loop
    answers the READ meanwhile, and only then does the ACK let the write land:
    no deadlock, no fencing, and b's next read sees the write."""
    (export / "slow.bin").write_bytes(b"o" * 65536)
    _, address = start_host(export)  # ack timeout 500 ms > the 400 ms READ delay
    a = mount_guest(address, "a")
    b = mount_guest(address, "b", read_delay_ms=400)
    _run(["stat", b.path("slow.bin")])  # b now holds a lease on the inode
    reader = subprocess.Popen(["cat", b.path("slow.bin")], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE)
    try:
        wait_until(lambda: b.stats()["read_requests"] >= 1, WAIT, "b's READ to be in flight")
        started = time.monotonic()
        pwrite(a.path("slow.bin"), 0, b"n" * 65536, fsync=False)
        write_took = time.monotonic() - started
        out, _ = reader.communicate(timeout=WAIT)
    finally:
        if reader.poll() is None:
            reader.kill()
            reader.wait()
    assert reader.returncode == 0 and out in (b"o" * 65536, b"n" * 65536)
    stats = b.stats()
    # One recall of b's lease; and one more if cat's later READs came while it
    # ran (answered unleased: b is recalled again once the write landed, R5).
    assert stats["invalidations"] in (1, 2) and stats["acks_sent"] == stats["invalidations"]
    # The notification really waited for the unanswered READ, and the write for it.
    assert stats["notify_max_ns"] > 100_000_000, stats
    assert write_took > 0.1
    assert cat(b.path("slow.bin")) == "n" * 65536  # not fenced, and nothing stale


def test_a_process_stuck_in_exit_on_a_mount_is_seen_and_freed(export, start_host, mount_guest):
    """What simulate --mount relies on to fail fast and leave nothing behind
    (workload/mount_agent.py).  A process killed with a file open on a mount
    whose server does not answer cannot finish exiting, since closing that file
    in do_exit sends a FLUSH: `leader_is_dead` must say so (seen in CI as an
    actor whose own serving thread was gone; made here with a stopped server).
    Then `abort_mount` must free it without ever stat()ing the mount: under
    the never policy every stat asks the server, which would not answer."""
    from workload.mount_agent import leader_is_dead

    (export / "f").write_bytes(b"x")
    _, address = start_host(export, "--policy", "never")
    server = mount_guest(address, "m")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import os, sys; fd = os.open(sys.argv[1], os.O_RDONLY); "
         "print('open', flush=True); sys.stdin.read()", server.path("f")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline() == b"open\n"
        assert not leader_is_dead(holder.pid)
        server.child.proc.send_signal(signal.SIGSTOP)
        try:
            holder.kill()
            wait_until(lambda: leader_is_dead(holder.pid), WAIT, "the holder dying")
            assert holder.poll() is None  # dying, not dead: the FLUSH is unanswered
            # In a child process, so that a regression hangs it, not the suite.
            aborted = _run([sys.executable, "-c", "import sys; from workload.mount_agent import "
                            "abort_mount; print(abort_mount(sys.argv[1]))", server.mountpoint])
            assert aborted.strip() == "True"
            assert holder.wait(WAIT) == -signal.SIGKILL  # freed with its server still stopped
        finally:
            server.child.proc.send_signal(signal.SIGCONT)
    finally:
        holder.kill()
        holder.wait()


CWD_KEEPER = """
import os, sys
os.chdir(sys.argv[1])
print("IN", flush=True)
for line in sys.stdin:
    try:
        print(os.getcwd(), flush=True)
    except OSError as exc:
        print("ERR", exc.errno, flush=True)
"""


def test_a_recalled_name_of_a_working_directory_keeps_it_usable(export, start_host, mount_guest):
    """A process on mount a works in directory d; mount b renames d away and back,
    so the host recalls the name d from a (INVAL_ENTRY) before each rename lands.
    The name is the same directory again, and the process must still be able to
    ask where it is: with the dentry invalidated (unhashed), getcwd() in it failed
    with ENOENT, so a shell's `pwd` printed nothing.  That was the pjdfstest
    subset's flaky last `rmdir` (docs/mount.md, "POSIX"): the inotify detector's
    echo of the daemon's own mkdir of the test's directory recalled its name
    from the mount just after the test's shell had entered it; `cdir=$(pwd)`
    came out empty, and its final `cd $cdir; rmdir n` ran in $HOME."""
    (export / "d").mkdir()
    (export / "d" / "f").write_bytes(b"x")
    _, address = start_host(export, "--detector", "none")
    a = mount_guest(address, "a")
    b = mount_guest(address, "b")
    keeper = Child([sys.executable, "-c", CWD_KEEPER, a.path("d")], "cwd keeper")
    assert keeper.line(WAIT).strip() == "IN"
    assert cat(a.path("d/f")) == "x"  # a holds the root's lease: the name d is cached
    before = a.stats()["inval_entries"]
    _run(["sh", "-c", f"mv {b.path('d')} {b.path('d2')} && mv {b.path('d2')} {b.path('d')}"])
    assert a.stats()["inval_entries"] >= before + 1  # recalled before the renames landed
    keeper.proc.stdin.write(b"\n")
    keeper.proc.stdin.flush()
    assert keeper.line(WAIT).strip() == a.path("d")
    keeper.stop()
    assert cat(a.path("d/f")) == "x"
