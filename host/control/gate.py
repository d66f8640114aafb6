"""The daemon's side of the control gate: a mixin of `HostDaemon`.

`HostDaemon.modification` calls `pass_control_gate` first thing (after the
restart grace): while an administrator holds the file it waits there, and a
journaled file's modification is recorded as it is let through.  It costs
one truthiness test per modification while no file is held or journaled.
"""

from __future__ import annotations

import asyncio
import errno
import os

from host.control.holds import METADATA_CHANGE, UNKNOWN_CHANGE, Change, FileHolds
from host.control.journal import EVERYTHING, ChangeJournal


class ControlGate:
    """Mixin of `HostDaemon`: `holds`, `journal` and the guests' gate."""

    def init_control(self) -> None:
        self.holds = FileHolds()
        self.journal = ChangeJournal(self.boot_id)
        self.holds.drains.append(self._drain_guest_modifications)

    async def pass_control_gate(self, nodeid: int, change, *, is_dir: bool = False) -> list | None:
        """Wait while a hold of `nodeid`'s file keeps `change` (a Change, a
        callable returning one, or None: anything) from landing; record it in
        the journal.  Returns None when the file is neither held nor
        journaled, else a list of futures the caller's landing must set
        (`Coherence._landing`): the next waiter a thaw lets go waits for it.
        The caller must enter its landing in the step this returns in."""
        if is_dir or not (self.holds or self.journal):
            return None
        try:
            key = self.fs.inode_key(nodeid)
        except OSError:
            return None
        if key not in self.holds and key not in self.journal:
            return None
        if callable(change):
            try:
                change = change()
            except OSError:
                change = UNKNOWN_CHANGE
        change = change or UNKNOWN_CHANGE
        done = asyncio.get_running_loop().create_future()

        async def landed() -> None:
            await asyncio.shield(done)

        await self.holds.admit(key, change, landed)
        if change.data:
            self.journal.record(key, change.start, change.end)
        return [done]

    async def _drain_guest_modifications(self, key: tuple[int, int]) -> int:
        """Wait for the guest modifications of `key` past the gate now."""
        nodeid = self.fs.inodes.lookup_key(*key)
        if nodeid is None:
            return 0
        landing = list(self._modifying.get(nodeid, ()))
        for done in landing:
            await asyncio.shield(done)
        return len(landing)

    # --- what a guest modification is about to do -----------------------------------

    def data_change(self, nodeid: int, offset: int, length: int) -> Change:
        """A write of `length` bytes at `offset`: a layout change if it reaches
        past the end of the file or into a hole (SEEK_HOLE; ext4 counts an
        unwritten extent as a hole, so writing into one is a layout change)."""
        end = offset + length
        fd = self.fs.writable_fd(nodeid)
        try:
            hole = os.lseek(fd, offset, os.SEEK_HOLE)
        except OSError as exc:
            if exc.errno != errno.ENXIO:  # ENXIO: at or past the end
                raise
            hole = offset
        # Past the end: the gap up to `offset` changes too (it reads as zeros now).
        return Change(min(offset, os.fstat(fd).st_size), end, hole < end)

    def size_change(self, nodeid: int, new_size: int | None) -> Change:
        """A SETATTR: a truncation to `new_size` changes the bytes from the
        smaller of the old and new size on, and the layout; without a size,
        only metadata."""
        if new_size is None:
            return METADATA_CHANGE
        try:
            old = os.fstat(self.fs.inodes.host_fd(nodeid)).st_size
        except OSError:
            old = 0
        return Change(min(old, new_size), EVERYTHING, True)
