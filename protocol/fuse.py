"""The Linux FUSE structures, defined once with construct.

Everything here is the kernel's own ABI (include/uapi/linux/fuse.h, protocol
7.45 on the machines we run on): opcode numbers, notify codes, and the
little-endian layouts of the headers and bodies.  The host protocol carries
these bytes unchanged inside its frames, so a payload is exactly what a
virtio-fs request or notification queue would carry; the mounting guest
(`guest/mount/`) writes the very same structures to /dev/fuse.
"""

from __future__ import annotations

import enum

from construct import (
    Array,
    Bytes,
    GreedyBytes,
    Int16ul,
    Int32sl,
    Int32ul,
    Int64sl,
    Int64ul,
    NullTerminated,
    Padding,
    Struct,
    Terminated,
    this,
)


class Opcode(enum.IntEnum):
    """FUSE request opcodes (the Linux numbers)."""

    LOOKUP = 1
    FORGET = 2
    GETATTR = 3
    SETATTR = 4
    READLINK = 5
    SYMLINK = 6
    MKNOD = 8
    MKDIR = 9
    UNLINK = 10
    RMDIR = 11
    RENAME = 12
    LINK = 13
    OPEN = 14
    READ = 15
    WRITE = 16
    STATFS = 17
    RELEASE = 18
    FSYNC = 20
    SETXATTR = 21
    GETXATTR = 22
    LISTXATTR = 23
    REMOVEXATTR = 24
    FLUSH = 25
    INIT = 26
    OPENDIR = 27
    READDIR = 28
    RELEASEDIR = 29
    FSYNCDIR = 30
    GETLK = 31
    SETLK = 32
    SETLKW = 33
    ACCESS = 34
    CREATE = 35
    INTERRUPT = 36
    BMAP = 37
    DESTROY = 38
    IOCTL = 39
    POLL = 40
    NOTIFY_REPLY = 41
    BATCH_FORGET = 42
    FALLOCATE = 43
    READDIRPLUS = 44
    RENAME2 = 45
    LSEEK = 46
    COPY_FILE_RANGE = 47


class NotifyCode(enum.IntEnum):
    """FUSE notification codes, carried in fuse_out_header.error with unique 0."""

    POLL = 1
    INVAL_INODE = 2
    INVAL_ENTRY = 3
    STORE = 4
    RETRIEVE = 5
    DELETE = 6


# fuse_setattr_in.valid bits
FATTR_MODE = 1 << 0
FATTR_UID = 1 << 1
FATTR_GID = 1 << 2
FATTR_SIZE = 1 << 3
FATTR_ATIME = 1 << 4
FATTR_MTIME = 1 << 5
FATTR_FH = 1 << 6
FATTR_ATIME_NOW = 1 << 7
FATTR_MTIME_NOW = 1 << 8
FATTR_CTIME = 1 << 10

# fuse_open_out.open_flags
FOPEN_DIRECT_IO = 1 << 0
FOPEN_KEEP_CACHE = 1 << 1

# fuse_fsync_in.fsync_flags
FUSE_FSYNC_FDATASYNC = 1 << 0

# fuse_setattr_in.valid: FATTR_KILL_SUIDGID (with FUSE_HANDLE_KILLPRIV_V2)
FATTR_KILL_SUIDGID = 1 << 11
# fuse_write_in.write_flags
FUSE_WRITE_CACHE = 1 << 0  # written back from the page cache (a mapping's dirty pages)
FUSE_WRITE_KILL_SUIDGID = 1 << 2
# fuse_open_in.open_flags
FUSE_OPEN_KILL_SUIDGID = 1 << 0

KERNEL_MAJOR = 7
KERNEL_MINOR = 45

FuseInHeader = Struct(
    "len" / Int32ul,
    "opcode" / Int32ul,
    "unique" / Int64ul,
    "nodeid" / Int64ul,
    "uid" / Int32ul,
    "gid" / Int32ul,
    "pid" / Int32ul,
    "total_extlen" / Int16ul,
    "padding" / Int16ul,
)
FUSE_IN_HEADER_SIZE = FuseInHeader.sizeof()  # 40

# Request extensions (fuse_in_header.total_extlen counts their bytes in units of 8): each
# is a fuse_ext_header and its body, padded to a multiple of 8 bytes; they follow the
# request's body.  The one cleanlease uses: the caller's supplementary groups.
FuseExtHeader = Struct("size" / Int32ul, "type" / Int32ul)  # size: header, body and padding
FUSE_EXT_GROUPS = 32
SuppGroups = Struct("nr_groups" / Int32ul, "groups" / Array(this.nr_groups, Int32ul))

FuseOutHeader = Struct(
    "len" / Int32ul,
    "error" / Int32sl,
    "unique" / Int64ul,
)
FUSE_OUT_HEADER_SIZE = FuseOutHeader.sizeof()  # 16

