"""The mount as a real file system: a non-root user's files, ownership kept by
`cp -a` and `tar -x -p`, setuid/setgid cleared by a non-owner's write, and a
short pjdfstest subset against plain ext4 (workload/posix.py; `make posix`
runs all of it).

Real processes throughout: a `cleanlease host`, a `cleanlease guest --mount`,
and the commands (as root or as `nobody`, through setpriv) on the mount.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile

import pytest

from host.linux.credentials import can_switch
from tests.conftest import ROOT
from tests.test_mount import MountedGuest
from workload import posix

pytestmark = pytest.mark.skipif(not can_switch(), reason="caller identity needs a root daemon")

NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--"]


def _sh(script: str, as_user: bool = False, cwd: str | None = None) -> str:
    argv = (NOBODY if as_user else []) + ["sh", "-ec", script]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30, cwd=cwd)
    assert done.returncode == 0, f"{script!r}: {done.stderr}"
    return done.stdout


@pytest.fixture
def mounted(export, start_host):
    """The export mounted where any user can reach it (pytest's tmp_path is 0700)."""
    os.chmod(export, 0o777)
    _, address = start_host(export, "--detector", "none")
    base = tempfile.mkdtemp(prefix="cleanlease-mount.", dir="/tmp")
    os.chmod(base, 0o755)
    guest = MountedGuest(address, os.path.join(base, "mnt"), "posix")
    try:
        yield guest.mountpoint
    finally:
        guest.stop()
        shutil.rmtree(base, ignore_errors=True)


def test_a_non_root_user_creates_appends_chmods_and_root_chowns(export, mounted):
    _sh(f"cd {mounted} && touch t && echo one > f && echo two >> f && chmod 640 f && "
        "mkdir d && ln -s f l && ln f h && touch -d @1000000000 t", as_user=True)
    st = os.stat(export / "f")
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode), st.st_nlink) == (65534, 65534,
                                                                           0o640, 2)
    assert (export / "f").read_bytes() == b"one\ntwo\n"
    assert os.stat(export / "d").st_uid == 65534 and os.lstat(export / "l").st_uid == 65534
    assert os.readlink(export / "l") == "f" and os.stat(export / "t").st_mtime == 1000000000
    _sh(f"chown 123:456 {mounted}/f && chown -h 7:8 {mounted}/l")
    assert (os.stat(export / "f").st_uid, os.stat(export / "f").st_gid) == (123, 456)
    assert (os.lstat(export / "l").st_uid, os.lstat(export / "l").st_gid) == (7, 8)
    done = subprocess.run(NOBODY + ["chown", "65534", f"{mounted}/f"], capture_output=True)
    assert done.returncode != 0  # not the owner any more


