"""The messages of the cleanlease protocol, as frozen dataclasses.

A peer never sees bytes: the sans-I/O `Connection` turns bytes into these
objects and these objects into bytes.  File-system operations mirror the FUSE
requests they travel as (see `protocol/fuse.py`); their reply bodies depend on
the request's opcode, which the connection remembers per `unique`.
"""

from __future__ import annotations

import enum
import os
import stat as stat_module
from dataclasses import dataclass, field

from protocol.fuse import Opcode


class Policy(enum.IntEnum):
    """Caching policies; the host chooses, the guest honours (see DESIGN)."""

    NEVER = 0
    TTL = 1
    ALWAYS = 2
    OPEN_LEASE = 3
    CLEAN_LEASE = 4

    @property
    def label(self) -> str:
        return self.name.lower().replace("_", "-")

    @classmethod
    def from_label(cls, label: str) -> "Policy":
        try:
            return cls[label.upper().replace("-", "_")]
        except KeyError:
            choices = ", ".join(p.label for p in cls)
            raise ValueError(f"unknown policy {label!r}; choose one of: {choices}") from None


class Detector(enum.IntEnum):
    """How the host learns of writes that do not come through the daemon."""

    NONE = 0  # only daemon writes are seen
    INOTIFY = 1  # after the fact
    FANOTIFY = 2  # before the write lands (pre-content permission events)
    KERNEL_LEASE = 3  # before an open for write returns (F_SETLEASE; open-lease)

    @property
    def label(self) -> str:
        return self.name.lower().replace("_", "-")


class Granularity(enum.IntEnum):
    """What one invalidation of a regular file recalls (docs/design.md, "Range granularity")."""

    INODE = 0  # the whole inode: pages and attributes
    RANGE = 1  # the pages that change (and the attributes); the rest stays cached

    @property
    def label(self) -> str:
        return self.name.lower()

    @classmethod
    def from_label(cls, label: str) -> "Granularity":
        try:
            return cls[label.upper()]
        except KeyError:
            raise ValueError(f"unknown granularity {label!r} (inode | range)") from None


# --- handshake ---------------------------------------------------------------


@dataclass(frozen=True)
class Hello:
    """Guest -> host, the first frame of every connection."""

    version: int
    features: int
    max_frame: int
    name: str
    # The guest's identity across reconnections (random, 16 bytes): the host
    # answers a retried request from its reply cache instead of repeating it.
    client_id: bytes = bytes(16)


@dataclass(frozen=True)
class HelloReply:
    """Host -> guest.  `error` is 0 or a negative errno (then the host closes)."""

    error: int
    version: int
    features: int
    policy: Policy
    detector: Detector
    lease_term_ms: int
    ttl_ms: int
    max_frame: int
    guest_id: int
    boot_id: bytes  # 16 bytes; a new one means "drop every cache"
    # With FEATURE_AUTH in `features`: the host's 16-byte challenge, and the
    # connection is not ready until an AUTH exchange succeeds.  Otherwise zeros.
    nonce: bytes = bytes(16)
    # What an INVALIDATE of a regular file recalls: under RANGE, a guest keeps
    # the pages outside its range, and its own writes drop only what they change.
    granularity: Granularity = Granularity.INODE


@dataclass(frozen=True)
class Auth:
    """Guest -> host, after a HELLO reply with FEATURE_AUTH: the guest's own
    16-byte nonce and its proof of the token (protocol/auth.py)."""

    nonce: bytes
    proof: bytes  # 32 bytes


@dataclass(frozen=True)
class AuthReply:
    """Host -> guest.  `error` 0 and the host's proof of the token, or -EACCES
    and zeros (then the host closes)."""

    error: int
    proof: bytes = bytes(32)


# --- attributes and reply bodies -------------------------------------------


