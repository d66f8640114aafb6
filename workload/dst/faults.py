"""The host file system under the simulation: the real backend, with seeded faults.

`FaultyExportFS` is `host.backend.ExportFS` itself, on a real temporary
directory, with a seeded layer where a system call's result can be
injected:

* WRITE: EIO, ENOSPC or EFBIG instead of the pwrite (nothing lands), or a
  short write (a prefix of whole 4 KiB blocks lands, and the count says so);
* SETATTR (truncate): EIO or EFBIG instead of the ftruncate;
* FSYNC and the daemon's idle flush: EIO from the fdatasync (after it ran:
  writeback failed).

Each fault is reported to `on_fault(text)` for the event trace.
"""

from __future__ import annotations

import errno
import random

from host.backend import ExportFS

BLOCK = 4096


class FaultyExportFS(ExportFS):
    def __init__(self, root, *, rng: random.Random, p: float, on_fault, **kwargs):
        super().__init__(root, **kwargs)
        self.rng = rng
        self.p = p  # probability of a fault per call that can take one
        self.on_fault = on_fault
        self.faults = 0

    def _roll(self) -> bool:
        return self.p > 0 and self.rng.random() < self.p

    def _fail(self, what: str, code: int) -> OSError:
        self.faults += 1
        self.on_fault(f"fault: {what} -> {errno.errorcode[code]}")
        return OSError(code, f"simulated {errno.errorcode[code]}")

    def write(self, owner, fh, offset, data):
        return self.write_call(owner, fh, offset, data)()

    def write_call(self, owner, fh, offset, data):
        """The daemon's WRITE: checked now, written by the returned call (on a
        worker in production, inline here).  An errno is raised now (inside
        the modification, after its recall, as the pwrite's would be); a short
        write is the call's."""
        if self._roll():
            kind = self.rng.choice(("EIO", "ENOSPC", "EFBIG", "short"))
            if kind == "short" and len(data) > BLOCK:
                landed = self.rng.randrange(1, len(data) // BLOCK) * BLOCK
                call = super().write_call(owner, fh, offset, memoryview(data)[:landed])

                def short() -> int:
                    self.faults += 1
                    self.on_fault(f"fault: short write, {landed} of {len(data)} bytes")
                    return call()
                return short
            if kind != "short":
                # Inside the modification, after its recall, as the pwrite's would be.
                raise self._fail("write", getattr(errno, kind))
        return super().write_call(owner, fh, offset, data)

    def setattr(self, owner, nodeid, *, size=None, **kwargs):
        if size is not None and self._roll():
            raise self._fail("truncate", self.rng.choice((errno.EIO, errno.EFBIG)))
        return super().setattr(owner, nodeid, size=size, **kwargs)

    def _faulty_sync(self, sync, what: str):
        if not self._roll():
            return sync

        def failing():
            sync()
            raise self._fail(what, errno.EIO)
        return failing

    def fsync(self, owner, fh, datasync):
        return self._faulty_sync(super().fsync(owner, fh, datasync), "fsync")

    def flush_inode(self, nodeid):
        return self._faulty_sync(super().flush_inode(nodeid), "idle flush")

