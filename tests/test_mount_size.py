"""The size a read sees on a mount after another writer appended (issue 11, item 6).

A process keeps a file open and mapped on a clean-lease mount; another writer
appends (host-local, or `echo >>` through a second mount); the next
`pread(fd, 1 MiB, 0)` must return the new length.  docs/mount.md, "The size a
read sees", has the kernel mechanism: a FUSE_NOTIFY_INVAL_INODE for an inode
while the kernel waits for a GETATTR of it makes the kernel drop that
GETATTR's attributes (`fi->attr_version` moved past the one the request
recorded), and the read then stops at the old i_size.

The ordering is forced: the mount runs with CLEANLEASE_MOUNT_HOLD_PURGES=1, so
an unleased READ reply's pages stay in the page cache until the next
GETATTR, which must drop them before it answers (R4).  Each reader is a child
process driven line by line.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import pytest

from guest.fuse_device import unavailable_reason
from tests.conftest import Child
from tests.test_mount import mount_guest  # noqa: F401  (a fixture)

_why = unavailable_reason()
pytestmark = pytest.mark.skipif(_why is not None, reason=f"FUSE mount not possible: {_why}")

WAIT = 10.0
HOLD = {"CLEANLEASE_MOUNT_HOLD_PURGES": "1"}

_READER = """
import ctypes, mmap, os, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                      ctypes.c_long]
fd = os.open(sys.argv[1], os.O_RDONLY)
# The first page, mapped shared (Python's mmap refuses a length past EOF).
base = libc.mmap(None, 4096, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
assert base not in (None, ctypes.c_void_p(-1).value), ctypes.get_errno()
print("OPEN", flush=True)
for line in sys.stdin:
    what, offset, size = line.split()
    offset, size = int(offset), int(size)
    if what == "pread":
        print(os.pread(fd, size, offset).hex(), flush=True)
    else:
        print(ctypes.string_at(base + offset, size).hex(), flush=True)
"""


class MappedReader:
    """A child process holding a file open O_RDONLY and mapped (its first page)."""

    def __init__(self, path: str):
        self.child = Child([sys.executable, "-c", _READER, path], f"reader {path}")
        assert self.child.line(WAIT).strip() == "OPEN"

    def _ask(self, line: str) -> bytes:
        self.child.proc.stdin.write(line.encode())
        self.child.proc.stdin.flush()
        return bytes.fromhex(self.child.line(WAIT).strip())

    def pread(self, offset: int = 0, size: int = 1 << 20) -> bytes:
        return self._ask(f"pread {offset} {size}\n")

    def mapped(self, offset: int, size: int) -> bytes:
        return self._ask(f"map {offset} {size}\n")


@pytest.fixture
def mapped_reader():
    started: list[MappedReader] = []

    def start(path: str) -> MappedReader:
        reader = MappedReader(path)
        started.append(reader)
        return reader

    yield start
    for reader in started:
        reader.child.stop()


def _append_host_local(path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        assert os.write(fd, data) == len(data)
    finally:
        os.close(fd)


def _append_through(path: str, data: bytes) -> None:
    """`echo >>` through a mount, in a child process."""
    done = subprocess.run(["sh", "-c", 'printf %s "$1" >> "$2"', "sh", data.decode(), path],
                          capture_output=True, timeout=WAIT)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("via", ["host-local", "second mount"])
def test_a_read_after_an_append_sees_the_new_length_when_getattr_drops_pages(
        export, start_host, mount_guest, mapped_reader, via):  # noqa: F811
    """Failed before the fix with b'abcde' for the last read (the kernel
    dropped the GETATTR's new size because the guest's purge of the tainted
    page ran while that GETATTR waited)."""
    (export / "f").write_bytes(b"abc")
    # No idle flush: the inode stays DIRTY once written, so every read after the
    # first append is unleased.
    _, address = start_host(export, "--clean-after", "600000")
    b = mount_guest(address, "b", env=HOLD)
    writer = mount_guest(address, "a") if via == "second mount" else None

    def append(data: bytes) -> None:
        if writer is None:
            _append_host_local(export / "f", data)
        else:
            _append_through(writer.path("f"), data)

    reader = mapped_reader(b.path("f"))
    assert reader.pread() == b"abc"
    assert reader.mapped(0, 3) == b"abc"
    assert b.stats()["opens_cached"] == 1  # leased: its pages are kept

    append(b"de")  # the first dirtying write recalls b
    assert b.stats()["invalidations"] == 1
    assert reader.pread() == b"abcde"  # unleased: the READ reply taints the inode
    assert b.stats()["unleased_cached_replies"] >= 1

    append(b"fg")  # DIRTY, but b read it without a lease: the host may recall b (R5)
    # This read's GETATTR finds the inode tainted, drops its pages, answers; or
    # the host's recall of b came first and took pages and attributes with it.
    assert reader.pread() == b"abcdefg"
    assert reader.mapped(0, 7) == b"abcdefg"
    stats = b.stats()
    assert (stats["invalidations"] >= 2
            or (stats["purges"] >= 1 and stats["size_repairs"] >= 1)), stats


_FSTAT = """
import os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
print("OPEN", flush=True)
for line in sys.stdin:
    print(os.fstat(fd).st_size, flush=True)
"""


def test_a_getattr_reply_the_kernel_took_first_does_not_leave_a_later_read_short(
        export, start_host, tmp_path):
    """The same kernel rule without any purge of ours.  Two GETATTRs of one inode
    wait in the kernel; the kernel takes the first reply, which moves the
    inode's attr_version on (fuse_change_attributes_common), so it drops the
    second, and the read that sent the second runs with the first one's size.
    Forced here with the mount in this process, holding the host's answers:
    an fstat's GETATTR learns size 5; then 2 bytes are appended (completed);
    then a pread's GETATTR learns 7; the fstat's reply goes first, and only
    once that fstat has returned does the pread's.  Failed before the fix with
    b'abcde'."""
    from guest.fuse_device import FUSE_GETATTR_FH
    from protocol.messages import Getattr
    from tests.test_mount_ack import _Mounted, _until

    (export / "f").write_bytes(b"abc")
    _, address = start_host(export, "--clean-after", "600000")

    async def scenario():
        async with _Mounted(address, tmp_path / "mnt") as mount:
            path = os.path.join(mount.mountpoint, "f")
            loop = asyncio.get_running_loop()
            reader = await loop.run_in_executor(None, MappedReader, path)
            stater = await loop.run_in_executor(None, Child, [sys.executable, "-c", _FSTAT, path],
                                                "fstat")
            assert (await loop.run_in_executor(None, stater.line, WAIT)).strip() == "OPEN"
            assert await loop.run_in_executor(None, reader.pread) == b"abc"
            # (In a thread: the write may wait for this loop's ACK.)
            await loop.run_in_executor(None, _append_host_local, export / "f", b"de")
            assert mount.stats.invalidations == 1  # recalled; DIRTY from now on

            held: dict[str, asyncio.Event] = {"fstat": asyncio.Event(), "pread": asyncio.Event()}
            fetched: dict[str, asyncio.Event] = {"fstat": asyncio.Event(),
                                                 "pread": asyncio.Event()}
            request = mount.client.request

            async def holding(nodeid, op, *args, **kwargs):
                reply = await request(nodeid, op, *args, **kwargs)
                if isinstance(op, Getattr) and not all(e.is_set() for e in fetched.values()):
                    who = "pread" if op.getattr_flags & FUSE_GETATTR_FH else "fstat"
                    fetched[who].set()
                    await held[who].wait()
                return reply

            mount.client.request = holding

            def ask(child, line):
                child.proc.stdin.write(line)
                child.proc.stdin.flush()

            ask(stater, b"\n")
            await _until(fetched["fstat"].is_set, "the fstat's GETATTR")  # it knows size 5
            # Completed before the pread begins.
            await loop.run_in_executor(None, _append_host_local, export / "f", b"fg")
            pread = loop.run_in_executor(None, reader.pread)
            await _until(fetched["pread"].is_set, "the pread's GETATTR")  # it knows size 7
            held["fstat"].set()
            assert (await loop.run_in_executor(None, stater.line, WAIT)).strip() == "5"
            held["pread"].set()  # the kernel took the fstat's reply first
            assert await asyncio.wait_for(pread, WAIT) == b"abcdefg"
            assert mount.stats.size_repairs >= 1
            await loop.run_in_executor(None, reader.child.stop)
            await loop.run_in_executor(None, stater.stop)

    asyncio.run(scenario())
