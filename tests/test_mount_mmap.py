"""Shared writable mappings on the mount (docs/mount.md, "Shared writable mappings").

Real processes throughout: a `cleanlease host`, `cleanlease guest --mount`
processes, an application that maps a file shared and writable on one mount
(tests/mapper.py), readers and writers on another mount and on the host.
Checked: no read anywhere returns bytes older than a completed msync (or
munmap, or close); a store is never lost, even when another writer's recall
finds it still dirty in the mapping (the purge launders it); the mapping
sees every completed write of others; and a recall that finds dirty pages
does not wait for the holder's fence (the launder-during-recall cycle).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from tests.conftest import Child
from tests.test_mount import WAIT, _fanotify_usable, mount_guest, pwrite, readers  # noqa: F401

PAGE = 4096
MAPPER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "mapper.py")


class Mapper:
    """tests/mapper.py in a child process: one file mapped shared and writable."""

    def __init__(self, path: str, size: int):
        self.child = Child([sys.executable, MAPPER, path, str(size)], f"mapper {path}")
        line = self.child.line(WAIT).strip()
        assert line == "MAPPED", line

    def _ask(self, command: str, timeout: float = WAIT) -> str:
        self.child.proc.stdin.write((command + "\n").encode())
        self.child.proc.stdin.flush()
        answer = self.child.line(timeout).strip()
        assert not answer.startswith("ERR"), f"{command}: {answer}"
        return answer

    def store(self, offset: int, data: bytes) -> None:
        assert self._ask(f"store {offset} {data.hex()}") == "OK"

    def load(self, offset: int, size: int) -> bytes:
        return bytes.fromhex(self._ask(f"load {offset} {size}"))

    def msync(self) -> None:
        assert self._ask("msync") == "OK"

    def munmap_and_close(self) -> None:
        assert self._ask("munmap") == "OK" and self._ask("close") == "OK"


@pytest.fixture
def mappers():
    started: list[Mapper] = []

    def start(path: str, size: int) -> Mapper:
        mapper = Mapper(path, size)
        started.append(mapper)
        return mapper

    yield start
    for mapper in started:
        mapper.child.stop()


def host_local_pwrite(path, offset: int, data: bytes) -> None:
    """A host-local writer (its own process) writes the export's file directly."""
    done = subprocess.run([sys.executable, "-c",
                           "import os,sys; fd=os.open(sys.argv[1], os.O_WRONLY); "
                           "os.pwrite(fd, bytes.fromhex(sys.argv[3]), int(sys.argv[2])); "
                           "os.close(fd)", str(path), str(offset), data.hex()],
                          capture_output=True, timeout=WAIT)
    assert done.returncode == 0, done.stderr.decode()


def page(tag: str) -> bytes:
    return (tag.encode() * PAGE)[:PAGE]


def test_a_recall_that_finds_dirty_mapped_pages_launders_them_without_a_fence(
        export, start_host, mount_guest, mappers):
    """Guest a stores a whole page through its mapping and does not msync; guest b
    writes 16 bytes into that page.  b's write recalls a's copy of the page,
    and a's purge writes the dirty page back (a WRITE from a guest that owes
    the recall's ACK) before it drops it.  That WRITE must land inside the
    recall: held until the recall is over it would wait for the ACK that
    waits for it, and b's write would wait until a is fenced (ack timeout +
    term: over 12 s here)."""
    (export / "m.bin").write_bytes(page("0") * 2)
    # Inode granularity: under range granularity a writeback that reaches past
    # the recalled span (the kernel writes back a large folio whole) still
    # waits for the recall (docs/mount.md, R8: not done there yet).
    host, address = start_host(export, "--detector", "none", "--lease-term", "6000",
                               "--ack-timeout", "6000", "--clean-after", "600000",
                               "--granularity", "inode")
    a = mount_guest(address, "a")
    b = mount_guest(address, "b")
    mapper = mappers(a.path("m.bin"), 2 * PAGE)
    assert mapper.load(0, 2 * PAGE) == page("0") * 2  # a holds a lease on the pages
    mapper.store(0, page("a"))  # dirty in a's page cache only
    mapper.store(PAGE, page("c"))
    assert (export / "m.bin").read_bytes() == page("0") * 2

    started = time.monotonic()
    pwrite(b.path("m.bin"), 100, b"B" * 16, fsync=False)  # _run's timeout: 10 s
    took = time.monotonic() - started
    assert took < 5, f"b's write waited {took:.1f} s (for a's fence?)"
    # a's store was laundered by the recall, before b's write landed on it: not lost.
    mixed = page("a")[:100] + b"B" * 16 + page("a")[116:]
    assert (export / "m.bin").read_bytes()[:PAGE] == mixed
    assert a.stats()["writebacks"] >= 1
    # a's mapping lost that page in the recall and sees b's write; a still serves.
    assert mapper.load(0, PAGE) == mixed
    mapper.msync()
    assert (export / "m.bin").read_bytes() == mixed + page("c")


