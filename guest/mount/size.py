"""The kernel's i_size, a part of `GuestMount` (docs/mount.md, "The size a read
sees"; R6)."""

from __future__ import annotations

from guest.client import HostError
from protocol.messages import Read


class KernelSize:
    # --- the kernel's i_size (docs/mount.md, "The size a read sees") ---------------

    def _size_fetched(self, nodeid: int, attr) -> None:
        """The host answered with `attr`: a reply carrying its size is on its way
        to the kernel (call before any await, and pair with `_size_sent`)."""
        if attr.mode & 0o170000 == 0o100000:
            self._sizes_pending.setdefault(nodeid, []).append(attr.size)

    def _size_sent(self, nodeid: int, attr) -> None:
        """A reply carrying `attr` goes to the kernel, which may take its size."""
        if attr.mode & 0o170000 != 0o100000:
            return
        pending = self._sizes_pending.get(nodeid)
        if pending and attr.size in pending:
            pending.remove(attr.size)
            if not pending:
                del self._sizes_pending[nodeid]
        floor = self.size_floor.get(nodeid)
        self.size_floor[nodeid] = attr.size if floor is None else min(floor, attr.size)

    def _size_bound(self, nodeid: int, excluding: int) -> int | None:
        """The floor, lowered by every pending reply's size but one `excluding`."""
        pending = list(self._sizes_pending.get(nodeid, ()))
        if excluding in pending:
            pending.remove(excluding)
        floor = self.size_floor.get(nodeid)
        sizes = pending + ([] if floor is None else [floor])
        return min(sizes) if sizes else None

    def _may_shrink_to(self, nodeid: int, size: int) -> None:
        """A short READ reply: the kernel may cut i_size down to `size`."""
        floor = self.size_floor.get(nodeid)
        if floor is not None and size < floor:
            self.size_floor[nodeid] = size

    def _grows_to(self, nodeid: int, size: int) -> None:
        """The kernel's i_size is now at least `size` (its own WRITE, a STORE)."""
        floor = self.size_floor.get(nodeid)
        if floor is not None and size > floor:
            self.size_floor[nodeid] = size

    async def _repair_size(self, nodeid: int, fh: int, size: int) -> None:
        """Before answering a read(2)'s GETATTR that says `size`: make sure the
        kernel's i_size is at least `size`, whether or not it takes this reply.

        The kernel drops a GETATTR reply when the inode's attr_version moved on
        while it waited (fuse_change_attributes: any FUSE_NOTIFY_INVAL_INODE of
        the inode, our R4 purges and the host's recalls alike, or another
        attribute reply it took first); the read then stops at the old
        i_size.  So when `size` is above every size the kernel may hold
        (`size_floor`), store the file's last byte, fetched from the host now,
        with FUSE_NOTIFY_STORE: that grows i_size to `size` (and makes the
        kernel drop this reply, harmlessly: its size is in already).  Replies
        fetched but not sent yet count: the kernel may take one after this."""
        bound = self._size_bound(nodeid, excluding=size)
        if size <= 0 or (bound is not None and size <= bound):
            return
        try:
            self.stats.host_requests += 1
            reply = await self.client.request(nodeid, Read(fh, size - 1, 1, 0, 0, 0))
        except HostError:
            return  # e.g. a write-only handle (lseek(SEEK_END) asks too): no read follows
        data = reply.body.data
        if len(data) != 1:
            return  # it shrank meanwhile: a READ will cut the kernel's i_size (short reply)
        st = self._inode(nodeid)
        leased = self._accept(reply.lease)
        if not leased:
            # The byte may land in an uptodate page (when `size - 1` starts a
            # page): unleased data, like any unleased READ reply (R4).
            st.tainted = True
            st.taint_seq += 1
        st.fill_seq += 1
        st.may_have_pages = True
        err, _ = await self._notify("store", self.dev.notify_store, nodeid, size - 1, data)
        if err == 0:
            self.stats.size_repairs += 1
            self._grows_to(nodeid, size)
