"""The operations beyond the first ones (SYMLINK, READLINK, LINK, MKNOD, RENAME2,
xattrs, FALLOCATE, LSEEK, COPY_FILE_RANGE, STATFS, FSYNCDIR) and caller identity,
against a real host process, by raw frame-by-frame guests.

Each modification must follow the lease rules of the others: another guest's
copy (an entry, attributes, data) is recalled *before* the writer's reply, so
the test holds the holder's ACK back and checks that the writer's reply waits
for it.  Every request here ran into ENOSYS before these operations existed.
"""

from __future__ import annotations

import errno
import os
import stat

import pytest

from host.linux.credentials import can_switch
from protocol.fuse import FATTR_GID, FATTR_MODE, FATTR_UID
from protocol.messages import (
    CopyFileRange,
    Create,
    Fallocate,
    Fsyncdir,
    Getxattr,
    InvalEntry,
    Invalidate,
    Link,
    Listxattr,
    Lookup,
    Lseek,
    Mkdir,
    Mknod,
    Open,
    Read,
    Readlink,
    Release,
    Rename2,
    Setattr,
    Setxattr,
    Statfs,
    Symlink,
    Write,
)
from raw_guest import ROOT, RawGuest

NOBODY = (65534, 65534, 0, (65534,))


def _host(start_host, export):
    return start_host(export, "--detector", "none", "--lease-term", "2000")


async def _held_back(writer: RawGuest, unique: int, holder: RawGuest, kind: type, landed):
    """The holder gets an invalidation of `kind`; until it ACKs, the modification
    has not landed (`landed()` is false) and the writer has no reply.  ACK it and
    return (the invalidation, the writer's reply)."""
    while True:
        event = await holder.next_invalidation()
        if isinstance(event, kind):
            break
        holder.ack(event.seq)  # another of this modification's recalls
    assert not landed(), "the modification landed before the holder's copy was recalled"
    assert not writer._replies[unique].done(), "the writer was answered before the recall"
    holder.ack(event.seq)
    reply = await writer.reply(unique)
    assert reply.error or landed()
    return event, reply


async def test_symlink_recalls_the_directorys_holders_and_its_target_is_data(
        export, start_host):
    (export / "d").mkdir()
    _, address = _host(start_host, export)
    holder = await RawGuest.connect(address, "holder")
    d_entry = await holder.call(ROOT, Lookup(b"d"))
    assert d_entry.lease.granted  # the holder may cache d's names
    writer = await RawGuest.connect(address, "writer")
    d = (await writer.call(ROOT, Lookup(b"d"))).body.nodeid
    unique = writer.send(d, Symlink(b"s", b"../../../etc/passwd"))
    event, reply = await _held_back(writer, unique, holder, InvalEntry,
                                    lambda: os.path.lexists(export / "d" / "s"))
    assert (event.parent, event.name) == (d, b"s")
    assert reply.error == 0 and stat.S_ISLNK(reply.body.attr.mode)
    assert os.readlink(export / "d" / "s") == "../../../etc/passwd"
    link = reply.body.nodeid
    assert (await writer.call(link, Readlink())).body.data == b"../../../etc/passwd"
    # The daemon never follows it: not for data, not as a directory.
    assert (await writer.call(link, Open(os.O_RDONLY))).error == -errno.ELOOP
    assert (await writer.call(link, Lookup(b"x"))).error == -errno.ENOTDIR


async def test_link_recalls_the_targets_attributes_and_counts_the_link(export, start_host):
    (export / "f").write_bytes(b"data")
    _, address = _host(start_host, export)
    holder = await RawGuest.connect(address, "holder")
    f, _ = await holder.lease("f")  # attributes and data of f, nlink 1
    writer = await RawGuest.connect(address, "writer")
    f_w = (await writer.call(ROOT, Lookup(b"f"))).body.nodeid
    unique = writer.send(ROOT, Link(f_w, b"g"))
    event, reply = await _held_back(writer, unique, holder, Invalidate,
                                    lambda: os.path.lexists(export / "g"))
    assert event.ino == f
    assert reply.error == 0 and reply.body.nodeid == f_w and reply.body.attr.nlink == 2
    assert os.stat(export / "g").st_ino == os.stat(export / "f").st_ino