@dataclass(frozen=True)
class Attr:
    """fuse_attr: what a guest may cache about an inode."""

    ino: int
    size: int
    blocks: int
    atime: int
    mtime: int
    ctime: int
    atimensec: int
    mtimensec: int
    ctimensec: int
    mode: int
    nlink: int
    uid: int
    gid: int
    rdev: int
    blksize: int
    flags: int = 0

    @classmethod
    def from_stat(cls, st: os.stat_result) -> "Attr":
        return cls(
            ino=st.st_ino,
            size=st.st_size,
            blocks=st.st_blocks,
            atime=st.st_atime_ns // 1_000_000_000,
            mtime=st.st_mtime_ns // 1_000_000_000,
            ctime=st.st_ctime_ns // 1_000_000_000,
            atimensec=st.st_atime_ns % 1_000_000_000,
            mtimensec=st.st_mtime_ns % 1_000_000_000,
            ctimensec=st.st_ctime_ns % 1_000_000_000,
            mode=st.st_mode,
            nlink=st.st_nlink,
            uid=st.st_uid,
            gid=st.st_gid,
            rdev=st.st_rdev & 0xFFFFFFFF,
            blksize=st.st_blksize,
        )

    @property
    def mtime_ns(self) -> int:
        return self.mtime * 1_000_000_000 + self.mtimensec

    @property
    def is_dir(self) -> bool:
        return stat_module.S_ISDIR(self.mode)

    @property
    def is_reg(self) -> bool:
        return stat_module.S_ISREG(self.mode)


@dataclass(frozen=True)
class EntryOut:
    nodeid: int
    generation: int
    entry_valid: int
    attr_valid: int
    entry_valid_nsec: int
    attr_valid_nsec: int
    attr: Attr


@dataclass(frozen=True)
class AttrOut:
    attr_valid: int
    attr_valid_nsec: int
    attr: Attr


@dataclass(frozen=True)
class OpenOut:
    fh: int
    open_flags: int = 0
    backing_id: int = 0


@dataclass(frozen=True)
class CreateOut:
    entry: EntryOut
    open: OpenOut


@dataclass(frozen=True)
class ReadOut:
    data: bytes


@dataclass(frozen=True)
class WriteOut:
    size: int


@dataclass(frozen=True)
class DirEntry:
    ino: int
    off: int
    type: int
    name: bytes


@dataclass(frozen=True)
class ReaddirOut:
    entries: tuple[DirEntry, ...]


@dataclass(frozen=True)
class DirEntryPlus:
    """One READDIRPLUS entry: the name's entry (as a LOOKUP answers it; it counts
    one lookup) and its directory entry."""

    entry: EntryOut
    dirent: DirEntry


@dataclass(frozen=True)
class ReaddirplusOut:
    entries: tuple[DirEntryPlus, ...]


@dataclass(frozen=True)
class EmptyOut:
    pass


@dataclass(frozen=True)
class BytesOut:
    """A reply body that is bytes as they are: a symlink's target (READLINK), an
    extended attribute's whole value (GETXATTR), or the whole NUL-terminated list
    of names (LISTXATTR).  The host sends the whole value whatever size the
    kernel asked for; the guest answers the kernel's size probe and ERANGE."""

    data: bytes


@dataclass(frozen=True)
class StatfsOut:
    """fuse_kstatfs: the export's file system, as statfs(2) reports it."""

    blocks: int
    bfree: int
    bavail: int
    files: int
    ffree: int
    bsize: int
    namelen: int
    frsize: int


@dataclass(frozen=True)
class LseekOut:
    offset: int


@dataclass(frozen=True)
class LkOut:
    """GETLK's answer: the conflicting lock, or `type` F_UNLCK (2) if none."""

    start: int
    end: int
    type: int
    pid: int


ReplyBody = (
    EntryOut | AttrOut | OpenOut | CreateOut | ReadOut | WriteOut | ReaddirOut | EmptyOut
    | BytesOut | StatfsOut | LseekOut | ReaddirplusOut | LkOut
)


# --- file-system requests (one dataclass per opcode) -------------------------


@dataclass(frozen=True)
class Lookup:
    name: bytes
    opcode = Opcode.LOOKUP


@dataclass(frozen=True)
class Forget:
    nlookup: int
    opcode = Opcode.FORGET


@dataclass(frozen=True)
class Interrupt:
    """The caller of the sender's request `unique` gave up on it (a signal): end
    it if it is still waiting (a SETLKW), which then answers EINTR.  No reply."""

    unique: int
    opcode = Opcode.INTERRUPT


