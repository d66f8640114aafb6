"""The mount's coherence machinery, a part of `GuestMount`: notifications to the
kernel on notifier threads (R1, R2), purges of tainted pages (R4, R5), and
the lease rules for what the kernel may keep (R3, R4)."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import stat
import time

from guest.fuse_device import FUSE_EXPIRE_ONLY, FUSE_EXPIRE_ONLY_MINOR
from guest.mount.state import NotificationFailed, _Inode
from protocol import fusefast
from protocol.fuse import FOPEN_DIRECT_IO, FOPEN_KEEP_CACHE
from protocol.messages import InvalEntry, Invalidate, LeaseGrant, Policy

log = logging.getLogger("cleanlease.mount")


class Coherence:
    # --- notifications (R1, R2) -------------------------------------------------------

    def _notify(self, kind: str, fn, *args) -> asyncio.Future:
        """Run one notification write on a notifier thread; the future gives
        (errno, ns taken).  Once the mount has stopped (the notifier is shut
        down, /dev/fuse closed) it fails at once: nothing can reach the kernel."""

        def run():
            started = time.monotonic_ns()
            err = fn(*args)
            return err, time.monotonic_ns() - started

        def done(f: asyncio.Future) -> None:
            if f.cancelled() or f.exception() is not None:
                self.stats.notify_errors += 1
                return
            err, took = f.result()
            self.stats.notify_max_ns = max(self.stats.notify_max_ns, took)
            if kind == "inode":
                self.stats.notify_inval_inode += 1
            elif kind == "entry":
                self.stats.notify_inval_entry += 1
            if err == errno.ENOENT:
                self.stats.notify_nothing_cached += 1
            elif err:
                self.stats.notify_errors += 1
                log.warning("notify %s%r: %s", kind, args, os.strerror(err))

        try:
            future = asyncio.wrap_future(self.notifier.submit(run), loop=self.loop)
        except RuntimeError:  # the notifier is shut down: the mount has stopped
            future = self.loop.create_future()
            future.set_exception(NotificationFailed(errno.ESHUTDOWN))
        future.add_done_callback(done)
        return future

    def _on_invalidate(self, event) -> asyncio.Future | None:
        """Tell the kernel to drop its copy.  The client ACKs when the returned
        future completes, and only if it succeeds (R2): the notification was
        written and the kernel answered 0, or ENOENT (it holds no such inode or
        name, so nothing is cached: fuse_reverse_inval_inode/_entry).  A
        notification that was cancelled or failed (the mount stopping, /dev/fuse
        closed) fails the future: no ACK, and the host treats this guest as
        silent until its term has run out."""
        if isinstance(event, Invalidate):
            self.stats.invalidations += 1
        elif isinstance(event, InvalEntry):
            self.stats.inval_entries += 1
        else:  # pragma: no cover
            return None
        if not self.initialized.done():
            return None  # before INIT is answered the kernel cannot have cached anything
        if isinstance(event, Invalidate):
            future = self._purge(event.ino, event.offset, event.length)
        else:
            # Expired, not unhashed: the kernel asks (LOOKUP) before it uses the
            # name again, and a process whose working directory it names keeps a
            # working getcwd() (unhashed, the directory looks deleted to it).
            future = self._notify("entry", self.dev.notify_inval_entry, event.parent, event.name,
                                  self._expire_only())
            # fuse_reverse_inval_entry invalidates the directory's attributes
            # (mtime, size, link count) only if it found the dentry: without
            # one they would stay valid (untimed, under the lease).  Attributes
            # only (offset -1): no page lock, no directory lock.
            future = self._and_then(future, self._notify(
                "inode", self.dev.notify_inval_inode, event.parent, -1, 0))
        self.stats.acks_held += 1
        return self._succeeded(future)

    def _succeeded(self, notification: asyncio.Future) -> asyncio.Future:
        """A future that succeeds once `notification` has, and fails otherwise."""
        outcome = self.loop.create_future()

        def done(f: asyncio.Future) -> None:
            if outcome.done():
                return
            if f.cancelled():
                err = errno.ECANCELED
            elif f.exception() is not None:
                exc = f.exception()
                err = exc.errno if isinstance(exc, NotificationFailed) else errno.EIO
            else:
                err = f.result()[0]
            if err in (0, errno.ENOENT):
                outcome.set_result(None)
            else:
                self.stats.acks_withheld += 1
                outcome.set_exception(NotificationFailed(err))

        notification.add_done_callback(done)
        return outcome

    def _inode(self, nodeid: int) -> _Inode:
        """Called before data of `nodeid` can reach the page cache (READ, STORE)."""
        st = self.inodes.get(nodeid)
        if st is None:
            st = self.inodes[nodeid] = _Inode()
        if nodeid not in self._announced:
            self._announce(nodeid)
        return st

    def _purge(self, nodeid: int, off: int = 0, length: int = 0) -> asyncio.Future:
        """Drop the kernel's pages (from `off`; all by default) and attributes of
        `nodeid`.  A whole-file purge clears the tainted mark unless an unleased
        READ reply went out while it ran."""
        st = self._inode(nodeid)
        taint_seq, fill_seq = st.taint_seq, st.fill_seq
        future = self._notify("inode", self.dev.notify_inval_inode, nodeid, off, length)
        names = self._names.pop(nodeid, None)
        if names:
            future = self._and_then(future, self._drop_names(nodeid, names))

        def done(f: asyncio.Future) -> None:
            if f.cancelled() or f.exception() is not None or off != 0 or length > 0:
                return
            if f.result()[0] not in (0, errno.ENOENT):
                return  # nothing was dropped
            if st.taint_seq == taint_seq:
                st.tainted = False
            if st.fill_seq == fill_seq:
                st.may_have_pages = False

        future.add_done_callback(done)
        return future

    def _expire_only(self) -> int:
        """The INVAL_ENTRY flags: FUSE_EXPIRE_ONLY where the kernel has it (the
        dentry expires, its next use asks the host; unhashed, a directory some
        process works in would look deleted to it: docs/mount.md, "INVAL_ENTRY
        and directory locks")."""
        minor = self.initialized.result() if self.initialized.done() else 0
        return FUSE_EXPIRE_ONLY if minor >= FUSE_EXPIRE_ONLY_MINOR else 0

    def _drop_names(self, parent: int, names: set[bytes]) -> asyncio.Future:
        """Drop the kernel's dentries of `names` in directory `parent`, which were
        valid under its lease (FUSE_NOTIFY_INVAL_ENTRY each, on one notifier
        thread); the future gives (first errno other than 0 and ENOENT, ns)."""

        expire = self._expire_only()

        def drop_all() -> int:
            worst = 0
            for name in names:
                err = self.dev.notify_inval_entry(parent, name, expire)
                if err not in (0, errno.ENOENT) and not worst:
                    worst = err
            return worst

        return self._notify("names", drop_all)

    def _and_then(self, first: asyncio.Future, second: asyncio.Future) -> asyncio.Future:
        """A notification future that completes when both have: the first's
        result, unless the second failed."""
        both = self.loop.create_future()

        def done(_) -> None:
            if both.done() or not (first.done() and second.done()):
                return
            for f in (second, first):
                if f.cancelled():
                    both.cancel()
                    return
                if f.exception() is not None:
                    both.set_exception(f.exception())
                    return
            err, took = first.result()
            err2, took2 = second.result()
            both.set_result((err if err not in (0, errno.ENOENT) or not err2 else err2,
                             max(took, took2)))

        first.add_done_callback(done)
        second.add_done_callback(done)
        return both

    async def _drain_and_purge(self, nodeid: int, reads: list[asyncio.Future]) -> None:
        """R4: wait until the READs in `reads` are answered, then drop tainted pages."""
        if reads:
            await asyncio.wait(reads)
        st = self.inodes.get(nodeid)
        if st is not None and st.tainted:
            self.stats.purges += 1
            await self._purge(nodeid)

    def _schedule_purge(self, nodeid: int) -> None:
        st = self._inode(nodeid)
        if st.purge_scheduled:
            return
        st.purge_scheduled = True

        async def run():
            st.purge_scheduled = False  # a taint from now on schedules another
            if st.tainted:
                self.stats.purges += 1
                await self._purge(nodeid)

        task = asyncio.ensure_future(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _own_modification(self, nodeid: int, lease: LeaseGrant, *,
                                pages: bool = True) -> None:
        """R5: after our own modification of `nodeid` the kernel may not keep its pages.

        With `pages` false only its attributes are dropped: for a modification
        the kernel sends while it keeps writeback of the inode's pages from
        starting (a truncating SETATTR: FUSE_NOWRITE), where a page purge would
        wait for ever to launder a dirty page of a shared mapping; the kernel
        drops the truncated pages itself after the reply (R7)."""
        ino = lease.ino or nodeid
        if lease.ino:
            self.cache.invalidate_inode(lease.ino, lease.generation)
        else:
            self.cache.forget_own_copy(ino)
        if not self.leases:
            return
        names = self._names.pop(ino, None)
        if names:
            # The host no longer counts us among the directory's holders, so it
            # will not recall its names: drop them now.  Not awaited: the kernel
            # holds the directory's i_rwsem (INVAL_ENTRY takes it) until it has
            # this reply (docs/mount.md, "Entries and attributes under a lease").
            self._drop_names(ino, names)
        st = self.inodes.get(ino)
        if st is not None and (st.may_have_pages or st.reads or st.tainted):
            self.stats.purges += 1
            self._attrs_kept.discard(ino)  # dropped before the reply (a reply meanwhile re-adds)
            if pages:
                await self._purge(ino)
            else:
                await self._notify("inode", self.dev.notify_inval_inode, ino, -1, 0)
        elif ino in self._attrs_kept:
            # Attributes the kernel may still hold as valid (T1) from before the
            # change, which no recall will reach now: attributes only (offset
            # -1: no page lock to wait for).  Once: until a reply makes them
            # valid again (`_kept`), later modifications need not.
            self._attrs_kept.discard(ino)
            await self._notify("inode", self.dev.notify_inval_inode, ino, -1, 0)

    def _written_back(self, nodeid: int, lease: LeaseGrant) -> None:
        """R7: a WRITE of the kernel's own dirty pages (FUSE_WRITE_CACHE) was
        answered: its pages are the newest bytes, so they stay; its attributes
        (mtime) are dropped, after the reply and without waiting: the kernel
        may be evicting the inode and waiting for this very reply."""
        ino = lease.ino or nodeid
        if lease.ino:
            self.cache.invalidate_inode(lease.ino, lease.generation)
        else:
            self.cache.forget_own_copy(ino)
        if self.leases:
            self.stats.writebacks += 1
            self._attrs_kept.discard(ino)
            self._notify("inode", self.dev.notify_inval_inode, ino, -1, 0)

    # --- lease rules for what the kernel may keep (R3, R4) ---------------------------

    def _accept(self, lease: LeaseGrant) -> bool:
        """True if the reply's content may stay cached in the kernel."""
        return self.leases and self.cache.accept_grant(lease) and self.cache.may_serve_data(lease.ino)

    def _valid_for(self, granted: bool, sec: int, nsec: int, *, term_capped: bool = False
                   ) -> tuple[int, int]:
        """Kernel timeout for attributes/entries under the policy.

        Without leases: the host's.  Under a lease policy: 0 without an
        accepted grant, or once this guest's term has run out; with one, the
        host's ("until invalidated"), not capped by the term.  That is safe
        because a lease ends only in one of two ways (docs/mount.md, "Entries
        and attributes under a lease"): by a recall, whose notification drops
        the kernel's copy before the change lands (R2); or by the term running
        out, before which the watchdog aborts the connection and drops the
        attributes of every node id it was told of.  So the caller announces
        the node id to the watchdog (`_kept`) before the reply goes out.

        `term_capped`: the term's remaining time at most, as before (a
        directory's attributes: no detector reports a host-local chmod or
        utime of a directory, so no recall would come)."""
        if not self.leases:
            return sec, nsec
        if not granted:
            return 0, 0
        remaining = self.cache.renewed_until - self.cache.clock()
        if remaining <= 0:
            return 0, 0
        if not term_capped or remaining >= sec + nsec / 1e9:
            return sec, nsec
        whole = int(remaining)
        return whole, int((remaining - whole) * 1e9)

    def _kept(self, nodeid: int, *valid: tuple[int, int]) -> None:
        """A reply lets the kernel keep something of `nodeid` for a while: under a
        lease policy the watchdog must purge it when the term runs out."""
        if self.leases and any(v != (0, 0) for v in valid):
            self._announce(nodeid)
            self._attrs_kept.add(nodeid)

    async def _attrs_granted(self, nodeid: int, lease: LeaseGrant) -> bool:
        """For a reply carrying attributes of `nodeid`: may the kernel keep them?

        Only under an accepted grant, and only once no tainted page is left
        (R4): valid attributes let later reads skip the GETATTR check."""
        if not self._accept(lease):
            return False
        st = self.inodes.get(nodeid)
        if st is not None and (st.tainted or st.reads):
            await self._drain_and_purge(nodeid, list(st.reads))
            if st.tainted:
                return False
        return self._accept(lease)

    def _entry_bytes(self, parent: int, name: bytes, entry, attr_granted: bool) -> bytes:
        if self.leases:
            parent_leased = self.cache.may_serve_data(parent)
            entry_valid = self._valid_for(parent_leased, entry.entry_valid, entry.entry_valid_nsec)
            if entry_valid != (0, 0):
                # Kept under the parent's lease: dropped with it (`_purge`).
                self._names.setdefault(parent, set()).add(bytes(name))
        else:
            entry_valid = (entry.entry_valid, entry.entry_valid_nsec)
        attr_valid = self._valid_for(attr_granted, entry.attr_valid, entry.attr_valid_nsec,
                                     term_capped=stat.S_ISDIR(entry.attr.mode))
        # The name is the parent's to keep: a path walk through it checks the
        # parent's attributes first (default_permissions), and those are the
        # parent's own reply's (announced there, or invalid: then it asks).
        self._kept(entry.nodeid, attr_valid)
        self._size_sent(entry.nodeid, entry.attr)
        self._lookups[entry.nodeid] = self._lookups.get(entry.nodeid, 0) + 1
        return fusefast.entry_out(entry.nodeid, entry.generation, entry_valid[0], attr_valid[0],
                                  entry_valid[1], attr_valid[1], entry.attr)

    def _attr_bytes(self, nodeid: int, out, granted: bool) -> bytes:
        valid = self._valid_for(granted, out.attr_valid, out.attr_valid_nsec,
                                term_capped=stat.S_ISDIR(out.attr.mode))
        self._kept(nodeid, valid)
        self._size_sent(nodeid, out.attr)
        return fusefast.attr_out(valid[0], valid[1], out.attr)

    def _open_flags(self, writing: bool, granted: bool) -> int:
        match self.policy:
            case Policy.NEVER:
                return FOPEN_DIRECT_IO
            case Policy.ALWAYS | Policy.TTL:
                return FOPEN_KEEP_CACHE
        return FOPEN_KEEP_CACHE if granted and not writing else FOPEN_DIRECT_IO

    def _opened(self, fh: int, flags: int) -> bytes:
        keep = bool(flags & FOPEN_KEEP_CACHE)
        self.handles[fh] = keep
        if keep:
            self.stats.opens_cached += 1
        else:
            self.stats.opens_direct += 1
        return fusefast.open_out(fh, flags)