async def test_fallocate_punch_hole_recalls_the_readers_data(export, start_host):
    (export / "f").write_bytes(b"x" * 8192)
    _, address = _host(start_host, export)
    holder = await RawGuest.connect(address, "holder")
    f, _ = await holder.lease("f")
    writer = await RawGuest.connect(address, "writer")
    f_w, fh = await writer.open("f", os.O_RDWR)
    unique = writer.send(f_w, Fallocate(fh, 0, 4096, 0x01 | 0x02))  # KEEP_SIZE|PUNCH_HOLE
    event, reply = await _held_back(writer, unique, holder, Invalidate,
                                    lambda: (export / "f").read_bytes()[:1] == b"\0")
    assert event.ino == f and reply.error == 0, reply
    assert (export / "f").read_bytes() == bytes(4096) + b"x" * 4096
    data = await writer.call(f_w, Lseek(fh, 0, 3))  # SEEK_DATA
    assert data.error == 0 and data.body.offset == 4096
    zero = await writer.call(f_w, Fallocate(fh, 4096, 100, 0x10))  # ZERO_RANGE
    assert zero.error == 0 and (export / "f").read_bytes()[4096:4200] == bytes(100) + b"x" * 4


async def test_copy_file_range_recalls_the_destinations_readers(export, start_host):
    (export / "src").write_bytes(b"new!" * 1024)
    (export / "dst").write_bytes(b"old!" * 1024)
    _, address = _host(start_host, export)
    holder = await RawGuest.connect(address, "holder")
    dst, _ = await holder.lease("dst")
    writer = await RawGuest.connect(address, "writer")
    src_w, fh_in = await writer.open("src")
    dst_w, fh_out = await writer.open("dst", os.O_WRONLY)
    unique = writer.send(src_w, CopyFileRange(fh_in, 0, dst_w, fh_out, 0, 4096, 0))
    event, reply = await _held_back(writer, unique, holder, Invalidate,
                                    lambda: (export / "dst").read_bytes()[:4] == b"new!")
    assert event.ino == dst and reply.error == 0 and reply.body.size == 4096
    assert (export / "dst").read_bytes() == b"new!" * 1024


async def test_xattrs_recall_attributes_and_answer_the_whole_value(export, start_host):
    (export / "f").write_bytes(b"data")
    _, address = _host(start_host, export)
    holder = await RawGuest.connect(address, "holder")
    f, _ = await holder.lease("f")
    writer = await RawGuest.connect(address, "writer")
    f_w = (await writer.call(ROOT, Lookup(b"f"))).body.nodeid
    unique = writer.send(f_w, Setxattr(b"user.k", b"v" * 300, 1))  # XATTR_CREATE
    event, reply = await _held_back(writer, unique, holder, Invalidate,
                                    lambda: "user.k" in os.listxattr(export / "f"))
    assert event.ino == f and reply.error == 0
    assert os.getxattr(export / "f", "user.k") == b"v" * 300
    assert (await writer.call(f_w, Getxattr(b"user.k", 10))).body.data == b"v" * 300
    assert b"user.k\0" in (await writer.call(f_w, Listxattr(0))).body.data
    again = await writer.call(f_w, Setxattr(b"user.k", b"w", 1))
    assert again.error == -errno.EEXIST
    assert (await writer.call(f_w, Getxattr(b"user.none"))).error == -errno.ENODATA


