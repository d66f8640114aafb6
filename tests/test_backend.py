"""ExportFS and InodeStore against a real directory: round trips, identity,
confinement, ownership and limits."""

from __future__ import annotations

import errno
import os
import stat

import pytest

from host.backend import (
    DT_DIR,
    DT_LNK,
    DT_REG,
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    ExportFS,
)
from host.inodes import ROOT_NODEID, InodeStore

A, B = 1, 2
SECRET = b"TOP-SECRET-CONTENT-outside-the-export\n"


@pytest.fixture
def dirs(tmp_path):
    export = tmp_path / "export"
    outside = tmp_path / "outside"
    export.mkdir()
    outside.mkdir()
    (outside / "secret").write_bytes(SECRET)
    return export, outside


@pytest.fixture
def fs(dirs):
    f = ExportFS(dirs[0])
    yield f
    f.close()


def errno_of(fn, *args, **kw) -> int:
    with pytest.raises(OSError) as info:
        fn(*args, **kw)
    assert info.value.errno in errno.errorcode  # a real errno, not None
    return info.value.errno


def open_fds() -> set[int]:
    # Includes the fd listdir itself uses, the same in every call.
    return {int(n) for n in os.listdir("/proc/self/fd")}


def make_file(fs, owner, name, data=b"", parent=ROOT_NODEID):
    nodeid, _, fh = fs.create(owner, parent, name, os.O_RDWR, 0o644)
    if data:
        assert fs.write(owner, fh, 0, data) == len(data)
    fs.release(owner, fh)
    return nodeid


# -- round trips ---------------------------------------------------------------


def test_root_is_visible_to_every_owner(fs, dirs):
    want = os.stat(dirs[0]).st_ino
    assert fs.getattr(A, ROOT_NODEID).st_ino == want
    assert fs.getattr(B, ROOT_NODEID).st_ino == want
    assert fs.getattr(99, ROOT_NODEID).st_ino == want


def test_create_write_read_round_trip(fs, dirs):
    nodeid, st, fh = fs.create(A, ROOT_NODEID, b"f", os.O_RDWR, 0o640)
    assert stat.S_ISREG(st.st_mode)
    assert st.st_ino == os.stat(dirs[0] / "f").st_ino
    assert fs.write(A, fh, 0, b"hello world") == 11
    assert fs.write(A, fh, 6, memoryview(bytearray(b"WORLD"))) == 5
    assert fs.read(A, fh, 0, 100) == b"hello WORLD"
    assert fs.read(A, fh, 6, 3) == b"WOR"
    assert fs.read(A, fh, 100, 10) == b""
    fs.flush(A, fh)
    fs.fsync(A, fh, True)()
    fs.fsync(A, fh, False)()
    assert fs.read(A, fh, 0, 5) == b"hello"  # flush left the handle open
    assert fs.nodeid_of_handle(A, fh) == nodeid
    fs.release(A, fh)
    assert (dirs[0] / "f").read_bytes() == b"hello WORLD"
    assert fs.getattr(A, nodeid).st_size == 11
    again, st2 = fs.lookup(A, ROOT_NODEID, b"f")
    assert again == nodeid and st2.st_size == 11


def test_open_flags_are_honoured(fs, dirs):
    nodeid = make_file(fs, A, b"f", b"0123456789")
    ro = fs.open(A, nodeid, os.O_RDONLY)
    assert errno_of(fs.write, A, ro, 0, b"x") == errno.EBADF
    wo = fs.open(A, nodeid, os.O_WRONLY)
    assert errno_of(fs.read, A, wo, 0, 1) == errno.EBADF
    ap = fs.open(A, nodeid, os.O_WRONLY | os.O_APPEND)
    fs.write(A, ap, 0, b"AB")  # Linux pwrite on O_APPEND appends anyway
    assert (dirs[0] / "f").read_bytes() == b"0123456789AB"
    # O_CREAT/O_EXCL mean nothing to open() of an existing nodeid.
    ex = fs.open(A, nodeid, os.O_RDONLY | os.O_CREAT | os.O_EXCL)
    assert fs.read(A, ex, 0, 2) == b"01"
    tr = fs.open(A, nodeid, os.O_WRONLY | os.O_TRUNC)
    assert os.stat(dirs[0] / "f").st_size == 0
    for fh in (ro, wo, ap, ex, tr):
        fs.release(A, fh)
    assert errno_of(fs.open, A, nodeid, os.O_ACCMODE) == errno.EINVAL


