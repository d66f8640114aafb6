"""A mount that was sent data without a lease is recalled before the next write lands.

The kernel's page cache takes every READ reply, leased or not.  The guest
drops an unleased one again soon (R4, docs/mount.md), but "soon" is a window:
a write landing in it, on a DIRTY inode that recalls nobody, left old bytes
visible through a mapping (`cleanlease chaos-mount`, seed 2: three stale
mapping reads while the guest was running).  So a mount says
FEATURE_CACHES_UNLEASED in its HELLO, and the host counts it as one to recall
before the next modification of an inode it read without a lease.
"""

from __future__ import annotations

import os
import sys

import pytest

from tests.conftest import Child
from tests.test_mount import mount_guest, pwrite  # noqa: F401  (a fixture)

_MAPPER = """
import mmap, os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
m = mmap.mmap(fd, 4096, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ)
print("OPEN", flush=True)
for line in sys.stdin:
    print(m[:16].hex(), flush=True)
"""


def test_a_mapping_on_a_mount_that_read_a_dirty_file_sees_the_next_write_at_once(
        export, start_host, mount_guest):  # noqa: F811
    """R4's own drop is held back (CLEANLEASE_MOUNT_HOLD_PURGES=1), so only the
    host's recall can take the old page out.  Before FEATURE_CACHES_UNLEASED the
    mapping read the old bytes after the write had returned."""
    if not os.path.exists("/dev/fuse") or os.geteuid() != 0:
        pytest.skip("needs /dev/fuse and root")
    (export / "f").write_bytes(b"A" * 4096)
    _, address = start_host(export, "--clean-after", "600000", "--lease-term", "1000",
                            "--ack-timeout", "300")
    reader = mount_guest(address, "r", env={**os.environ, "CLEANLEASE_MOUNT_HOLD_PURGES": "1"})
    writer = mount_guest(address, "w")
    pwrite(writer.path("f"), 0, b"B" * 4096, fsync=False)  # DIRTY from now on: no lease
    mapper = Child([sys.executable, "-c", _MAPPER, reader.path("f")], "mapper")
    try:
        assert mapper.line().strip() == "OPEN"

        def mapped() -> bytes:
            mapper.proc.stdin.write(b"map\n")
            mapper.proc.stdin.flush()
            return bytes.fromhex(mapper.line().strip())

        assert mapped() == b"B" * 16  # an unleased READ: the page is in the reader's cache
        pwrite(writer.path("f"), 0, b"C" * 4096, fsync=False)  # returns once it has landed
        assert mapped() == b"C" * 16  # begun after the write completed: not the old bytes
    finally:
        mapper.stop()
