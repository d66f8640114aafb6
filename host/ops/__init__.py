"""The file-system request handlers, one per opcode, by family.

`HANDLERS` maps each opcode the daemon serves to its handler; an opcode not
in it is answered with ENOSYS.  The families: names (the namespace), files
(attributes and handles), data (READ and WRITE).
"""

from host.ops import data, files, names
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
}