def test_create_exclusive_and_create_or_open(fs, dirs):
    make_file(fs, A, b"f", b"keep")
    assert errno_of(fs.create, A, ROOT_NODEID, b"f", os.O_RDWR | os.O_EXCL, 0o644) == errno.EEXIST
    nodeid, st, fh = fs.create(A, ROOT_NODEID, b"f", os.O_RDWR, 0o644)
    assert fs.read(A, fh, 0, 10) == b"keep"
    fs.release(A, fh)
    _, _, fh = fs.create(A, ROOT_NODEID, b"f", os.O_RDWR | os.O_TRUNC, 0o644)
    assert fs.getattr(A, nodeid).st_size == 0
    fs.release(A, fh)
    os.mkdir(dirs[0] / "d")
    assert errno_of(fs.create, A, ROOT_NODEID, b"d", os.O_RDWR, 0o644) == errno.EISDIR


def test_readdir_lists_sorted_entries_with_types(fs, dirs):
    export = dirs[0]
    make_file(fs, A, b"zeta")
    fs.mkdir(A, ROOT_NODEID, b"beta", 0o755)
    os.symlink("zeta", export / "alpha")
    (export / "\udcff-raw").write_bytes(b"")  # a name that is not UTF-8
    got = fs.readdir(A, ROOT_NODEID)
    assert [name for name, _, _ in got] == [b"alpha", b"beta", b"zeta", b"\xff-raw"]
    types = {name: t for name, _, t in got}
    assert types == {b"alpha": DT_LNK, b"beta": DT_DIR, b"zeta": DT_REG, b"\xff-raw": DT_REG}
    inos = {name: ino for name, ino, _ in got}
    assert inos[b"alpha"] == os.lstat(export / "alpha").st_ino
    assert inos[b"zeta"] == os.stat(export / "zeta").st_ino
    zeta, _ = fs.lookup(A, ROOT_NODEID, b"zeta")
    assert errno_of(fs.readdir, A, zeta) == errno.ENOTDIR


def test_mkdir_rmdir_unlink(fs, dirs):
    export = dirs[0]
    d, st = fs.mkdir(A, ROOT_NODEID, b"d", 0o750)
    assert stat.S_ISDIR(st.st_mode) and (export / "d").is_dir()
    assert errno_of(fs.mkdir, A, ROOT_NODEID, b"d", 0o750) == errno.EEXIST
    f = make_file(fs, A, b"f", b"x", parent=d)
    assert fs.readdir(A, d) == [(b"f", os.stat(export / "d" / "f").st_ino, DT_REG)]
    assert errno_of(fs.rmdir, A, ROOT_NODEID, b"d") == errno.ENOTEMPTY
    assert errno_of(fs.unlink, A, ROOT_NODEID, b"d") == errno.EISDIR
    assert errno_of(fs.rmdir, A, d, b"f") == errno.ENOTDIR
    # An unlinked file stays reachable through the nodeid already issued.
    fh = fs.open(A, f, os.O_RDONLY)
    fs.unlink(A, d, b"f")
    assert not (export / "d" / "f").exists()
    assert errno_of(fs.lookup, A, d, b"f") == errno.ENOENT
    assert fs.read(A, fh, 0, 1) == b"x"
    assert fs.getattr(A, f).st_nlink == 0
    fs.release(A, fh)
    fs.rmdir(A, ROOT_NODEID, b"d")
    assert not (export / "d").exists()
    assert errno_of(fs.lookup, A, ROOT_NODEID, b"d") == errno.ENOENT


def test_rename_keeps_the_nodeid(fs, dirs):
    export = dirs[0]
    f = make_file(fs, A, b"old", b"data")
    d, _ = fs.mkdir(A, ROOT_NODEID, b"d", 0o755)
    fs.rename(A, ROOT_NODEID, b"old", d, b"new")
    assert (export / "d" / "new").read_bytes() == b"data"
    assert errno_of(fs.lookup, A, ROOT_NODEID, b"old") == errno.ENOENT
    assert fs.lookup(A, d, b"new")[0] == f
    # A host-local rename too: the inode, not the name, is the identity.
    os.rename(export / "d" / "new", export / "moved")
    assert fs.lookup(A, ROOT_NODEID, b"moved")[0] == f
    assert fs.inode_key(f) == (os.stat(export / "moved").st_dev, os.stat(export / "moved").st_ino)