async def test_rename2_noreplace_and_exchange(export, start_host):
    (export / "a").write_bytes(b"A")
    (export / "b").write_bytes(b"B")
    _, address = _host(start_host, export)
    g = await RawGuest.connect(address, "g")
    assert (await g.call(ROOT, Rename2(ROOT, b"a", b"b", 1))).error == -errno.EEXIST
    assert (await g.call(ROOT, Rename2(ROOT, b"a", b"b", 2))).error == 0
    assert (export / "a").read_bytes() == b"B" and (export / "b").read_bytes() == b"A"


async def test_mknod_makes_fifos_and_sockets_that_the_daemon_never_opens(export, start_host):
    _, address = _host(start_host, export)
    g = await RawGuest.connect(address, "g")
    fifo = await g.call(ROOT, Mknod(b"p", stat.S_IFIFO | 0o644))
    sock = await g.call(ROOT, Mknod(b"s", stat.S_IFSOCK | 0o600))
    assert fifo.error == 0 and stat.S_ISFIFO(os.lstat(export / "p").st_mode)
    assert sock.error == 0 and stat.S_ISSOCK(os.lstat(export / "s").st_mode)
    assert (await g.call(fifo.body.nodeid, Open(os.O_RDONLY))).error == -errno.EINVAL
    assert (await g.call(ROOT, Mknod(b"x", stat.S_IFDIR | 0o755))).error == -errno.EINVAL


async def test_statfs_is_the_exports_and_fsyncdir_syncs(export, start_host):
    _, address = _host(start_host, export)
    g = await RawGuest.connect(address, "g")
    reply = await g.call(ROOT, Statfs())
    v = os.statvfs(export)
    assert reply.error == 0
    assert (reply.body.blocks, reply.body.bsize, reply.body.namelen) == (
        v.f_blocks, v.f_bsize, v.f_namemax)
    assert (await g.call(ROOT, Fsyncdir(0, 0))).error == 0


needs_root = pytest.mark.skipif(not can_switch(), reason="switching credentials needs root")


@needs_root
async def test_requests_run_as_their_caller(export, start_host):
    """Owners of new files, permission checks, chown, and setuid cleared by a
    write without CAP_FSETID: the host kernel's, as the caller."""
    os.chmod(export, 0o777)
    (export / "rootfile").write_bytes(b"r")
    _, address = _host(start_host, export)
    g = await RawGuest.connect(address, "g")
    made = await g.call(ROOT, Create(b"mine", os.O_WRONLY | os.O_CREAT, 0o4755), caller=NOBODY)
    assert made.error == 0, made
    assert (os.stat(export / "mine").st_uid, os.stat(export / "mine").st_gid) == (65534, 65534)
    mine, fh = made.body.entry.nodeid, made.body.open.fh
    wrote = await g.call(mine, Write(fh, 0, b"x"), caller=NOBODY)
    assert wrote.error == 0 and not os.stat(export / "mine").st_mode & stat.S_ISUID
    await g.call(mine, Release(fh))
    sub = await g.call(ROOT, Mkdir(b"sub", 0o755), caller=NOBODY)
    assert os.stat(export / "sub").st_uid == 65534 and sub.error == 0
    # Not the owner: no chmod, no chown; root may.
    other = (await g.call(ROOT, Lookup(b"rootfile"))).body.nodeid
    assert (await g.call(other, Setattr(FATTR_MODE, mode=0o777), caller=NOBODY)).error \
        == -errno.EPERM
    assert (await g.call(mine, Setattr(FATTR_UID, uid=0), caller=NOBODY)).error == -errno.EPERM
    chown = await g.call(mine, Setattr(FATTR_UID | FATTR_GID, uid=123, gid=456))
    assert chown.error == 0 and (chown.body.attr.uid, chown.body.attr.gid) == (123, 456)
    assert (os.stat(export / "mine").st_uid, os.stat(export / "mine").st_gid) == (123, 456)
    # A supplementary group counts: nobody may give its own file to a group it is in.
    own = await g.call(ROOT, Create(b"own", os.O_WRONLY | os.O_CREAT, 0o644), caller=NOBODY)
    in_group = (65534, 65534, 0, (65534, 4242))
    grp = await g.call(own.body.entry.nodeid, Setattr(FATTR_GID, gid=4242), caller=in_group)
    assert grp.error == 0 and os.stat(export / "own").st_gid == 4242
    other_group = await g.call(own.body.entry.nodeid, Setattr(FATTR_GID, gid=4343),
                               caller=in_group)
    assert other_group.error == -errno.EPERM
    # Read permission is the caller's too.
    os.chmod(export / "rootfile", 0o600)
    assert (await g.call(other, Open(os.O_RDONLY), caller=NOBODY)).error == -errno.EACCES
    assert (await g.call(other, Open(os.O_RDONLY))).error == 0
    assert (await g.call(other, Read(0, 0, 1))).error == -errno.EBADF  # (fh 0 is none)


