"""The mount's two tables: requests it answers itself (`LOCAL`) and requests
it forwards to the host (`FORWARDED`), by FUSE opcode.  An opcode in neither
is answered ENOSYS (and counted in `MountStats.enosys`)."""

from __future__ import annotations

from guest.mount import data, extents, files, filesystem, links, locks, names, xattrs
from guest.mount.local import LOCAL
from protocol.fuse import Opcode

__all__ = ["FORWARDED", "LOCAL"]

FORWARDED = {
    Opcode.LOOKUP: names.lookup,
    Opcode.GETATTR: files.get_attr,
    Opcode.SETATTR: files.set_attr,
    Opcode.OPEN: files.open_file,
    Opcode.CREATE: files.create_file,
    Opcode.READ: data.read,
    Opcode.WRITE: data.write,
    Opcode.FLUSH: files.flush,
    Opcode.FSYNC: files.fsync,
    Opcode.RELEASE: files.release,
    Opcode.READDIR: names.readdir,
    Opcode.READDIRPLUS: names.readdirplus,
    Opcode.MKDIR: names.mkdir,
    Opcode.UNLINK: names.unlink,
    Opcode.RMDIR: names.rmdir,
    Opcode.RENAME: names.rename,
    Opcode.SYMLINK: links.symlink,
    Opcode.READLINK: links.readlink,
    Opcode.LINK: links.link,
    Opcode.MKNOD: links.mknod,
    Opcode.RENAME2: links.rename2,
    Opcode.SETXATTR: xattrs.setxattr,
    Opcode.GETXATTR: xattrs.getxattr,
    Opcode.LISTXATTR: xattrs.listxattr,
    Opcode.REMOVEXATTR: xattrs.removexattr,
    Opcode.FALLOCATE: extents.fallocate,
    Opcode.LSEEK: extents.lseek,
    Opcode.COPY_FILE_RANGE: extents.copy_file_range,
    Opcode.STATFS: filesystem.statfs,
    Opcode.FSYNCDIR: filesystem.fsyncdir,
    Opcode.GETLK: locks.getlk,
    Opcode.SETLK: locks.setlk,
    Opcode.SETLKW: locks.setlkw,
}