def test_cp_a_and_tar_p_keep_owners_and_modes(export, mounted, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_bytes(b"a")
    os.chown(src / "a", 1001, 1002)
    os.chmod(src / "a", 0o4750)
    (src / "sub").mkdir(mode=0o2770)
    os.chown(src / "sub", 1003, 1004)
    os.symlink("a", src / "ln")
    os.chown(src / "ln", 1005, 1006, follow_symlinks=False)
    _sh(f"cp -a {src} {mounted}/copy && tar -C {tmp_path} -cf {tmp_path}/t.tar src && "
        f"mkdir {mounted}/untar && tar -C {mounted}/untar -xpf {tmp_path}/t.tar")
    for top in ("copy", "untar/src"):
        for name in ("a", "sub", "ln"):
            want, got = os.lstat(src / name), os.lstat(export / top / name)
            assert (got.st_uid, got.st_gid, got.st_mode) == (want.st_uid, want.st_gid,
                                                             want.st_mode), (top, name)


def test_a_non_owners_write_clears_setuid_and_setgid(export, mounted):
    (export / "s").write_bytes(b"0")
    os.chmod(export / "s", 0o6777)
    _sh(f"printf x >> {mounted}/s", as_user=True)
    assert stat.S_IMODE(os.stat(export / "s").st_mode) == 0o777
    (export / "t").write_bytes(b"0")
    os.chmod(export / "t", 0o6777)
    _sh(f"printf x >> {mounted}/t")  # root keeps them (CAP_FSETID), as on ext4
    assert stat.S_IMODE(os.stat(export / "t").st_mode) == 0o6777


def test_df_shows_the_exports_file_system(export, mounted):
    v, out = os.statvfs(export), _sh(f"stat -f -c '%b %S %l' {mounted}")
    assert out.split() == [str(v.f_blocks), str(v.f_frsize), str(v.f_namemax)]


def test_pjdfstest_subset_passes_where_ext4_does():
    """A few hundred pjdfstest cases across the syscall families, on ext4 and on a
    clean-lease mount: every file that passes on ext4 passes on the mount."""
    if not os.path.isdir(os.path.join(posix.THIRDPARTY, "pjdfstest")):
        pytest.skip(f"pjdfstest is not at {posix.THIRDPARTY}")
    # --detector none: pjdfstest makes no host-local change, so no detector has
    # anything to see.  (With inotify its echo of the daemon's own changes once
    # made a last `rmdir` flaky: docs/mount.md, "POSIX", and
    # tests/test_mount.py::test_a_recalled_name_of_a_working_directory_keeps_it_usable.)
    done = subprocess.run([sys.executable, "-m", "workload.posix", "--subset", "--timeout", "60",
                           "--detector", "none"], capture_output=True, text=True,
                          timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    # Rows by their first word: a fresh checkout prints what it built first.
    rows = {words[0]: words for words in map(str.split, done.stdout.splitlines()) if words}
    assert "ext4" in rows and "mount" in rows and int(rows["mount"][2]) >= 500, done.stdout


def test_fsx_in_its_default_mode_passes_on_the_mount(mounted):
    """fsx (../shared/thirdparty) in its default mode: reads, writes, mapped reads
    and mapped writes (stores through a shared writable mapping, then msync),
    truncates, fallocate, punch hole, zero range and copy_file_range against its
    in-memory model; fsx disables what the file system refuses (ENOSYS or
    EOPNOTSUPP), so the test checks that it kept them.  `make fsx` runs 100,000
    operations on 3 seeds (docs/mount.md, "Shared writable mappings")."""
    fsx = os.path.join(posix.BUILD, "fsx")
    if not os.path.exists(fsx):
        if not os.path.isdir(os.path.join(posix.THIRDPARTY, "fsx")):
            pytest.skip(f"fsx is not at {posix.THIRDPARTY}")
        posix.ensure_built(fsx)
    done = subprocess.run([fsx, "-N", "2000", "-S", "7", "-P", mounted,
                           os.path.join(mounted, "fsx.file")], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and "A-OK" in done.stdout, done.stdout[-3000:] + done.stderr
    # Every fallocate mode the guest's kernel passes to a FUSE server ran (it passes
    # KEEP_SIZE, PUNCH_HOLE and ZERO_RANGE only), and copy_file_range and the
    # mappings did.
    disabled = [line for line in done.stdout.splitlines() + done.stderr.splitlines()
                if "disabling" in line or "mmap" in line]
    assert not any("copy range" in line or "mmap" in line for line in disabled), disabled
    modes = {line.split("fallocate mode ")[1].split(",")[0] for line in disabled
             if "fallocate mode" in line}
    assert modes <= {"FALLOC_FL_COLLAPSE_RANGE", "FALLOC_FL_INSERT_RANGE",
                     "FALLOC_FL_UNSHARE_RANGE"}, disabled


@pytest.mark.parametrize("policy", ["always", "clean-lease"])
def test_readdirplus_saves_the_lookups_of_a_listing_where_it_can(export, start_host, policy):
    """`ls -l` of 20 files: under always (attributes cached without a lease) the
    entries come with the listing (READDIRPLUS) and no LOOKUP follows; under
    the lease policies the mount does not ask for it (an entry's attributes
    would need a lease of their own), and each name is looked up."""
    for i in range(20):
        (export / f"f{i}").write_bytes(b"x" * i)
    _, address = start_host(export, "--detector", "none", "--policy", policy)
    base = tempfile.mkdtemp(prefix="cleanlease-mount.", dir="/tmp")
    guest = MountedGuest(address, os.path.join(base, "mnt"), "ls")
    try:
        out = _sh(f"ls -l {guest.mountpoint}")
        sizes = sorted(int(line.split()[4]) for line in out.splitlines()[1:])
        assert sizes == list(range(20))
        stats = guest.stats()
        assert stats["lookups"] == (0 if policy == "always" else 20), stats
        assert stats["errors"] == 0 and not stats["enosys"], stats
    finally:
        guest.stop()
        shutil.rmtree(base, ignore_errors=True)
