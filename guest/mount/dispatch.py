"""The mount's two tables: requests it answers itself (`LOCAL`) and requests
it forwards to the host (`FORWARDED`), by FUSE opcode.  An opcode in neither
is answered ENOSYS (and counted in `MountStats.enosys`)."""

from __future__ import annotations

from guest.mount import data, files, names
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
    Opcode.MKDIR: names.mkdir,
    Opcode.UNLINK: names.unlink,
    Opcode.RMDIR: names.rmdir,
    Opcode.RENAME: names.rename,
}