def test_rename_flags(fs, dirs):
    export = dirs[0]
    a = make_file(fs, A, b"a", b"AAA")
    b = make_file(fs, A, b"b", b"BBB")
    assert errno_of(fs.rename, A, ROOT_NODEID, b"a", ROOT_NODEID, b"b", RENAME_NOREPLACE) == errno.EEXIST
    assert (export / "b").read_bytes() == b"BBB"
    fs.rename(A, ROOT_NODEID, b"a", ROOT_NODEID, b"b", RENAME_EXCHANGE)
    assert (export / "a").read_bytes() == b"BBB" and (export / "b").read_bytes() == b"AAA"
    assert fs.lookup(A, ROOT_NODEID, b"a")[0] == b
    assert fs.lookup(A, ROOT_NODEID, b"b")[0] == a
    fs.rename(A, ROOT_NODEID, b"a", ROOT_NODEID, b"c", RENAME_NOREPLACE)
    assert (export / "c").read_bytes() == b"BBB"
    assert errno_of(fs.rename, A, ROOT_NODEID, b"c", ROOT_NODEID, b"d", 4) == errno.EINVAL


def test_hard_link_is_the_same_nodeid(fs, dirs):
    export = dirs[0]
    f = make_file(fs, A, b"one", b"x")
    os.link(export / "one", export / "two")
    two, st = fs.lookup(A, ROOT_NODEID, b"two")
    assert two == f and st.st_nlink == 2
    assert fs.inodes.lookup_count(A, f) == 2
    assert len(fs.inodes) == 2  # root + one inode, one fd


def test_setattr_size_mode_times(fs, dirs):
    path = dirs[0] / "f"
    f = make_file(fs, A, b"f", b"0123456789")
    assert fs.setattr(A, f, size=4).st_size == 4
    assert path.read_bytes() == b"0123"
    assert fs.setattr(A, f, size=6).st_size == 6
    assert path.read_bytes() == b"0123\0\0"
    fh = fs.open(A, f, os.O_RDWR)
    assert fs.setattr(A, f, size=1, fh=fh).st_size == 1
    assert path.read_bytes() == b"0"
    st = fs.setattr(A, f, mode=0o604)
    assert stat.S_IMODE(st.st_mode) == 0o604 == stat.S_IMODE(os.stat(path).st_mode)
    st = fs.setattr(A, f, atime_ns=1_000_000_001, mtime_ns=2_000_000_002)
    assert (st.st_atime_ns, st.st_mtime_ns) == (1_000_000_001, 2_000_000_002)
    assert os.stat(path).st_mtime_ns == 2_000_000_002
    st = fs.setattr(A, f, atime_ns=5_000_000_000)
    assert (st.st_atime_ns, st.st_mtime_ns) == (5_000_000_000, 2_000_000_002)
    # Times are applied after the size, so a truncate does not undo them.
    st = fs.setattr(A, f, size=0, mtime_ns=7_000_000_000)
    assert (st.st_size, st.st_mtime_ns) == (0, 7_000_000_000)
    fs.release(A, fh)
    d, _ = fs.mkdir(A, ROOT_NODEID, b"d", 0o755)
    assert errno_of(fs.setattr, A, d, size=0) == errno.EISDIR
    assert stat.S_IMODE(fs.setattr(A, d, mode=0o700).st_mode) == 0o700
    assert errno_of(fs.setattr, A, f, mode="0644") == errno.EINVAL
    assert errno_of(fs.setattr, A, f, size=-1) == errno.EINVAL


def test_setattr_fh_must_be_the_owners_and_on_the_nodeid(fs):
    f = make_file(fs, A, b"f", b"abc")
    g = make_file(fs, A, b"g", b"abc")
    fh = fs.open(A, f, os.O_RDWR)
    fs.lookup(B, ROOT_NODEID, b"f")
    assert errno_of(fs.setattr, B, f, size=0, fh=fh) == errno.EBADF
    assert errno_of(fs.setattr, A, g, size=0, fh=fh) == errno.EBADF
    assert fs.getattr(A, f).st_size == 3 and fs.getattr(A, g).st_size == 3