FuseAttr = Struct(
    "ino" / Int64ul,
    "size" / Int64ul,
    "blocks" / Int64ul,
    "atime" / Int64ul,
    "mtime" / Int64ul,
    "ctime" / Int64ul,
    "atimensec" / Int32ul,
    "mtimensec" / Int32ul,
    "ctimensec" / Int32ul,
    "mode" / Int32ul,
    "nlink" / Int32ul,
    "uid" / Int32ul,
    "gid" / Int32ul,
    "rdev" / Int32ul,
    "blksize" / Int32ul,
    "flags" / Int32ul,
)  # 88 bytes

# A name is the rest of a component: bytes up to a NUL, the NUL consumed.
Name = NullTerminated(GreedyBytes, term=b"\x00")

# --- request bodies (after fuse_in_header) --------------------------------

LookupIn = Struct("name" / Name, Terminated)
ForgetIn = Struct("nlookup" / Int64ul, Terminated)
# INTERRUPT: fuse_interrupt_in, the `unique` of an earlier request of the same sender
InterruptIn = Struct("unique" / Int64ul, Terminated)
GetattrIn = Struct("getattr_flags" / Int32ul, Padding(4), "fh" / Int64ul, Terminated)
SetattrIn = Struct(
    "valid" / Int32ul,
    Padding(4),
    "fh" / Int64ul,
    "size" / Int64ul,
    "lock_owner" / Int64ul,
    "atime" / Int64ul,
    "mtime" / Int64ul,
    "ctime" / Int64ul,
    "atimensec" / Int32ul,
    "mtimensec" / Int32ul,
    "ctimensec" / Int32ul,
    "mode" / Int32ul,
    Padding(4),
    "uid" / Int32ul,
    "gid" / Int32ul,
    Padding(4),
    Terminated,
)
MkdirIn = Struct("mode" / Int32ul, "umask" / Int32ul, "name" / Name, Terminated)
UnlinkIn = Struct("name" / Name, Terminated)
RmdirIn = Struct("name" / Name, Terminated)
RenameIn = Struct("newdir" / Int64ul, "oldname" / Name, "newname" / Name, Terminated)
OpenIn = Struct("flags" / Int32ul, "open_flags" / Int32ul, Terminated)
ReadIn = Struct(
    "fh" / Int64ul,
    "offset" / Int64ul,
    "size" / Int32ul,
    "read_flags" / Int32ul,
    "lock_owner" / Int64ul,
    "flags" / Int32ul,
    Padding(4),
    Terminated,
)
# The data follows fuse_write_in; its length must equal `size` (checked by the codec).
WriteIn = Struct(
    "fh" / Int64ul,
    "offset" / Int64ul,
    "size" / Int32ul,
    "write_flags" / Int32ul,
    "lock_owner" / Int64ul,
    "flags" / Int32ul,
    Padding(4),
    "data" / GreedyBytes,
)
WRITE_IN_SIZE = 40
ReleaseIn = Struct(
    "fh" / Int64ul, "flags" / Int32ul, "release_flags" / Int32ul, "lock_owner" / Int64ul, Terminated
)
FsyncIn = Struct("fh" / Int64ul, "fsync_flags" / Int32ul, Padding(4), Terminated)
FlushIn = Struct("fh" / Int64ul, Padding(4), Padding(4), "lock_owner" / Int64ul, Terminated)
CreateIn = Struct(
    "flags" / Int32ul,
    "mode" / Int32ul,
    "umask" / Int32ul,
    "open_flags" / Int32ul,
    "name" / Name,
    Terminated,
)
ReadlinkIn = Struct(Terminated)  # READLINK, STATFS: no body
StatfsIn = Struct(Terminated)
# SYMLINK: the new entry's name, then the link's target (both NUL-terminated)
SymlinkIn = Struct("name" / Name, "target" / Name, Terminated)
MknodIn = Struct("mode" / Int32ul, "rdev" / Int32ul, "umask" / Int32ul, Padding(4),
                 "name" / Name, Terminated)
# LINK: header nodeid is the new parent; `oldnodeid` the inode to link
LinkIn = Struct("oldnodeid" / Int64ul, "newname" / Name, Terminated)
Rename2In = Struct("newdir" / Int64ul, "flags" / Int32ul, Padding(4), "oldname" / Name,
                   "newname" / Name, Terminated)
