"""/dev/fuse and mount(2), with ctypes and os: the kernel end of a mounting guest.

Everything here is bytes and syscalls; `guest/mount/` decides what to say.
The structures are the ones in `protocol/fuse.py` (defined once there); the
few this module needs that are not there yet are defined below, once, and
marked so (they belong in protocol/fuse.py).

Facts this relies on (Linux 6.18, protocol 7.45, measured as root):
  * open("/dev/fuse", O_RDWR) and mount(2) of type "fuse" with
    "fd=N,rootmode=40000,user_id=U,group_id=G" mount a file system served
    through that fd.
  * Each read(2) of the fd returns exactly one request (fuse_in_header +
    body); the buffer must hold max_write + one page.  With O_NONBLOCK an
    empty queue gives EAGAIN; ENOENT means the request was withdrawn
    (interrupted) before we read it; ENODEV means the connection is gone
    (unmounted or aborted).
  * Each write(2) is one reply (fuse_out_header with the request's unique,
    then the body) or one notification (unique 0, error = notify code).  A
    reply to a request the kernel no longer waits for gives ENOENT.
  * A notification can sleep in the kernel: FUSE_NOTIFY_INVAL_INODE locks
    every cached page of the range, and a page under a READ stays locked
    until that READ is answered; FUSE_NOTIFY_INVAL_ENTRY takes the
    directory's i_rwsem.  So notifications are written from threads that
    never answer requests (see docs/mount.md).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os

from construct import Int32ul, Int64ul, Padding, Struct

from protocol import fuse, fusefast, wire

DEV_FUSE = "/dev/fuse"

# fuse_init_in/out flags (include/uapi/linux/fuse.h)
FUSE_ASYNC_READ = 1 << 0
FUSE_POSIX_LOCKS = 1 << 1
FUSE_BIG_WRITES = 1 << 5
FUSE_FLOCK_LOCKS = 1 << 10
FUSE_AUTO_INVAL_DATA = 1 << 12
FUSE_DO_READDIRPLUS = 1 << 13
FUSE_READDIRPLUS_AUTO = 1 << 14
FUSE_PARALLEL_DIROPS = 1 << 18
FUSE_MAX_PAGES = 1 << 22
FUSE_HANDLE_KILLPRIV_V2 = 1 << 28  # the server clears setuid/setgid (on write, truncate, chown)
FUSE_INIT_EXT = 1 << 30  # flags2 counts (fuse_init_in/out.flags2: the flags' bits 32-63)
# flags2 (bit N here is bit 32+N of the 64-bit flags)
FUSE_DIRECT_IO_ALLOW_MMAP = 1 << (36 - 32)  # a FOPEN_DIRECT_IO file may be mapped shared

# fuse_notify_inval_entry_out.flags (protocol 7.38): only expire the dentry (its
# next use asks the server: LOOKUP), do not unhash it
FUSE_EXPIRE_ONLY = 1 << 0
FUSE_EXPIRE_ONLY_MINOR = 38

# FUSE_GETATTR_FH in fuse_getattr_in.getattr_flags
FUSE_GETATTR_FH = 1 << 0

# Every request read needs room for the largest WRITE we allow plus headers;
# the kernel refuses reads into buffers smaller than FUSE_MIN_READ_BUFFER.
FUSE_MIN_READ_BUFFER = 8192

# mount(2) / umount2(2)
MS_NOSUID = 2
MS_NODEV = 4
MNT_DETACH = 2

# --- structures not (yet) in protocol/fuse.py; they belong there -------------

# fuse_batch_forget_in, followed by `count` fuse_forget_one
BatchForgetIn = Struct("count" / Int32ul, Padding(4))
ForgetOne = Struct("nodeid" / Int64ul, "nlookup" / Int64ul)
# fuse_notify_store_out (24 bytes), followed by `size` bytes of data
NotifyStoreOut = Struct("nodeid" / Int64ul, "offset" / Int64ul, "size" / Int32ul, Padding(4))

class FuseUnavailable(RuntimeError):
    """This machine cannot mount a FUSE file system from here; the message says why."""


def unavailable_reason() -> str | None:
    """Why a FUSE mount cannot work here, or None if it can (for test skips)."""
    if not os.path.exists(DEV_FUSE):
        return f"{DEV_FUSE} does not exist (no FUSE in this kernel or container)"
    try:
        with open("/proc/filesystems") as f:
            if not any(line.split()[-1:] == ["fuse"] for line in f):
                return "the kernel has no 'fuse' file system type (modprobe fuse)"
    except OSError:
        pass
    if os.geteuid() != 0:
        return "mounting through raw /dev/fuse needs root (CAP_SYS_ADMIN); no fusermount here"
    try:
        os.close(os.open(DEV_FUSE, os.O_RDWR | os.O_CLOEXEC))
    except OSError as exc:
        return f"cannot open {DEV_FUSE}: {exc.strerror}"
    return None


_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                        ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


def umount(mountpoint: str, lazy: bool = True) -> None:
    """umount2(mountpoint, MNT_DETACH); raises OSError (EINVAL if not mounted)."""
    if _libc.umount2(os.fsencode(mountpoint), MNT_DETACH if lazy else 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"umount2({mountpoint}): {os.strerror(err)}")


def resolve_mountpoint(mountpoint: str) -> str:
    """`mountpoint` as /proc/self/mounts spells it, without looking at it.

    Only its parent is resolved: os.path.realpath would lstat the mountpoint
    itself, which on a FUSE mount may send a GETATTR and wait, for ever, for a
    server that is dead but still holds /dev/fuse.  (So a mountpoint that is
    itself a symbolic link is not followed.)"""
    parent, name = os.path.split(os.path.abspath(mountpoint))
    return os.path.join(os.path.realpath(parent), name)


def is_mountpoint_of_fuse(mountpoint: str) -> bool:
    """True if a fuse file system is mounted exactly at `mountpoint` (never stats it)."""
    target = resolve_mountpoint(mountpoint)
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) > 2 and parts[1] == target and parts[2].startswith("fuse"):
                    return True
    except OSError:
        pass
    return False


class FuseDevice:
    """One open /dev/fuse connection and the mount it serves."""

    def __init__(self, max_write: int):
        self.max_write = max_write
        self.buffer_size = max(FUSE_MIN_READ_BUFFER, max_write + 4096)
        self.fd = os.open(DEV_FUSE, os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK)
        self.mountpoint: str | None = None
        self.closed = False

    def mount(self, mountpoint: str, *, source: str = "cleanlease", extra: str = "") -> None:
        """mount(2) type "fuse.cleanlease" (fuse, subtype cleanlease: what findmnt and
        df show) on `mountpoint`, served by this fd; `source` is shown as its source."""
        mountpoint = os.path.realpath(mountpoint)
        st = os.stat(mountpoint)
        rootmode = f"{st.st_mode & 0o170000:o}"  # directory type bits only: 40000
        options = (f"fd={self.fd},rootmode={rootmode},user_id={os.geteuid()},"
                   f"group_id={os.getegid()},default_permissions,allow_other")
        if extra:
            options += "," + extra
        rc = _libc.mount(source.encode(), os.fsencode(mountpoint), b"fuse.cleanlease",
                         MS_NOSUID | MS_NODEV, options.encode())
        if rc != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"mount({mountpoint}, fuse, {options}): {os.strerror(err)}")
        self.mountpoint = mountpoint

    def connection_id(self) -> int | None:
        """The connection's number in fusectl (the mount's device minor), from
        /proc/self/mountinfo: stat(2) on the mount would wait for our own INIT."""
        if self.mountpoint is None:
            return None
        try:
            with open("/proc/self/mountinfo") as f:
                for line in f:
                    parts = line.split()
                    if len(parts) > 4 and parts[4] == self.mountpoint:
                        return int(parts[2].split(":")[1])
        except (OSError, ValueError, IndexError):
            pass
        return None

    def abort(self, connection: int | None) -> bool:
        """Abort the connection through fusectl, if it is mounted: every request
        waiting in the kernel ends with an error and every page lock goes.  The
        last resort when a request or notification cannot finish otherwise."""
        if connection is None:
            return False
        try:
            with open(f"/sys/fs/fuse/connections/{connection}/abort", "w") as f:
                f.write("1")
            return True
        except OSError:
            return False

    def umount(self) -> bool:
        """Detach the mount (lazily: busy files keep the connection until closed)."""
        if self.mountpoint is None:
            return False
        try:
            umount(self.mountpoint)
        except OSError as exc:
            if exc.errno != errno.EINVAL:  # EINVAL: not mounted any more
                raise
        self.mountpoint = None
        return True

    def read_request(self) -> bytes | None:
        """The next request, or None if none is queued (EAGAIN/ENOENT).

        Raises OSError(ENODEV) once the connection is gone."""
        while True:
            try:
                return os.read(self.fd, self.buffer_size)
            except InterruptedError:
                continue
            except BlockingIOError:
                return None
            except OSError as exc:
                if exc.errno == errno.ENOENT:  # withdrawn before we read it
                    continue
                raise

    def write(self, data: bytes) -> int:
        """Write one reply or notification; returns 0 or a positive errno.

        ENOENT (the request was interrupted, or a notification names an
        inode/entry the kernel does not hold) is an answer, not a failure.
        """
        if self.closed:
            return errno.EBADF
        try:
            os.write(self.fd, data)
            return 0
        except OSError as exc:
            return exc.errno or errno.EIO

    def reply(self, unique: int, error: int = 0, body: bytes = b"") -> int:
        return self.write(fusefast.out_header(unique, error, len(body)) + body)

    # --- notifications (call from a notifier thread, never the request loop) ---

    def notify_inval_inode(self, ino: int, off: int = 0, length: int = 0) -> int:
        """FUSE_NOTIFY_INVAL_INODE: attributes, and pages of [off, off+len) (len <= 0: to
        EOF; off < 0: attributes only).  Blocks while a page of the range is locked."""
        body = fuse.NotifyInvalInodeOut.build({"ino": ino, "off": off, "len": length})
        return self.write(_notify_header(fuse.NotifyCode.INVAL_INODE, len(body)) + body)

    def notify_inval_entry(self, parent: int, name: bytes, flags: int = 0) -> int:
        """FUSE_NOTIFY_INVAL_ENTRY: drop the dentry `name` in `parent` (takes the
        directory's i_rwsem)."""
        body = fuse.NotifyInvalEntryOut.build(
            {"parent": parent, "namelen": len(name), "flags": flags}) + name + b"\x00"
        return self.write(_notify_header(fuse.NotifyCode.INVAL_ENTRY, len(body)) + body)

    def notify_store(self, ino: int, off: int, data: bytes) -> int:
        """FUSE_NOTIFY_STORE: copy `data` into the page cache of `ino` at `off`.  If
        off + len(data) is past the kernel's i_size, i_size grows to it first
        (fuse_write_update_attr, which also moves the inode's attr_version on).
        A page it creates is uptodate only if the data starts at its first byte
        and fills it or ends at EOF; otherwise it stays !uptodate, and a later
        access reads it whole with a READ.  Blocks while a page of the range is
        locked."""
        body = NotifyStoreOut.build({"nodeid": ino, "offset": off, "size": len(data)}) + data
        return self.write(_notify_header(fuse.NotifyCode.STORE, len(body)) + body)

    def close(self) -> None:
        """Close the fd: the kernel aborts the connection if nothing else holds it."""
        if not self.closed:
            self.closed = True
            os.close(self.fd)


def _notify_header(code: fuse.NotifyCode, body_len: int) -> bytes:
    return fusefast.out_header(0, int(code), body_len)


def parse_request(buf: bytes):
    """Split one request into (fuse_in_header, as a named tuple, body memoryview)."""
    if len(buf) < fusefast.IN_HEADER_SIZE:
        raise ValueError(f"a request of {len(buf)} bytes: shorter than fuse_in_header")
    header = fusefast.parse_in_header(buf)
    if header.len != len(buf):
        raise ValueError(f"fuse_in_header.len {header.len} but read {len(buf)} bytes")
    return header, memoryview(buf)[fuse.FUSE_IN_HEADER_SIZE:]


# --- aborting a connection from outside the process that serves it ----------------------

FUSECTL = "/sys/fs/fuse/connections"
CLONE_NEWNS = 0x00020000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
MNT_FORCE = 1
_libc.unshare.argtypes = [ctypes.c_int]


def mounted_connection(mountpoint: str) -> int | None:
    """The fusectl number of the FUSE mount at `mountpoint` (its device minor), from
    /proc/self/mountinfo; None if no FUSE file system is mounted there."""
    target = resolve_mountpoint(mountpoint)
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                parts = line.split()
                if len(parts) < 10 or parts[4] != target:
                    continue
                fstype = parts[parts.index("-") + 1]
                if fstype.startswith("fuse"):
                    return int(parts[2].split(":")[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def abort_connection(connection: int, mountpoint: str | None = None, *,
                     may_unshare: bool = True) -> str | None:
    """Abort FUSE connection `connection`: every request waiting in the kernel ends
    with an error, every page lock a READ held goes, and no request is sent any
    more (they fail with ENOTCONN).  The page cache is NOT dropped: pages and
    mappings stay readable (measured on 6.18; docs/mount.md), so a caller that
    must not leave old bytes behind purges every inode afterwards.

    Tries fusectl's `abort` file; if fusectl is not mounted, mounts it in a
    private mount namespace (this changes the calling process's namespace for
    good, and needs a single-threaded process: call it from one that is about
    to exit, and only with `may_unshare`); last, umount2(MNT_FORCE) of
    `mountpoint` if our connection is still mounted there (fuse_umount_begin
    aborts even when the unmount is then refused as busy).  Returns how it
    was done, or None."""
    control = f"{FUSECTL}/{connection}/abort"
    if not os.path.exists(control) and may_unshare:
        if _libc.unshare(CLONE_NEWNS) == 0 and \
                _libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None) == 0:
            _libc.mount(b"fusectl", FUSECTL.encode(), b"fusectl", 0, None)
    try:
        with open(control, "w") as f:
            f.write("1")
        return "fusectl"
    except OSError:
        pass
    if mountpoint is not None and mounted_connection(mountpoint) == connection:
        _libc.umount2(os.fsencode(resolve_mountpoint(mountpoint)), MNT_FORCE)  # EBUSY expected
        return "MNT_FORCE"
    return None


# --- the watchdog ---------------------------------------------------------------------
#
# A mounting guest's kernel keeps pages, and mappings of them, for as long as the
# file system lives, whether or not the guest process is there to drop them: a
# guest stopped with SIGSTOP, or killed, leaves them in place, and an aborted
# connection still serves them (docs/mount.md, "When the term runs out").  The
# watchdog is a second, single-threaded process holding a dup of the guest's
# /dev/fuse fd.  When the guest's lease term is about to run out without a
# renewal, or the guest process dies, or the guest asks, it aborts the
# connection and then writes FUSE_NOTIFY_INVAL_INODE for every inode whose
# data may be in the page cache: pages go, mappings are unmapped, and every
# later read(2), fault or open fails (ENOTCONN, SIGBUS) instead of returning
# old bytes.
#
# The guest tells it, over a pipe of 8-byte records, which node ids may have
# pages (before the first READ reply of each), which ones the kernel forgot,
# and when to quit or fire; and it publishes its term's deadline (monotonic ns)
# in a shared page.  Deadline 0: no term yet; 1: the term is over (fenced).

WATCHDOG_ADD = 0
WATCHDOG_DEL = 1 << 62
WATCHDOG_QUIT = 3 << 62
WATCHDOG_FIRE = (3 << 62) | 1
WATCHDOG_FIRED = 3  # its exit status after firing
# It fires earlier by this much per inode it will purge: about twice what one
# FUSE_NOTIFY_INVAL_INODE took here (28 us for a 1-page file, 1000 inodes).
PURGE_NS_PER_INODE = 60_000
_RECORD = 8
_KIND = 3 << 62


class Watchdog:
    """The guest's end of a watchdog process (see above)."""

    def __init__(self, dev_fd: int, connection: int, mountpoint: str, guard_ns: int,
                 witness_fd: int = -1):
        """`witness_fd`: a memfd from `guest.witness.write_config`, or -1: then it
        has no witness connection to the host."""
        import mmap
        import subprocess
        import sys

        self.connection = connection
        self._shm_fd = os.memfd_create("cleanlease-term", os.MFD_CLOEXEC)
        os.ftruncate(self._shm_fd, 4096)
        self._shm = mmap.mmap(self._shm_fd, 4096)
        self._deadline = ctypes.c_uint64.from_buffer(self._shm, 0)  # one aligned 8-byte store
        cmd_r, self._cmd_w = os.pipe2(os.O_CLOEXEC)
        ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        try:
            # Its own session: a signal to the guest's process group spares it.
            # Its stderr is the guest's (one line when it fires).
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "guest.fuse_device", "watchdog", str(dev_fd),
                 str(self._shm_fd), str(cmd_r), str(ready_w), str(os.getpid()),
                 str(connection), mountpoint, str(guard_ns), str(witness_fd)],
                pass_fds=(dev_fd, self._shm_fd, cmd_r, ready_w)
                + ((witness_fd,) if witness_fd >= 0 else ()), start_new_session=True,
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, cwd=root)
        finally:
            os.close(cmd_r)
            os.close(ready_w)
        # Readable ("R") once it is watching; then, if it fires, one byte more: why
        # (wire.PURGED_*: `fired_why`); EOF once it has exited.
        self.ready_fd = ready_r
        os.set_blocking(ready_r, False)  # read when readable, and by fired_why
        self._fired: int | None = None
        self.pidfd = os.pidfd_open(self.proc.pid)
        self.closed = False

    def publish(self, deadline_ns: int) -> None:
        self._deadline.value = deadline_ns

    def _send(self, record: int) -> bool:
        if self.closed:
            return False
        try:
            os.write(self._cmd_w, record.to_bytes(_RECORD, "little"))
            return True
        except OSError:  # it is gone (EPIPE)
            return False

    def add(self, nodeid: int) -> bool:
        return self._send(WATCHDOG_ADD | nodeid)

    def remove(self, nodeid: int) -> bool:
        return self._send(WATCHDOG_DEL | nodeid)

    def fire(self) -> bool:
        """Abort the connection and purge every inode now, then exit."""
        return self._send(WATCHDOG_FIRE)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def fired_why(self) -> int | None:
        """Why it fired (wire.PURGED_*), once it has said so; None if it has not
        (yet): it is still watching, or it quit.  Does not block."""
        if self._fired is None and not self.closed:
            try:
                code = os.read(self.ready_fd, 1)
            except BlockingIOError:
                code = b""
            if code:
                self._fired = code[0]
        return self._fired

    def close(self, quit: bool = True) -> None:
        """Let it go (QUIT: it exits without doing anything), and free our ends."""
        if self.closed:
            return
        if quit:
            self._send(WATCHDOG_QUIT)
        self.closed = True
        for fd in (self._cmd_w, self.ready_fd, self.pidfd):
            try:
                os.close(fd)
            except OSError:
                pass
        del self._deadline
        self._shm.close()
        os.close(self._shm_fd)