async def test_a_retried_symlink_or_xattr_change_is_carried_out_once(export, start_host):
    """The new modifications are in the reply cache: a guest that lost its
    connection and sends the same request (same client id, same unique) again
    gets the first answer, not EEXIST (nor a second exchange of two names)."""
    (export / "a").write_bytes(b"A")
    (export / "b").write_bytes(b"B")
    _, address = _host(start_host, export)
    client_id = os.urandom(16)
    first = await RawGuest.connect(address, "first", client_id=client_id)
    assert (await first.reply(first.send(ROOT, Symlink(b"s", b"t"), unique=41))).error == 0
    assert (await first.reply(first.send(ROOT, Rename2(ROOT, b"a", b"b", 2), unique=42))).error \
        == 0
    first.close()
    again = await RawGuest.connect(address, "again", client_id=client_id)
    assert (await again.reply(again.send(ROOT, Symlink(b"s", b"t"), unique=41))).error == 0
    assert (await again.reply(again.send(ROOT, Rename2(ROOT, b"a", b"b", 2), unique=42))).error \
        == 0
    assert (export / "a").read_bytes() == b"B"  # exchanged once, not twice


async def test_bad_arguments_get_an_errno_and_the_daemon_serves_on(export, start_host):
    (export / "f").write_bytes(b"data")
    (export / "d").mkdir()
    _, address = _host(start_host, export)
    g = await RawGuest.connect(address, "g")
    f, fh = await g.open("f", os.O_RDWR)
    d = (await g.call(ROOT, Lookup(b"d"))).body.nodeid
    cases = [
        (ROOT, Symlink(b"a/b", b"t"), errno.EINVAL),  # a name is one component
        (ROOT, Symlink(b"s", b""), errno.ENOENT),
        (ROOT, Symlink(b"s", b"x" * 5000), errno.ENAMETOOLONG),
        (ROOT, Link(d, b"dl"), errno.EPERM),  # no hard link of a directory
        (ROOT, Link(999999, b"x"), errno.ESTALE),
        (ROOT, Mknod(b"dir", stat.S_IFDIR | 0o755), errno.EINVAL),
        (f, Fallocate(fh, 0, 0), errno.EINVAL),
        (f, Fallocate(fh, 0, 10, 0x4000), errno.EINVAL),
        (f, Fallocate(777, 0, 10), errno.EBADF),
        (f, Lseek(fh, 0, 0), errno.EINVAL),  # SEEK_SET is the kernel's, not ours
        (f, Lseek(fh, 4096, 3), errno.ENXIO),
        (f, CopyFileRange(fh, 0, f, fh, 0, 10, 1), errno.EINVAL),
        (f, Setxattr(b"user.k", b"v", 9), errno.EINVAL),
        (f, Getxattr(b""), errno.EINVAL),
        (ROOT, Rename2(ROOT, b"f", b"g", 4), errno.EINVAL),
    ]
    for nodeid, op, err in cases:
        reply = await g.call(nodeid, op)
        assert reply.error == -err, (op, reply)
    assert (await g.call(f, Read(fh, 0, 4))).body.data == b"data"