# Requests that get no reply (the frame's NEED_REPLY flag is clear).
NO_REPLY_OPCODES = frozenset({Opcode.FORGET, Opcode.INTERRUPT})


@dataclass(frozen=True)
class Getattr:
    fh: int = 0
    getattr_flags: int = 0
    opcode = Opcode.GETATTR


@dataclass(frozen=True)
class Setattr:
    valid: int
    fh: int = 0
    size: int = 0
    atime: int = 0
    mtime: int = 0
    ctime: int = 0
    atimensec: int = 0
    mtimensec: int = 0
    ctimensec: int = 0
    mode: int = 0
    uid: int = 0
    gid: int = 0
    lock_owner: int = 0
    opcode = Opcode.SETATTR


@dataclass(frozen=True)
class Mkdir:
    name: bytes
    mode: int = 0o755
    umask: int = 0
    opcode = Opcode.MKDIR


@dataclass(frozen=True)
class Unlink:
    name: bytes
    opcode = Opcode.UNLINK


@dataclass(frozen=True)
class Rmdir:
    name: bytes
    opcode = Opcode.RMDIR


@dataclass(frozen=True)
class Rename:
    newdir: int
    oldname: bytes
    newname: bytes
    opcode = Opcode.RENAME


@dataclass(frozen=True)
class Open:
    flags: int
    open_flags: int = 0
    opcode = Opcode.OPEN


@dataclass(frozen=True)
class Read:
    fh: int
    offset: int
    size: int
    read_flags: int = 0
    lock_owner: int = 0
    flags: int = 0
    opcode = Opcode.READ


@dataclass(frozen=True)
class Write:
    fh: int
    offset: int
    data: bytes
    write_flags: int = 0
    lock_owner: int = 0
    flags: int = 0
    opcode = Opcode.WRITE


@dataclass(frozen=True)
class Release:
    fh: int
    flags: int = 0
    release_flags: int = 0
    lock_owner: int = 0
    opcode = Opcode.RELEASE


@dataclass(frozen=True)
class Fsync:
    fh: int
    fsync_flags: int = 0
    opcode = Opcode.FSYNC


@dataclass(frozen=True)
class Flush:
    fh: int
    lock_owner: int = 0
    opcode = Opcode.FLUSH


@dataclass(frozen=True)
class Create:
    name: bytes
    flags: int
    mode: int = 0o644
    umask: int = 0
    open_flags: int = 0
    opcode = Opcode.CREATE


@dataclass(frozen=True)
class Readdir:
    fh: int = 0
    offset: int = 0
    size: int = 65536
    read_flags: int = 0
    lock_owner: int = 0
    flags: int = 0
    opcode = Opcode.READDIR


@dataclass(frozen=True)
class Readdirplus:
    """READDIR with each entry's attributes; every entry counts one lookup."""

    fh: int = 0
    offset: int = 0
    size: int = 65536
    read_flags: int = 0
    lock_owner: int = 0
    flags: int = 0
    opcode = Opcode.READDIRPLUS


@dataclass(frozen=True)
class Getlk:
    """The first lock that would conflict with this one (fuse_lk_in).  `owner`
    names the lock's owner in the guest; `end` is inclusive (2**63 - 1: to the
    end of the file); `type` F_RDLCK 0, F_WRLCK 1, F_UNLCK 2; `lk_flags`
    FUSE_LK_FLOCK 1 for a flock(2) lock (whole file, owned by the open file)."""

    fh: int
    owner: int
    start: int = 0
    end: int = 2**63 - 1
    type: int = 0
    pid: int = 0
    lk_flags: int = 0
    opcode = Opcode.GETLK


@dataclass(frozen=True)
class Setlk(Getlk):
    """Take or drop a lock; -EAGAIN if another owner's conflicts."""

    opcode = Opcode.SETLK


@dataclass(frozen=True)
class Setlkw(Getlk):
    """Take a lock, waiting while another owner's conflicts."""

    opcode = Opcode.SETLKW