# -- names are one component -------------------------------------------------------


BAD_NAMES = [
    (b"..", errno.EINVAL),
    (b".", errno.EINVAL),
    (b"", errno.EINVAL),
    (b"a/b", errno.EINVAL),
    (b"/etc", errno.EINVAL),
    (b"x\0y", errno.EINVAL),
    (b"n" * 256, errno.ENAMETOOLONG),
    ("str-name", errno.EINVAL),
    (None, errno.EINVAL),
]


@pytest.mark.parametrize("name,want", BAD_NAMES, ids=repr)
def test_bad_names_are_refused_everywhere(fs, dirs, name, want):
    export, outside = dirs
    (export / "sub").mkdir()
    sub, _ = fs.lookup(A, ROOT_NODEID, b"sub")
    (export / "sub" / "a").mkdir()
    (export / "sub" / "a" / "b").write_bytes(b"nested")
    ok = make_file(fs, A, b"ok")
    assert errno_of(fs.lookup, A, sub, name) == want
    assert errno_of(fs.create, A, sub, name, os.O_RDWR, 0o644) == want
    assert errno_of(fs.mkdir, A, sub, name, 0o755) == want
    assert errno_of(fs.unlink, A, sub, name) == want
    assert errno_of(fs.rmdir, A, sub, name) == want
    assert errno_of(fs.rename, A, ROOT_NODEID, b"ok", sub, name) == want
    assert errno_of(fs.rename, A, sub, name, ROOT_NODEID, b"ok2") == want
    # Nothing moved, nothing was created or removed anywhere.
    assert sorted(os.listdir(export)) == ["ok", "sub"]
    assert sorted(os.listdir(export / "sub")) == ["a"]
    assert (export / "sub" / "a" / "b").read_bytes() == b"nested"
    assert os.listdir(outside) == ["secret"]
    assert fs.lookup(A, ROOT_NODEID, b"ok")[0] == ok


def test_name_of_255_bytes_is_fine(fs, dirs):
    name = b"n" * 255
    nodeid, _, fh = fs.create(A, ROOT_NODEID, name, os.O_RDWR, 0o644)
    fs.release(A, fh)
    assert fs.lookup(A, ROOT_NODEID, name)[0] == nodeid


def test_dotdot_cannot_climb_out_of_root(fs, dirs):
    # The outside dir is a sibling: ../outside/secret would reach it.
    assert errno_of(fs.lookup, A, ROOT_NODEID, b"..") == errno.EINVAL
    assert errno_of(fs.lookup, A, ROOT_NODEID, b"../outside") == errno.EINVAL
    assert errno_of(fs.create, A, ROOT_NODEID, b"../outside/secret", os.O_RDWR | os.O_TRUNC, 0o644) == errno.EINVAL
    assert (dirs[1] / "secret").read_bytes() == SECRET


# -- symlinks are never followed ---------------------------------------------------


def test_symlink_to_a_file_outside_is_never_followed(fs, dirs):
    export, outside = dirs
    secret = outside / "secret"
    os.symlink(secret, export / "link")
    # The setup would leak: following the link by path reads the secret.
    assert (export / "link").read_bytes() == SECRET

    link, st = fs.lookup(A, ROOT_NODEID, b"link")
    assert stat.S_ISLNK(st.st_mode)
    assert st.st_size == len(os.fsencode(secret))  # lstat, not stat
    assert stat.S_ISLNK(fs.getattr(A, link).st_mode)
    for flags in (os.O_RDONLY, os.O_RDWR, os.O_WRONLY | os.O_TRUNC, os.O_RDONLY | os.O_APPEND):
        assert errno_of(fs.open, A, link, flags) == errno.ELOOP
    for flags in (os.O_RDONLY, os.O_RDWR | os.O_TRUNC):
        assert errno_of(fs.create, A, ROOT_NODEID, b"link", flags, 0o644) == errno.ELOOP
    assert errno_of(fs.create, A, ROOT_NODEID, b"link", os.O_RDWR | os.O_EXCL, 0o644) == errno.EEXIST
    assert errno_of(fs.setattr, A, link, size=0) == errno.ELOOP
    assert errno_of(fs.setattr, A, link, mode=0o777) == errno.EOPNOTSUPP
    assert errno_of(fs.writable_fd, link) == errno.ELOOP
    assert errno_of(fs.readdir, A, link) == errno.ENOTDIR
    before = os.stat(secret)
    st = fs.setattr(A, link, atime_ns=3_000_000_000, mtime_ns=4_000_000_000)
    assert stat.S_ISLNK(st.st_mode) and st.st_mtime_ns == 4_000_000_000
    assert os.lstat(export / "link").st_mtime_ns == 4_000_000_000
    after = os.stat(secret)
    assert (after.st_mtime_ns, after.st_atime_ns, stat.S_IMODE(after.st_mode), after.st_size) == (
        before.st_mtime_ns,
        before.st_atime_ns,
        stat.S_IMODE(before.st_mode),
        before.st_size,
    )
    assert secret.read_bytes() == SECRET
    assert fs.handles_of(A) == 0