def _watchdog_main(argv: list[str]) -> int:
    import mmap
    import select
    import sys
    import time

    dev_fd, shm_fd, cmd_fd, ready_fd, guest_pid, connection = map(int, argv[:6])
    mountpoint, guard_ns = argv[6], int(argv[7])
    witness_fd = int(argv[8]) if len(argv) > 8 else -1
    shm = mmap.mmap(shm_fd, 4096)
    deadline = ctypes.c_uint64.from_buffer(shm, 0)
    try:
        guest = os.pidfd_open(guest_pid)
    except ProcessLookupError:
        guest = None
    os.set_blocking(cmd_fd, False)
    nodeids: set[int] = set()
    poller = select.poll()
    poller.register(cmd_fd, select.POLLIN)
    if guest is not None:
        poller.register(guest, select.POLLIN)
    # Its witness connection to the host (guest/witness.py): the host learns at
    # once when this fires, and may ask it to.
    link = None
    if witness_fd >= 0:
        from guest.witness import WitnessLink
        from protocol.errors import ProtocolError
        try:
            link = WitnessLink(witness_fd)
            poller.register(link.fileno(), select.POLLIN)
        except (OSError, ProtocolError, ValueError) as exc:
            print(f"cleanlease watchdog: no witness connection to the host ({exc}); the host "
                  f"will wait out this guest's term when it falls silent", file=sys.stderr,
                  flush=True)
        os.close(witness_fd)

    def drain() -> str | None:
        """Apply every record waiting in the pipe; 'quit', 'fire', 'eof' or None."""
        while True:
            try:
                data = os.read(cmd_fd, 4096 * _RECORD)
            except BlockingIOError:
                return None
            if not data:
                return "eof"
            for i in range(0, len(data) - len(data) % _RECORD, _RECORD):
                record = int.from_bytes(data[i:i + _RECORD], "little")
                kind, nodeid = record & _KIND, record & ~_KIND
                if kind == WATCHDOG_ADD:
                    nodeids.add(nodeid)
                elif kind == WATCHDOG_DEL:
                    nodeids.discard(nodeid)
                elif record == WATCHDOG_QUIT:
                    return "quit"
                elif record == WATCHDOG_FIRE:
                    return "fire"

    def fire(reason: str, code: int, late_ns: int = 0, death_grace_s: float = 0.0) -> int:
        started = time.monotonic_ns()
        # A killed guest's fds close in do_exit before its pidfd says it died:
        # after its end of the pipe closed, give its death a moment to show.
        dead = guest is None or bool(select.select([guest], [], [], death_grace_s)[0])
        how = None
        if dead and mounted_connection(mountpoint) == connection:
            # Nobody will serve it again: abort (MNT_FORCE) and detach it, here
            # in the guest's mount namespace.
            _libc.umount2(os.fsencode(resolve_mountpoint(mountpoint)), MNT_FORCE)
            how = "MNT_FORCE"
            try:
                umount(mountpoint)
            except OSError:
                pass
        how = how or abort_connection(connection, mountpoint)
        drain()  # node ids sent before the abort (none can follow it)
        header = _notify_header(fuse.NotifyCode.INVAL_INODE, fuse.NotifyInvalInodeOut.sizeof())
        purged = gone = failed = 0
        for nodeid in nodeids:
            body = fuse.NotifyInvalInodeOut.build({"ino": nodeid, "off": 0, "len": 0})
            try:
                os.write(dev_fd, header + body)
                purged += 1
            except OSError as exc:
                if exc.errno == errno.ENOENT:
                    gone += 1
                else:
                    failed += 1
        took = (time.monotonic_ns() - started) / 1e6
        try:
            os.write(ready_fd, bytes([code]))  # the guest's Watchdog.fired_why
        except OSError:
            pass  # the guest is gone
        told = link is not None and link.purged(code, purged)
        print(f"cleanlease watchdog: {reason}: connection {connection} aborted ({how}), "
              f"{purged} inodes purged, {gone} not cached, {failed} failed, in {took:.1f} ms"
              + (f", {late_ns / 1e6:.1f} ms after it was due" if late_ns else "")
              + ("; the host was told" if told else ""),
              file=sys.stderr, flush=True)
        return WATCHDOG_FIRED

    os.write(ready_fd, b"R")  # (kept open: fire says why on it)
    while True:
        due = deadline.value
        now = time.monotonic_ns()
        fire_at = due - guard_ns - len(nodeids) * PURGE_NS_PER_INODE
        if due and now >= fire_at:
            return fire("the lease term ran out without a renewal", wire.PURGED_TERM_RAN_OUT,
                        now - fire_at)
        wait_ms = 1000 if not due else min(1000, (fire_at - now) // 1_000_000 + 1)
        for fd, _ in poller.poll(wait_ms):
            if fd == guest:
                return fire("the guest process died", wire.PURGED_GUEST_DIED)
            if link is not None and fd == link.fileno():
                said = link.read()
                if said == "purge":
                    return fire("the host asked (the guest owes an ACK past the ack timeout, "
                                "or lost its connection)", wire.PURGED_ASKED)
                if said == "eof":
                    poller.unregister(fd)
                    link.close()
                    link = None
                continue
            what = drain()
            if what == "quit":
                return 0
            if what == "fire":
                return fire("the guest asked", wire.PURGED_GUEST_ASKED)
            if what == "eof":
                return fire("the guest closed its end", wire.PURGED_GUEST_DIED,
                            death_grace_s=0.5)


if __name__ == "__main__":
    import sys

    if sys.argv[1:2] == ["watchdog"]:
        sys.exit(_watchdog_main(sys.argv[2:]))
    sys.exit(f"usage: {sys.argv[0]} watchdog ...")