@dataclass(frozen=True)
class Readlink:
    opcode = Opcode.READLINK


@dataclass(frozen=True)
class Symlink:
    """Make `name` in the request's directory a symlink to `target` (data: the
    host never follows it)."""

    name: bytes
    target: bytes
    opcode = Opcode.SYMLINK


@dataclass(frozen=True)
class Mknod:
    """Make `name` a FIFO, socket (or, where the host allows, a device node);
    `mode` carries the file type (S_IFIFO, ...) and the permission bits."""

    name: bytes
    mode: int
    rdev: int = 0
    umask: int = 0
    opcode = Opcode.MKNOD


@dataclass(frozen=True)
class Link:
    """Give inode `oldnodeid` the name `newname` in the request's directory."""

    oldnodeid: int
    newname: bytes
    opcode = Opcode.LINK


@dataclass(frozen=True)
class Statfs:
    opcode = Opcode.STATFS


@dataclass(frozen=True)
class Setxattr:
    name: bytes
    value: bytes
    flags: int = 0  # XATTR_CREATE 1, XATTR_REPLACE 2
    opcode = Opcode.SETXATTR


@dataclass(frozen=True)
class Getxattr:
    name: bytes
    size: int = 0  # the kernel's buffer (0: it asks for the size); the host sends it all
    opcode = Opcode.GETXATTR


@dataclass(frozen=True)
class Listxattr:
    size: int = 0
    opcode = Opcode.LISTXATTR


@dataclass(frozen=True)
class Removexattr:
    name: bytes
    opcode = Opcode.REMOVEXATTR


@dataclass(frozen=True)
class Fsyncdir:
    fh: int = 0
    fsync_flags: int = 0
    opcode = Opcode.FSYNCDIR


@dataclass(frozen=True)
class Fallocate:
    fh: int
    offset: int
    length: int
    mode: int = 0  # FALLOC_FL_*: KEEP_SIZE 1, PUNCH_HOLE 2, COLLAPSE_RANGE 8, ZERO_RANGE 16, ...
    opcode = Opcode.FALLOCATE


@dataclass(frozen=True)
class Rename2:
    newdir: int
    oldname: bytes
    newname: bytes
    flags: int = 0  # RENAME_NOREPLACE 1, RENAME_EXCHANGE 2
    opcode = Opcode.RENAME2


@dataclass(frozen=True)
class Lseek:
    fh: int
    offset: int
    whence: int  # SEEK_DATA 3, SEEK_HOLE 4 (the kernel answers SET/CUR/END itself)
    opcode = Opcode.LSEEK


@dataclass(frozen=True)
class CopyFileRange:
    """Copy `len` bytes from handle `fh_in` (of the request's node id) at
    `off_in` to handle `fh_out` of `nodeid_out` at `off_out`."""

    fh_in: int
    off_in: int
    nodeid_out: int
    fh_out: int
    off_out: int
    len: int
    flags: int = 0
    opcode = Opcode.COPY_FILE_RANGE


FsOp = (
    Lookup | Forget | Interrupt | Getattr | Setattr | Mkdir | Unlink | Rmdir | Rename | Open | Read
    | Write | Release | Fsync | Flush | Create | Readdir | Readlink | Symlink | Mknod | Link
    | Statfs | Setxattr | Getxattr | Listxattr | Removexattr | Fsyncdir | Fallocate | Rename2
    | Lseek | CopyFileRange | Readdirplus | Getlk | Setlk | Setlkw
)


# --- leases --------------------------------------------------------------


LEASE_GRANTED = 1 << 0
# Set on the reply to a modification that started a recall (the first dirtying write).
LEASE_FIRST_DIRTY = 1 << 1
# Set on a reply that does not renew the guest's lease term: the host sent it
# while an invalidation to this guest was still unACKed (docs/design.md, "Terms").
LEASE_NOT_RENEWED = 1 << 2