def test_symlinked_directory_outside_cannot_be_walked_through(fs, dirs):
    export, outside = dirs
    os.symlink(outside, export / "outdir")
    assert (export / "outdir" / "secret").read_bytes() == SECRET  # would leak

    outdir, st = fs.lookup(A, ROOT_NODEID, b"outdir")
    assert stat.S_ISLNK(st.st_mode)
    assert errno_of(fs.lookup, A, outdir, b"secret") == errno.ENOTDIR
    assert errno_of(fs.readdir, A, outdir) == errno.ENOTDIR
    assert errno_of(fs.create, A, outdir, b"new", os.O_RDWR, 0o644) == errno.ENOTDIR
    assert errno_of(fs.create, A, outdir, b"secret", os.O_RDWR | os.O_TRUNC, 0o644) == errno.ENOTDIR
    assert errno_of(fs.mkdir, A, outdir, b"newdir", 0o755) == errno.ENOTDIR
    assert errno_of(fs.unlink, A, outdir, b"secret") == errno.ENOTDIR
    assert errno_of(fs.rename, A, outdir, b"secret", ROOT_NODEID, b"stolen") == errno.ENOTDIR
    assert os.listdir(outside) == ["secret"]
    assert (outside / "secret").read_bytes() == SECRET
    assert not (export / "stolen").exists()


def test_symlink_swapped_in_after_lookup_does_not_redirect(fs, dirs):
    export, outside = dirs
    f = make_file(fs, A, b"f", b"inside")
    os.symlink(outside / "secret", export / "tmp")
    os.rename(export / "tmp", export / "f")  # host-local swap
    assert (export / "f").read_bytes() == SECRET  # by path it now leaks

    fh = fs.open(A, f, os.O_RDWR)
    assert fs.read(A, fh, 0, 100) == b"inside"
    fs.write(A, fh, 0, b"INSIDE")
    fs.setattr(A, f, size=3)
    fs.release(A, fh)
    assert (outside / "secret").read_bytes() == SECRET
    assert stat.S_ISREG(fs.getattr(A, f).st_mode)
    # The name is now the symlink: a new nodeid, and it opens nothing.
    link, st = fs.lookup(A, ROOT_NODEID, b"f")
    assert link != f and stat.S_ISLNK(st.st_mode)
    assert errno_of(fs.open, A, link, os.O_RDONLY) == errno.ELOOP


def test_directory_swapped_for_symlink_after_lookup_stays_inside(fs, dirs):
    export, outside = dirs
    d, _ = fs.mkdir(A, ROOT_NODEID, b"d", 0o755)
    make_file(fs, A, b"mine", b"mine", parent=d)
    os.rename(export / "d", export / "d.moved")
    os.symlink(outside, export / "d")
    assert (export / "d" / "secret").read_bytes() == SECRET  # by path it leaks

    assert errno_of(fs.lookup, A, d, b"secret") == errno.ENOENT
    assert [name for name, _, _ in fs.readdir(A, d)] == [b"mine"]
    nodeid, _, fh = fs.create(A, d, b"secret", os.O_RDWR | os.O_TRUNC, 0o644)
    assert fs.read(A, fh, 0, 100) == b""
    fs.release(A, fh)
    assert (export / "d.moved" / "secret").exists()
    assert (outside / "secret").read_bytes() == SECRET


