"""The FUSE kernel facts docs/mount.md relies on, checked against this kernel.

A minimal FUSE server runs in this process (one file, node id 2, served from
a thread that reads /dev/fuse); every access to its mount is made by a child
process.  These are the measurements behind "The size a read sees" and
"When the term runs out"; if a kernel changes one of them, the design there
has to be looked at again.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import threading

import pytest

from guest.fuse_device import (
    FUSE_ASYNC_READ,
    FUSE_AUTO_INVAL_DATA,
    FUSE_MAX_PAGES,
    FuseDevice,
    abort_connection,
    parse_request,
    unavailable_reason,
)
from protocol import fuse
from protocol.fuse import Opcode
from tests.conftest import Child

_why = unavailable_reason()
pytestmark = pytest.mark.skipif(_why is not None, reason=f"FUSE mount not possible: {_why}")

WAIT = 10.0


class MiniServer:
    """One regular file `f` (node id 2) in the root; KEEP_CACHE opens."""

    def __init__(self, mountpoint, data: bytes, attr_valid_s: int):
        self.mountpoint = str(mountpoint)
        os.makedirs(self.mountpoint, exist_ok=True)
        self.data, self.attr_valid, self.mtime = data, attr_valid_s, 1000
        self.dev = FuseDevice(128 * 4096)
        os.set_blocking(self.dev.fd, True)
        self.before_reply: dict[int, callable] = {}  # opcode -> hook(header)
        self.seen: list[str] = []
        self._inited = threading.Event()

    def __enter__(self) -> "MiniServer":
        self.dev.mount(self.mountpoint)
        self.connection = self.dev.connection_id()
        threading.Thread(target=self._serve, daemon=True).start()
        assert self._inited.wait(WAIT)
        return self

    def __exit__(self, *exc) -> None:
        abort_connection(self.connection, self.mountpoint, may_unshare=False)
        self.dev.umount()
        self.dev.close()

    def _attr(self, nodeid: int) -> dict:
        common = dict(blocks=1, atime=0, mtime=self.mtime, ctime=self.mtime, atimensec=0,
                      mtimensec=0, ctimensec=0, uid=0, gid=0, rdev=0, blksize=4096, flags=0)
        if nodeid == 1:
            return dict(ino=1, size=0, mode=0o40755, nlink=2, **common)
        return dict(ino=2, size=len(self.data), mode=0o100644, nlink=1, **common)

    def _serve(self) -> None:
        while True:
            try:
                buf = os.read(self.dev.fd, self.dev.buffer_size)
            except OSError as exc:
                if exc.errno == errno.ENOENT:
                    continue
                return  # ENODEV: gone
            h, body = parse_request(buf)
            self.seen.append(Opcode(h.opcode).name if h.opcode in Opcode._value2member_map_
                             else str(h.opcode))
            hook = self.before_reply.pop(h.opcode, None)
            if hook is not None:
                hook(h)
            self._answer(h, body)

    def _answer(self, h, body) -> None:
        op, reply = h.opcode, self.dev.reply
        valid = {"attr_valid": self.attr_valid, "attr_valid_nsec": 0}
        if op == Opcode.INIT:
            arg = fuse.InitIn.parse(bytes(body[:fuse.InitIn.sizeof()]).ljust(
                fuse.InitIn.sizeof(), b"\0"))
            reply(h.unique, 0, fuse.InitOut.build({
                "major": 7, "minor": min(arg.minor, fuse.KERNEL_MINOR),
                "max_readahead": arg.max_readahead,
                "flags": arg.flags & (FUSE_ASYNC_READ | FUSE_MAX_PAGES | FUSE_AUTO_INVAL_DATA),
                "max_background": 16, "congestion_threshold": 12, "max_write": 128 * 4096,
                "time_gran": 1, "max_pages": 128, "map_alignment": 0, "flags2": 0,
                "max_stack_depth": 0, "request_timeout": 0}))
            self._inited.set()
        elif op == Opcode.LOOKUP:
            if h.nodeid == 1 and fuse.LookupIn.parse(bytes(body)).name == b"f":
                reply(h.unique, 0, fuse.EntryOut.build({
                    "nodeid": 2, "generation": 1, "entry_valid": 3600, "entry_valid_nsec": 0,
                    **valid, "attr": self._attr(2)}))
            else:
                reply(h.unique, -errno.ENOENT)
        elif op == Opcode.GETATTR:
            reply(h.unique, 0, fuse.AttrOut.build({**valid, "attr": self._attr(h.nodeid)}))
        elif op == Opcode.OPEN:
            reply(h.unique, 0, fuse.OpenOut.build({"fh": 7, "open_flags": fuse.FOPEN_KEEP_CACHE,
                                                   "backing_id": 0}))
        elif op == Opcode.OPENDIR:
            reply(h.unique, 0, fuse.OpenOut.build({"fh": 0, "open_flags": 0, "backing_id": 0}))
        elif op == Opcode.READ:
            arg = fuse.ReadIn.parse(bytes(body))
            reply(h.unique, 0, self.data[arg.offset:arg.offset + arg.size])
        elif op in (Opcode.FLUSH, Opcode.RELEASE, Opcode.RELEASEDIR, Opcode.ACCESS,
                    Opcode.DESTROY):
            reply(h.unique, 0)
        elif op not in (Opcode.FORGET, Opcode.BATCH_FORGET, Opcode.INTERRUPT):
            reply(h.unique, -errno.ENOSYS)


_APP = """
import ctypes, mmap, os, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                      ctypes.c_long]
fd = os.open(sys.argv[1], os.O_RDONLY)
base = None
print("OPEN", flush=True)
for line in sys.stdin:
    what = line.split()
    try:
        if what[0] == "pread":
            print("OK", os.pread(fd, 1 << 20, 0).hex(), flush=True)
        elif what[0] == "mmap":
            base = libc.mmap(None, 8192, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
            print("OK", flush=True)
        else:  # a SIGBUS kills this process
            print("OK", ctypes.string_at(base + int(what[1]), int(what[2])).hex(), flush=True)
    except OSError as exc:
        print("ERR", exc.errno, flush=True)
"""


class App:
    def __init__(self, path: str):
        self.child = Child([sys.executable, "-c", _APP, path], f"app {path}")
        assert self.child.line(WAIT).strip() == "OPEN"

    def ask(self, line: str):
        self.child.proc.stdin.write(line.encode() + b"\n")
        self.child.proc.stdin.flush()
        try:
            words = self.child.line(WAIT).split()
        except AssertionError:
            if self.child.proc.poll() == -signal.SIGBUS:
                return "SIGBUS"
            raise
        if words[0] == "ERR":
            return int(words[1])
        return bytes.fromhex(words[1]) if len(words) > 1 else b""


@pytest.fixture
def app():
    started: list[App] = []

    def start(path: str) -> App:
        started.append(App(path))
        return started[-1]

    yield start
    for a in started:
        a.child.stop()


@pytest.mark.parametrize("store", [False, True])
def test_an_inval_inode_while_a_getattr_waits_makes_the_read_stop_at_the_old_size(
        tmp_path, app, store):
    """fuse_do_getattr records attr_version before it sends the GETATTR;
    fuse_reverse_inval_inode moves fi->attr_version on; fuse_change_attributes
    then drops the reply, and filemap_read stops at the old i_size although a
    READ was answered with the new length.  A 1-byte FUSE_NOTIFY_STORE at the
    new end grows i_size first (what guest/mount/size.py's _repair_size does)."""
    with MiniServer(tmp_path / "mnt", b"abc", attr_valid_s=0) as server:
        reader = app(os.path.join(server.mountpoint, "f"))
        assert reader.ask("pread") == b"abc"
        server.data, server.mtime = b"abcde", server.mtime + 1

        def before_getattr_reply(h):
            assert server.dev.notify_inval_inode(2, 0, 0) == 0
            if store:
                assert server.dev.notify_store(2, 4, b"e") == 0

        server.before_reply[Opcode.GETATTR] = before_getattr_reply
        seen = len(server.seen)
        assert reader.ask("pread") == (b"abcde" if store else b"abc")
        assert "READ" in server.seen[seen:]  # the new bytes came, and were cut off
        assert reader.ask("pread") == b"abcde"  # no notification this time


def test_an_aborted_connection_still_serves_cached_pages_until_they_are_purged(tmp_path, app):
    """fuse_abort_conn ends and refuses requests but leaves the page cache: a
    pread with valid attributes and a mapping both return the cached bytes.
    FUSE_NOTIFY_INVAL_INODE still works on the aborted connection: then pread
    fails (ENOTCONN) and the mapping raises SIGBUS."""
    with MiniServer(tmp_path / "mnt", b"A" * 8192, attr_valid_s=3600) as server:
        path = os.path.join(server.mountpoint, "f")
        reader, mapper = app(path), app(path)
        assert reader.ask("pread") == b"A" * 8192
        assert mapper.ask("mmap") == b"" and mapper.ask("map 0 4") == b"AAAA"
        server.data = b"B" * 8192
        assert abort_connection(server.connection, server.mountpoint,
                                may_unshare=False) is not None
        assert reader.ask("pread") == b"A" * 8192
        assert mapper.ask("map 4096 4") == b"AAAA"  # read ahead, never touched before
        assert server.dev.notify_inval_inode(2, 0, 0) == 0
        assert reader.ask("pread") == errno.ENOTCONN
        assert mapper.ask("map 0 4") == "SIGBUS"


def test_enoent_from_a_notification_means_nothing_is_cached(tmp_path):
    """INVAL_INODE of a node id the kernel does not hold, and INVAL_ENTRY of a
    name it never looked up (no LOOKUP is sent for it), answer ENOENT; there
    is no 'every inode' node id (0) on this kernel."""
    with MiniServer(tmp_path / "mnt", b"x", attr_valid_s=0) as server:
        seen = len(server.seen)
        assert server.dev.notify_inval_entry(1, b"never") == errno.ENOENT
        assert server.seen[seen:] == []
        assert server.dev.notify_inval_inode(99, 0, 0) == errno.ENOENT
        assert server.dev.notify_inval_inode(0, 0, 0) == errno.ENOENT
        done = subprocess.run(["cat", os.path.join(server.mountpoint, "f")],
                              capture_output=True, timeout=WAIT)
        assert done.stdout == b"x"
        assert server.dev.notify_inval_entry(1, b"f") == 0  # cached: dropped