@dataclass(frozen=True)
class LeaseGrant:
    """The lease part of every file-system reply.

    `flags & LEASE_GRANTED` says whether the guest may cache what the reply
    carries about inode `ino`.  `generation` is the inode's invalidation count:
    a guest drops a grant older than an invalidation it has already seen.
    """

    ino: int = 0
    generation: int = 0
    term_ms: int = 0
    flags: int = 0

    @property
    def granted(self) -> bool:
        return bool(self.flags & LEASE_GRANTED)

    @property
    def first_dirty(self) -> bool:
        return bool(self.flags & LEASE_FIRST_DIRTY)

    @property
    def renews(self) -> bool:
        return not self.flags & LEASE_NOT_RENEWED


NO_LEASE = LeaseGrant()


# --- frames ----------------------------------------------------------------


@dataclass(frozen=True)
class FsRequest:
    """Guest -> host.  `op` decides the opcode; FORGET and INTERRUPT expect no reply."""

    unique: int
    nodeid: int
    op: FsOp
    uid: int = 0
    gid: int = 0
    pid: int = 0
    # The caller's supplementary groups (a FUSE_EXT_GROUPS extension on the wire:
    # docs/protocol.md, section 4); the host runs the request with them.
    groups: tuple[int, ...] = ()

    @property
    def opcode(self) -> Opcode:
        return self.op.opcode

    @property
    def needs_reply(self) -> bool:
        return self.op.opcode not in NO_REPLY_OPCODES


@dataclass(frozen=True)
class FsReply:
    """Host -> guest.  `error` is 0 or a negative errno; then `body` is EmptyOut."""

    unique: int
    error: int = 0
    body: ReplyBody = field(default_factory=EmptyOut)
    lease: LeaseGrant = NO_LEASE


@dataclass(frozen=True)
class Invalidate:
    """Host -> guest: drop everything cached about `ino` (FUSE_NOTIFY_INVAL_INODE).

    offset < 0 means attributes only; length <= 0 means to the end of file.
    The guest ACKs with the same `seq` once it has dropped its copy.
    """

    seq: int
    ino: int
    offset: int
    length: int
    generation: int


@dataclass(frozen=True)
class InvalEntry:
    """Host -> guest: forget the name `name` in directory `parent` (FUSE_NOTIFY_INVAL_ENTRY)."""

    seq: int
    parent: int
    name: bytes
    generation: int
    flags: int = 0


@dataclass(frozen=True)
class Ack:
    """Guest -> host: the invalidation `seq` has been applied."""

    seq: int


@dataclass(frozen=True)
class Heartbeat:
    """Guest -> host: renews every lease of this guest (a reply is a HeartbeatReply)."""

    seq: int


@dataclass(frozen=True)
class HeartbeatReply:
    """Host -> guest.  `error` 0: the term is renewed from when the HEARTBEAT was
    sent; -EAGAIN: not renewed (an invalidation is unACKed); -EKEYEXPIRED: this
    session was fenced (drop every cache, say HELLO again)."""

    seq: int
    error: int = 0


# --- a witness connection (docs/protocol.md, section 8a) --------------------


@dataclass(frozen=True)
class Witness:
    """Witness -> host, the first request on a connection of its own: this
    connection is the witness of session `guest_id`, whose HELLO carried the
    same client_id.  The reply is a WitnessReply."""

    guest_id: int


@dataclass(frozen=True)
class WitnessReply:
    """Host -> witness: `error` 0 (bound), or a negative errno (then the host closes)."""

    error: int = 0


@dataclass(frozen=True)
class Purge:
    """Host -> witness, no reply: the guest it witnesses is silent (`reason`,
    wire.PURGE_*): abort its mount and purge every inode now, then say PURGED."""

    reason: int


@dataclass(frozen=True)
class Purged:
    """Witness -> host, no reply: the witnessed mount's connection is aborted and
    `inodes` inodes were purged (`reason`, wire.PURGED_*); nothing of that guest
    is cached any more, so every wait for it is over."""

    reason: int
    inodes: int = 0


@dataclass(frozen=True)
class ConnectionClosed:
    """The peer closed the byte stream cleanly between frames."""


Message = (
    Hello | HelloReply | Auth | AuthReply | FsRequest | FsReply | Invalidate | InvalEntry | Ack | Heartbeat
    | HeartbeatReply | Witness | WitnessReply | Purge | Purged
)