@pytest.mark.parametrize("access", [os.O_RDONLY, os.O_WRONLY, os.O_RDWR])
def test_kernel_proc_reopen_of_a_symlink_opath_fd_does_not_follow(dirs, access):
    # The backend relies on this: the magic link /proc/self/fd/N of an O_PATH
    # fd of a symlink resolves to the symlink itself, which open() refuses.
    export, outside = dirs
    os.symlink(outside / "secret", export / "link")
    fd = os.open(export / "link", os.O_PATH | os.O_NOFOLLOW)
    try:
        assert stat.S_ISLNK(os.stat(fd).st_mode)
        with pytest.raises(OSError) as info:
            leaked = os.open(f"/proc/self/fd/{fd}", access)
            os.close(leaked)
        assert info.value.errno == errno.ELOOP
    finally:
        os.close(fd)


def test_kernel_o_nofollow_on_a_proc_reopen_always_fails(dirs):
    # Why _reopen passes no O_NOFOLLOW: it applies to the magic link itself.
    path = dirs[0] / "reg"
    path.write_bytes(b"x")
    fd = os.open(path, os.O_PATH | os.O_NOFOLLOW)
    try:
        with pytest.raises(OSError) as info:
            os.close(os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_NOFOLLOW))
        assert info.value.errno == errno.ELOOP
        data = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY)
        assert os.read(data, 1) == b"x"
        os.close(data)
    finally:
        os.close(fd)


def test_fifo_is_never_opened(fs, dirs):
    os.mkfifo(dirs[0] / "fifo")
    fifo, st = fs.lookup(A, ROOT_NODEID, b"fifo")
    assert stat.S_ISFIFO(st.st_mode)
    # Opening a FIFO for reading would block this test forever.
    assert errno_of(fs.open, A, fifo, os.O_RDONLY) == errno.EINVAL
    assert errno_of(fs.create, A, ROOT_NODEID, b"fifo", os.O_RDONLY, 0o644) == errno.EINVAL
    assert errno_of(fs.setattr, A, fifo, size=0) == errno.EINVAL
    assert dict((n, t) for n, _, t in fs.readdir(A, ROOT_NODEID))[b"fifo"] == 1  # DT_FIFO


# -- ownership -------------------------------------------------------------------


def test_handles_belong_to_their_owner(fs):
    f = make_file(fs, A, b"f", b"abc")
    fs.lookup(B, ROOT_NODEID, b"f")
    fh = fs.open(A, f, os.O_RDWR)
    assert errno_of(fs.read, B, fh, 0, 3) == errno.EBADF
    assert errno_of(fs.write, B, fh, 0, b"zzz") == errno.EBADF
    assert errno_of(fs.flush, B, fh) == errno.EBADF
    assert errno_of(fs.fsync, B, fh, True) == errno.EBADF
    assert errno_of(fs.nodeid_of_handle, B, fh) == errno.EBADF
    assert errno_of(fs.release, B, fh) == errno.EBADF
    assert fs.read(A, fh, 0, 3) == b"abc"  # still A's, still open
    fs.release(A, fh)
    assert errno_of(fs.read, A, fh, 0, 3) == errno.EBADF
    assert errno_of(fs.release, A, fh) == errno.EBADF
    assert errno_of(fs.read, A, 12345, 0, 3) == errno.EBADF
    assert errno_of(fs.read, A, "1", 0, 3) == errno.EBADF
    # Handle numbers are not reused.
    assert fs.open(A, f, os.O_RDONLY) != fh


def test_nodeids_belong_to_owners_that_looked_them_up(fs, dirs):
    (dirs[0] / "d").mkdir()
    (dirs[0] / "d" / "x").write_bytes(b"x")
    d, _ = fs.lookup(A, ROOT_NODEID, b"d")
    for call in (
        lambda: fs.getattr(B, d),
        lambda: fs.lookup(B, d, b"x"),
        lambda: fs.readdir(B, d),
        lambda: fs.open(B, d, os.O_RDONLY),
        lambda: fs.setattr(B, d, mode=0o777),
        lambda: fs.create(B, d, b"new", os.O_RDWR, 0o644),
        lambda: fs.unlink(B, d, b"x"),
        lambda: fs.forget(B, d, 1),
        lambda: fs.getattr(A, 999),
        lambda: fs.getattr(A, "2"),
        lambda: fs.lookup(A, 999, b"x"),
    ):
        assert errno_of(call) == errno.ESTALE
    assert stat.S_IMODE(os.stat(dirs[0] / "d").st_mode) != 0o777
    assert os.listdir(dirs[0] / "d") == ["x"]
    # Once B looks it up, B may use it too: the same nodeid.
    assert fs.lookup(B, ROOT_NODEID, b"d")[0] == d
    assert fs.readdir(B, d)[0][0] == b"x"