def test_stores_msync_and_others_writes_stay_coherent(export, start_host, mount_guest,
                                                       mappers, readers):
    """A mapping on guest a, a reader holding the file open on guest b, a writer
    on b and a host-local writer: every msync'ed store is what b and the host
    read next, every write of b or the host is what a's mapping loads next,
    and stores still dirty when another writer comes are laundered, not lost;
    munmap and close write back the rest."""
    if not _fanotify_usable(export):
        pytest.skip("fanotify pre-content is not usable here: host-local writes unseen")
    pages = 4
    (export / "c.bin").write_bytes(page("0") * pages)
    _, address = start_host(export, "--clean-after", "50")
    a = mount_guest(address, "a")
    b = mount_guest(address, "b")
    mapper = mappers(a.path("c.bin"), pages * PAGE)
    reader = readers(b.path("c.bin"))
    assert reader.pread(0, pages * PAGE) == page("0") * pages

    expect = [page("0") for _ in range(pages)]
    for round_ in range(6):
        # a stores into page 0 and syncs: b and the host read it next.
        expect[0] = page(f"a{round_}")
        mapper.store(0, expect[0])
        mapper.msync()
        assert (export / "c.bin").read_bytes()[:PAGE] == expect[0], round_
        assert reader.pread(0, PAGE) == expect[0], round_
        # The host writes page 1, b writes page 2: a's mapping loads them next.
        expect[1] = page(f"h{round_}")
        host_local_pwrite(export / "c.bin", PAGE, expect[1])
        assert mapper.load(PAGE, PAGE) == expect[1], round_
        expect[2] = page(f"b{round_}")
        pwrite(b.path("c.bin"), 2 * PAGE, expect[2], fsync=round_ % 2 == 0)
        assert mapper.load(2 * PAGE, PAGE) == expect[2], round_
        # a stores into page 3 and does not sync; the next writer's recall of
        # that page (the host's, then b's, each writing 16 bytes into it)
        # writes the store back before that write lands on it.
        stored = page(f"d{round_}")
        mapper.store(3 * PAGE, stored)
        writer = host_local_pwrite if round_ % 2 else (
            lambda _path, off, data: pwrite(b.path("c.bin"), off, data, fsync=False))
        writer(export / "c.bin", 3 * PAGE + 200, b"w" * 16)
        expect[3] = stored[:200] + b"w" * 16 + stored[216:]
        assert (export / "c.bin").read_bytes() == b"".join(expect), round_
        assert reader.pread(0, pages * PAGE) == b"".join(expect), round_
        assert mapper.load(0, pages * PAGE) == b"".join(expect), round_
    expect[0] = page("z")
    mapper.store(0, expect[0])  # no msync: munmap writes it back
    mapper.munmap_and_close()
    assert (export / "c.bin").read_bytes() == b"".join(expect)
    assert reader.pread(0, pages * PAGE) == b"".join(expect)
