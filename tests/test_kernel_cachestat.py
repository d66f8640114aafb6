"""host/cachestat.py against the real kernel (cachestat(2), Linux >= 6.5).

Files live in a temporary directory under /tmp, which is ext4 here; the
tests skip with the probe's reason where cachestat is missing or the file
system keeps no dirty state (tmpfs).
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile

import pytest

from host import cachestat
from host.cachestat import CacheStat


@pytest.fixture
def tmpdir_ext4():
    d = tempfile.mkdtemp(prefix="cleanlease-cs-", dir="/tmp")
    try:
        ok, why = cachestat.available(d)
        if not ok:
            pytest.skip(f"cachestat on {d}: {why}")
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def fd(tmpdir_ext4):
    fd = os.open(os.path.join(tmpdir_ext4, "f"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        yield fd
    finally:
        os.close(fd)


def test_empty_file_is_clean(fd):
    st = cachestat.cachestat(fd)
    assert isinstance(st, CacheStat)
    assert st == CacheStat(0, 0, 0, 0, 0)
    assert cachestat.is_clean(fd)


def test_dirty_after_pwrite_clean_after_fdatasync(fd):
    os.pwrite(fd, b"x" * 10000, 0)
    st = cachestat.cachestat(fd)
    assert st.nr_dirty > 0 and st.nr_cache >= st.nr_dirty
    assert not st.clean
    assert not cachestat.is_clean(fd)
    os.fdatasync(fd)
    st = cachestat.cachestat(fd)
    assert st.nr_dirty == 0 and st.nr_writeback == 0 and st.nr_cache > 0
    assert cachestat.is_clean(fd)


def test_one_byte_dirty_again_after_clean(fd):
    os.pwrite(fd, b"x" * 8192, 0)
    os.fsync(fd)
    assert cachestat.is_clean(fd)
    os.pwrite(fd, b"y", 4096)
    assert not cachestat.is_clean(fd)


def test_range_arguments(fd):
    far = 64 << 20  # well apart, so large folios cannot join the two ranges
    os.pwrite(fd, b"a", 0)
    os.pwrite(fd, b"b", far)
    os.fdatasync(fd)
    os.pwrite(fd, b"c", far)
    assert cachestat.cachestat(fd, 0, 4096).nr_dirty == 0
    assert cachestat.cachestat(fd, far, 4096).nr_dirty > 0
    assert cachestat.cachestat(fd, far).nr_dirty > 0  # length 0: to end of file
    assert not cachestat.is_clean(fd)


def test_chmod_does_not_dirty_page_cache(fd):
    os.pwrite(fd, b"x", 0)
    os.fdatasync(fd)
    os.fchmod(fd, 0o600)
    assert cachestat.is_clean(fd)  # inode metadata is not page cache


def test_read_only_fd_as_owner(tmpdir_ext4, fd):
    os.pwrite(fd, b"x", 0)
    ro = os.open(os.path.join(tmpdir_ext4, "f"), os.O_RDONLY | os.O_CLOEXEC)
    try:
        assert not cachestat.is_clean(ro)  # root / owner may use an O_RDONLY fd
    finally:
        os.close(ro)


def test_errors_are_oserror():
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    with pytest.raises(OSError) as ei:
        cachestat.cachestat(w)
    assert ei.value.errno == errno.EBADF
    with pytest.raises(ValueError):
        cachestat.cachestat(0, -1)


def test_available_reasons(tmpdir_ext4):
    assert cachestat.available(tmpdir_ext4) == (True, "ok")
    fd = os.open(tmpdir_ext4, os.O_RDONLY)
    try:
        assert cachestat.available(fd) == (True, "ok")
    finally:
        os.close(fd)
    ok, why = cachestat.available(os.path.join(tmpdir_ext4, "missing"))
    assert not ok and "cannot open" in why
    if os.path.isdir("/dev/shm"):
        ok, why = cachestat.available("/dev/shm")
        if not ok:
            assert "tmpfs" in why or "ramfs" in why