def test_forget_counts_and_never_reuses_nodeids(fs, dirs):
    make_file(fs, A, b"f")  # create counts one lookup
    f, _ = fs.lookup(A, ROOT_NODEID, b"f")
    assert fs.inodes.lookup_count(A, f) == 2
    key = fs.inode_key(f)
    fs.forget(A, f, 1)
    assert fs.getattr(A, f).st_ino == key[1]
    fs.forget(A, f, 1)
    assert errno_of(fs.getattr, A, f) == errno.ESTALE
    assert fs.inodes.lookup_key(*key) is None
    assert errno_of(fs.inode_key, f) == errno.ESTALE
    again, _ = fs.lookup(A, ROOT_NODEID, b"f")
    assert again != f and again > f
    assert errno_of(fs.forget, A, again, -1) == errno.EINVAL
    fs.forget(A, ROOT_NODEID, 5)  # no-op
    assert fs.getattr(A, ROOT_NODEID)


def test_forget_clamps_and_leaves_other_owners_alone(fs):
    f = make_file(fs, A, b"f", b"x")
    fs.lookup(B, ROOT_NODEID, b"f")
    fs.forget(A, f, 100)
    assert errno_of(fs.getattr, A, f) == errno.ESTALE
    assert fs.inodes.lookup_count(B, f) == 1
    assert fs.getattr(B, f).st_size == 1
    fs.forget(B, f, 1)
    assert errno_of(fs.inode_key, f) == errno.ESTALE


def test_open_handle_pins_the_inode_after_forget(fs):
    f = make_file(fs, A, b"f", b"pinned")
    fh = fs.open(A, f, os.O_RDONLY)
    key = fs.inode_key(f)
    fs.forget(A, f, 1)
    assert errno_of(fs.getattr, A, f) == errno.ESTALE
    assert fs.read(A, fh, 0, 10) == b"pinned"
    assert fs.inode_key(f) == key and fs.inodes.lookup_key(*key) == f
    fs.release(A, fh)
    assert fs.inodes.lookup_key(*key) is None


def test_drop_owner_closes_handles_and_forgets(fs):
    f = make_file(fs, A, b"f", b"x")
    fs.lookup(B, ROOT_NODEID, b"f")
    b_fh = fs.open(B, f, os.O_RDONLY)
    before = open_fds()
    g = make_file(fs, A, b"g")
    d, _ = fs.mkdir(A, ROOT_NODEID, b"d", 0o755)
    handles = [fs.open(A, n, os.O_RDONLY) for n in (f, f, g)]
    fs.writable_fd(g)
    assert len(open_fds()) == len(before) + 2 + 3 + 1  # g, d; 3 handles; writable
    assert fs.handles_of(A) == 3
    fs.drop_owner(A)
    assert open_fds() == before
    assert fs.handles_of(A) == 0
    for fh in handles:
        assert errno_of(fs.read, A, fh, 0, 1) == errno.EBADF
    for n in (f, g, d):
        assert errno_of(fs.getattr, A, n) == errno.ESTALE
    # B's lookups and handle survive A's end.
    assert fs.read(B, b_fh, 0, 1) == b"x"
    assert fs.getattr(B, f).st_size == 1
    fs.drop_owner(A)  # again: nothing to do
    fs.drop_owner(77)


def test_handle_limit_gives_emfile(dirs):
    fs = ExportFS(dirs[0], max_handles_per_owner=3)
    try:
        f = make_file(fs, A, b"f")
        handles = [fs.open(A, f, os.O_RDONLY) for _ in range(3)]
        assert errno_of(fs.open, A, f, os.O_RDONLY) == errno.EMFILE
        assert errno_of(fs.create, A, ROOT_NODEID, b"new", os.O_RDWR, 0o644) == errno.EMFILE
        assert not (dirs[0] / "new").exists()
        assert fs.handles_of(A) == 3
        fs.lookup(B, ROOT_NODEID, b"f")
        fs.release(B, fs.open(B, f, os.O_RDONLY))  # B has its own budget
        fs.release(A, handles[0])
        fs.release(A, fs.open(A, f, os.O_RDONLY))
    finally:
        fs.close()


