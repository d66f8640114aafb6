"""The file-system request handlers, one per opcode, by family.

`HANDLERS` maps each opcode the daemon serves to its handler; an opcode not
in it is answered with ENOSYS.  The families: names (the namespace), files
(attributes and handles), data (READ and WRITE), links (symlinks, hard links,
special files, RENAME2), xattrs (extended attributes), extents (FALLOCATE,
LSEEK, COPY_FILE_RANGE), filesystem (STATFS, FSYNCDIR), listing (READDIRPLUS), locks (GETLK,
SETLK, SETLKW, and INTERRUPT, which ends a SETLKW).
"""

from host.ops import data, extents, files, filesystem, links, listing, locks, names, xattrs
from protocol.fuse import Opcode

HANDLERS = {
    Opcode.LOOKUP: names.lookup,
    Opcode.FORGET: names.forget,
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
    Opcode.READDIRPLUS: listing.readdirplus,
    Opcode.GETLK: locks.getlk,
    Opcode.SETLK: locks.setlk,
    Opcode.SETLKW: locks.setlkw,
    Opcode.INTERRUPT: locks.interrupt,
}