# SETXATTR without FUSE_SETXATTR_EXT (FUSE_COMPAT_SETXATTR_IN_SIZE, 8 bytes), then the
# name and `size` bytes of value
SetxattrIn = Struct("size" / Int32ul, "flags" / Int32ul, "name" / Name, "value" / GreedyBytes)
GetxattrIn = Struct("size" / Int32ul, Padding(4), "name" / Name, Terminated)
ListxattrIn = Struct("size" / Int32ul, Padding(4), Terminated)
RemovexattrIn = Struct("name" / Name, Terminated)
FallocateIn = Struct("fh" / Int64ul, "offset" / Int64ul, "length" / Int64ul, "mode" / Int32ul,
                     Padding(4), Terminated)
LseekIn = Struct("fh" / Int64ul, "offset" / Int64ul, "whence" / Int32ul, Padding(4), Terminated)
CopyFileRangeIn = Struct(
    "fh_in" / Int64ul,
    "off_in" / Int64ul,
    "nodeid_out" / Int64ul,
    "fh_out" / Int64ul,
    "off_out" / Int64ul,
    "len" / Int64ul,
    "flags" / Int64ul,
    Terminated,
)
# GETLK, SETLK, SETLKW: fuse_lk_in; `owner` is the kernel's lock owner (a POSIX lock's
# files_struct, or with FUSE_LK_FLOCK in lk_flags the struct file of a flock), then the
# fuse_file_lock (start, end inclusive, type F_RDLCK 0 / F_WRLCK 1 / F_UNLCK 2, pid), flat
LkIn = Struct("fh" / Int64ul, "owner" / Int64ul, "start" / Int64ul, "end" / Int64ul,
              "type" / Int32ul, "pid" / Int32ul, "lk_flags" / Int32ul, Padding(4), Terminated)
FUSE_LK_FLOCK = 1 << 0

InitIn = Struct(
    "major" / Int32ul,
    "minor" / Int32ul,
    "max_readahead" / Int32ul,
    "flags" / Int32ul,
    "flags2" / Int32ul,
    Padding(44),
)

# --- reply bodies (after fuse_out_header) ---------------------------------

EntryOut = Struct(
    "nodeid" / Int64ul,
    "generation" / Int64ul,
    "entry_valid" / Int64ul,
    "attr_valid" / Int64ul,
    "entry_valid_nsec" / Int32ul,
    "attr_valid_nsec" / Int32ul,
    "attr" / FuseAttr,
)  # 128 bytes
AttrOut = Struct(
    "attr_valid" / Int64ul, "attr_valid_nsec" / Int32ul, Padding(4), "attr" / FuseAttr
)  # 104 bytes
OpenOut = Struct("fh" / Int64ul, "open_flags" / Int32ul, "backing_id" / Int32sl)  # 16 bytes
WriteOut = Struct("size" / Int32ul, Padding(4))  # 8 bytes
Dirent = Struct(
    "ino" / Int64ul,
    "off" / Int64ul,
    "namelen" / Int32ul,
    "type" / Int32ul,
    "name" / Bytes(lambda this: this.namelen),
    Padding(lambda this: (8 - this.namelen % 8) % 8),
)
# fuse_statfs_out = struct fuse_kstatfs (80 bytes)
StatfsOut = Struct(
    "blocks" / Int64ul,
    "bfree" / Int64ul,
    "bavail" / Int64ul,
    "files" / Int64ul,
    "ffree" / Int64ul,
    "bsize" / Int32ul,
    "namelen" / Int32ul,
    "frsize" / Int32ul,
    Padding(4),
    Padding(24),
)
GetxattrOut = Struct("size" / Int32ul, Padding(4))  # 8 bytes: the kernel asked for the size only
LseekOut = Struct("offset" / Int64ul)  # 8 bytes
LkOut = Struct("start" / Int64ul, "end" / Int64ul, "type" / Int32ul, "pid" / Int32ul)  # 24
# READDIRPLUS: each entry is a fuse_entry_out and then a fuse_dirent (padded to 8)
DirentPlus = Struct("entry" / EntryOut, "dirent" / Dirent)
InitOut = Struct(
    "major" / Int32ul,
    "minor" / Int32ul,
    "max_readahead" / Int32ul,
    "flags" / Int32ul,
    "max_background" / Int16ul,
    "congestion_threshold" / Int16ul,
    "max_write" / Int32ul,
    "time_gran" / Int32ul,
    "max_pages" / Int16ul,
    "map_alignment" / Int16ul,
    "flags2" / Int32ul,
    "max_stack_depth" / Int32ul,
    "request_timeout" / Int16ul,
    Padding(22),
)  # 64 bytes

# --- notification bodies (after fuse_out_header with unique 0) -------------

NotifyInvalInodeOut = Struct("ino" / Int64ul, "off" / Int64sl, "len" / Int64sl)  # 24 bytes
NotifyInvalEntryOut = Struct(
    "parent" / Int64ul, "namelen" / Int32ul, "flags" / Int32ul
)  # 16 bytes, then name and NUL