def test_guest_controlled_arguments_give_oserror(fs):
    f = make_file(fs, A, b"f", b"abc")
    fh = fs.open(A, f, os.O_RDWR)
    assert errno_of(fs.read, A, fh, -1, 1) == errno.EINVAL
    assert errno_of(fs.read, A, fh, 0, -1) == errno.EINVAL
    assert errno_of(fs.read, A, fh, 0, (1 << 20) + 1) == errno.EINVAL
    assert errno_of(fs.read, A, fh, 2**64, 1) == errno.EINVAL
    assert errno_of(fs.read, A, fh, 0.5, 1) == errno.EINVAL
    assert errno_of(fs.write, A, fh, 0, "text") == errno.EINVAL
    assert errno_of(fs.write, A, fh, 0, b"x" * ((1 << 20) + 1)) == errno.EINVAL
    assert errno_of(fs.write, A, fh, 0, memoryview(b"abcd")[::2]) == errno.EINVAL
    assert errno_of(fs.open, A, f, "r") == errno.EINVAL
    assert errno_of(fs.create, A, ROOT_NODEID, b"g", os.O_RDWR, -1) == errno.EINVAL
    assert errno_of(fs.mkdir, A, ROOT_NODEID, b"g", 0o10000) == errno.EINVAL
    assert errno_of(fs.rename, A, ROOT_NODEID, b"f", ROOT_NODEID, b"g", "x") == errno.EINVAL
    assert fs.read(A, fh, 0, 3) == b"abc"


# -- the daemon's side -----------------------------------------------------------


def test_lookup_key_maps_an_event_fd_to_its_nodeid(fs, dirs):
    f = make_file(fs, A, b"f")
    fd = os.open(dirs[0] / "f", os.O_RDONLY)  # as a fanotify event would hand us
    try:
        st = os.fstat(fd)
        assert fs.inodes.lookup_key(st.st_dev, st.st_ino) == f
    finally:
        os.close(fd)
    (dirs[0] / "unknown").write_bytes(b"")
    st = os.stat(dirs[0] / "unknown")
    assert fs.inodes.lookup_key(st.st_dev, st.st_ino) is None
    root = os.stat(dirs[0])
    assert fs.inodes.lookup_key(root.st_dev, root.st_ino) == ROOT_NODEID


def test_writable_fd_is_kept_and_closed_with_the_inode(fs, dirs):
    f = make_file(fs, A, b"f", b"abc")
    wfd = fs.writable_fd(f)
    assert fs.writable_fd(f) == wfd
    assert os.fstat(wfd).st_ino == os.stat(dirs[0] / "f").st_ino
    assert os.pwrite(wfd, b"Z", 0) == 1
    os.fdatasync(wfd)
    assert (dirs[0] / "f").read_bytes() == b"Zbc"
    d, _ = fs.mkdir(A, ROOT_NODEID, b"d", 0o755)
    assert errno_of(fs.writable_fd, d) == errno.EISDIR
    assert errno_of(fs.writable_fd, 999) == errno.ESTALE
    before = open_fds()
    fs.forget(A, f, 1)
    with pytest.raises(OSError) as info:
        os.fstat(wfd)  # nothing has opened an fd since, so wfd is not reused
    assert info.value.errno == errno.EBADF
    assert len(open_fds()) == len(before) - 2  # the writable and the O_PATH fd
    assert errno_of(fs.writable_fd, f) == errno.ESTALE


def test_close_releases_every_fd(dirs):
    before = open_fds()
    fs = ExportFS(dirs[0])
    f = make_file(fs, A, b"f", b"x")
    fs.open(A, f, os.O_RDONLY)
    fs.writable_fd(f)
    fs.mkdir(B, ROOT_NODEID, b"d", 0o755)
    fs.close()
    fs.close()
    assert open_fds() == before


def test_store_refuses_a_root_that_is_not_a_directory(dirs):
    (dirs[0] / "file").write_bytes(b"")
    with pytest.raises(OSError) as info:
        InodeStore(dirs[0] / "file")
    assert info.value.errno == errno.ENOTDIR
    with pytest.raises(OSError) as info:
        ExportFS(dirs[0] / "missing")
    assert info.value.errno == errno.ENOENT
