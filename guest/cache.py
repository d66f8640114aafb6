"""The guest's caches and the rules for serving from them, per policy.

Pure: no sockets, no event loop; the clock is passed in.  The client
(`guest/client.py`) asks `may_serve_*` before a hit, stores what replies carry
with `store_*`, and applies invalidations with `invalidate_*`.

Pages are 4 KiB, keyed (nodeid, page index), in one LRU bounded by
`capacity_bytes`.  A page shorter than 4 KiB is the last page of the file: a
read that reaches it stops there, so no separate file size is needed while the
lease holds (any size change is a modification, which recalls the lease).

What may be served:
  never        nothing
  always       everything, forever (until evicted)
  ttl          attributes and entries for `ttl` seconds; pages while the
               file's mtime and size are what they were when the pages were
               fetched, checked at open (virtiofsd cache=auto)
  open-lease,  only under a lease: granted by a reply, not older than an
  clean-lease  invalidation already seen (generation), and not after the
               guest's lease term has run out (`renewed_until`)
"""

from __future__ import annotations

import time
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass

from protocol.messages import Attr, Granularity, LeaseGrant, Policy

PAGE_SIZE = 4096
# A page index past any file: an invalidated span ending here runs to the end.
END_PAGE = 1 << 62
# Invalidations remembered per inode before they are merged into one
# (conservative: a merged one drops every grant older than the newest).
SEEN_SPANS = 32

# GuestCache._data_rule: what may_serve_data answers under the policy.
_NONE, _ALL, _LEASED = "none", "all", "leased"


@dataclass
class CacheStats:
    reads: int = 0
    hits: int = 0
    misses: int = 0
    bytes_fetched: int = 0
    invalidations: int = 0
    inval_entries: int = 0
    stale_grants_dropped: int = 0
    evictions: int = 0
    attr_hits: int = 0
    entry_hits: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hits / self.reads if self.reads else 0.0


class GuestCache:
    def __init__(self, policy: Policy, capacity_bytes: int, *, ttl_s: float = 1.0,
                 lease_term_s: float = 2.0, clock=time.monotonic):
        self.policy = policy  # also sets _data_rule and _uses_leases
        self.capacity_pages = max(1, capacity_bytes // PAGE_SIZE)
        self.ttl_s = ttl_s
        self.lease_term_s = lease_term_s
        self.clock = clock
        self.stats = CacheStats()
        self._pages: OrderedDict[tuple[int, int], bytes] = OrderedDict()
        self._pages_of: dict[int, set[int]] = {}
        self._attrs: dict[int, tuple[Attr, float]] = {}
        self._entries: dict[tuple[int, bytes], tuple[int, float]] = {}
        self._leases: set[int] = set()
        self._seen_generation: dict[int, int] = {}
        # Per inode: the invalidations seen, as (first page, end page, generation);
        # page -1 is the attributes (`_seen_generation` is the newest of them).
        self._seen_spans: dict[int, list[tuple[int, int, int]]] = {}
        # What the host's invalidations of a regular file cover (HELLO): under
        # RANGE, this guest's own writes drop only the pages they change.
        self.granularity = Granularity.INODE
        # Per directory: how many of its names were invalidated (or changed by
        # this guest) so far.  A LOOKUP reply is cached only if this did not
        # move while it was on its way (`entry_epoch`, `store_entry`).
        self._entry_epoch: dict[int, int] = {}
        # ttl: the (mtime_ns, size) the cached pages of an inode belong to.
        self._page_version: dict[int, tuple[int, int]] = {}
        self.renewed_until = 0.0
        # Inodes this guest is modifying right now (own_modification), by count.
        self._modifying: dict[int, int] = {}

    # --- the policy ------------------------------------------------------------------

    @property
    def policy(self) -> Policy:
        return self._policy

    @policy.setter
    def policy(self, policy: Policy) -> None:
        # What may_serve_data answers, decided once per policy rather than per read:
        # _NONE (never), _ALL (always, ttl) or _LEASED (the lease policies).
        self._policy = policy
        self._uses_leases = policy in (Policy.OPEN_LEASE, Policy.CLEAN_LEASE)
        if policy == Policy.NEVER:
            self._data_rule = _NONE
        elif policy in (Policy.ALWAYS, Policy.TTL):
            self._data_rule = _ALL
        else:
            self._data_rule = _LEASED

    # --- leases and renewal ------------------------------------------------------

    @property
    def uses_leases(self) -> bool:
        return self._uses_leases

    def renewed(self, sent_at: float) -> None:
        """A reply to something sent at `sent_at` arrived: leases live until sent_at + term.

        The host counts the term from when it received the request, which is
        later, so the guest always stops serving first.
        """
        self.renewed_until = max(self.renewed_until, sent_at + self.lease_term_s)

    def accept_grant(self, lease: LeaseGrant, pages: tuple[int, int] | None = None) -> bool:
        """Take the lease a reply carries.  True if the reply's content may be cached.

        A grant older than an invalidation already seen for that inode raced
        with it and is dropped.  `pages` ([first, end) page indices) are what a
        READ reply carries: then only an invalidation of those pages counts
        (one of other pages, under range granularity, left them as they were).
        """
        if not self._uses_leases:
            return self.policy is not Policy.NEVER
        if not lease.granted:
            return False
        if lease.ino in self._modifying:
            self.stats.stale_grants_dropped += 1
            return False
        if lease.generation < self._seen_generation_over(lease.ino, pages):
            self.stats.stale_grants_dropped += 1
            return False
        self._leases.add(lease.ino)
        return True

    def _seen_generation_over(self, nodeid: int, pages: tuple[int, int] | None) -> int:
        """The newest invalidation of `nodeid` seen that covers `pages` (a page
        span [first, end)); of any part of it when `pages` is None (attributes,
        an open: what a reply without pages says is about the whole inode)."""
        newest = self._seen_generation.get(nodeid, 0)
        if pages is None or newest == 0:
            return newest
        first, end = pages
        return max((gen for start, stop, gen in self._seen_spans.get(nodeid, ())
                    if start < end and first < stop), default=0)

    def _saw_invalidation(self, nodeid: int, start: int, stop: int, generation: int) -> None:
        if generation > self._seen_generation.get(nodeid, 0):
            self._seen_generation[nodeid] = generation
        spans = [(a, b, g) for a, b, g in self._seen_spans.get(nodeid, ())
                 if not (start <= a and b <= stop and g <= generation)]
        spans.append((start, stop, generation))
        if len(spans) > SEEN_SPANS:
            spans = [(min(a for a, _, _ in spans), max(b for _, b, _ in spans),
                      max(g for _, _, g in spans))]
        self._seen_spans[nodeid] = spans

    def _leased(self, nodeid: int) -> bool:
        return nodeid in self._leases and self.clock() < self.renewed_until

    # --- what may be served --------------------------------------------------------

    def may_serve_data(self, nodeid: int) -> bool:
        rule = self._data_rule
        if rule is _LEASED:
            return nodeid in self._leases and self.clock() < self.renewed_until
        return rule is _ALL

    def may_serve_attr(self, nodeid: int, now: float | None = None) -> bool:
        entry = self._attrs.get(nodeid)
        if entry is None:
            return False
        match self.policy:
            case Policy.NEVER:
                return False
            case Policy.ALWAYS:
                return True
            case Policy.TTL:
                return (now or self.clock()) < entry[1]
        return self._leased(nodeid)

    # --- pages -----------------------------------------------------------------

    def read_pages(self, nodeid: int, offset: int, size: int) -> bytes | None:
        """Serve [offset, offset+size) from cached pages, or None if any page is missing.

        Does not consult the policy: call `may_serve_data` first.
        """
        if size <= 0:
            return b""
        first, last = offset // PAGE_SIZE, (offset + size - 1) // PAGE_SIZE
        if first == last:
            # Within one page (the common case): no list, no join, and no copy at all
            # when the read covers the whole page.
            key = (nodeid, first)
            page = self._pages.get(key)
            if page is None:
                return None
            self._pages.move_to_end(key)
            start = offset - first * PAGE_SIZE
            if start == 0 and size >= len(page):
                return page
            return page[start: start + size]
        chunks = []
        for index in range(first, last + 1):
            page = self._pages.get((nodeid, index))
            if page is None:
                return None
            self._pages.move_to_end((nodeid, index))
            chunks.append(page)
            if len(page) < PAGE_SIZE:
                break  # end of file
        data = b"".join(chunks)
        start = offset - first * PAGE_SIZE
        return data[start: start + size]

    def store_pages(self, nodeid: int, offset: int, data: bytes, requested: int) -> None:
        """Cache the pages of a READ reply for [offset, offset+requested), offset page-aligned.

        A reply shorter than asked ends at end of file; its last page (possibly
        empty) is stored short, which marks the end.
        """
        assert offset % PAGE_SIZE == 0
        index = offset // PAGE_SIZE
        pages = self._pages_of.get(nodeid)
        if pages is None:
            pages = self._pages_of[nodeid] = set()
        if type(data) is bytes and len(data) <= PAGE_SIZE:
            # One page (or the short last one): keep the reply's bytes, no copy.
            key = (nodeid, index)
            self._pages[key] = data
            self._pages.move_to_end(key)
            pages.add(index)
            index += 1
        else:
            # One copy per page, straight out of the reply (bytes are immutable, so a
            # page cannot share the reply's buffer without keeping all of it alive).
            with memoryview(data) as view:
                for start in range(0, max(len(data), 1), PAGE_SIZE):
                    page = bytes(view[start: start + PAGE_SIZE])
                    key = (nodeid, index)
                    self._pages[key] = page
                    self._pages.move_to_end(key)
                    pages.add(index)
                    index += 1
        if len(data) < requested and len(data) % PAGE_SIZE == 0 and data:
            self._pages[(nodeid, index)] = b""  # end of file at a page boundary
            pages.add(index)
        while len(self._pages) > self.capacity_pages:
            (old_node, old_index), _ = self._pages.popitem(last=False)
            self._pages_of.get(old_node, set()).discard(old_index)
            self.stats.evictions += 1

    def drop_pages(self, nodeid: int) -> None:
        for index in self._pages_of.pop(nodeid, ()):
            self._pages.pop((nodeid, index), None)
        self._page_version.pop(nodeid, None)

    def drop_page_span(self, nodeid: int, first: int, end: int) -> None:
        """Drop the cached pages [first, end) of `nodeid` (end END_PAGE: to the end)."""
        pages = self._pages_of.get(nodeid)
        if not pages:
            return
        for index in [i for i in pages if first <= i < end]:
            pages.discard(index)
            self._pages.pop((nodeid, index), None)
        self._page_version.pop(nodeid, None)

    @property
    def cached_bytes(self) -> int:
        return sum(len(p) for p in self._pages.values())

    # --- attributes and entries ------------------------------------------------------

    def store_attr(self, nodeid: int, attr: Attr) -> None:
        self._attrs[nodeid] = (attr, self.clock() + self.ttl_s)

    def cached_attr(self, nodeid: int) -> Attr | None:
        entry = self._attrs.get(nodeid)
        return entry[0] if entry else None

    def entry_epoch(self, parent: int) -> int:
        """Take this before sending a LOOKUP in `parent`; pass it to `store_entry`."""
        return self._entry_epoch.get(parent, 0)

    def store_entry(self, parent: int, name: bytes, nodeid: int, epoch: int | None = None) -> bool:
        """Cache `name` -> `nodeid` in `parent`, unless a name of `parent` was
        invalidated since `epoch` was taken: the reply may then predate the
        change (it raced with the invalidation).  True if cached."""
        if epoch is not None and epoch != self._entry_epoch.get(parent, 0):
            self.stats.stale_grants_dropped += 1
            return False
        self._entries[(parent, name)] = (nodeid, self.clock() + self.ttl_s)
        return True

    def lookup_entry(self, parent: int, name: bytes) -> int | None:
        entry = self._entries.get((parent, name))
        if entry is None:
            return None
        match self.policy:
            case Policy.NEVER:
                return None
            case Policy.TTL:
                return entry[0] if self.clock() < entry[1] else None
            case Policy.ALWAYS:
                return entry[0]
        # Entries live under the lease of their directory.
        return entry[0] if self._leased(parent) else None

    def revalidate_at_open(self, nodeid: int, attr: Attr) -> None:
        """ttl: keep the pages only if mtime and size are what they were."""
        version = (attr.mtime_ns, attr.size)
        if self._page_version.get(nodeid) != version:
            self.drop_pages(nodeid)
            self._page_version[nodeid] = version

    # --- invalidation ------------------------------------------------------------------

    def invalidate_inode(self, nodeid: int, generation: int, offset: int = 0,
                         length: int = 0) -> None:
        """Forget what an INVALIDATE(offset, length) covers of `nodeid`; later
        grants older than `generation` of what it covered are stale.

        offset 0 and length <= 0: everything, the lease too.  offset < 0: the
        attributes only.  Otherwise the attributes and the pages holding
        [offset, offset+length) (length <= 0: to the end): the lease stays,
        with the other pages (range granularity), as a FUSE mount's kernel
        keeps them on FUSE_NOTIFY_INVAL_INODE."""
        self._attrs.pop(nodeid, None)
        if offset < 0:
            self._saw_invalidation(nodeid, -1, 0, generation)
            return
        if offset == 0 and length <= 0:
            self._saw_invalidation(nodeid, -1, END_PAGE, generation)
            self._leases.discard(nodeid)
            self.drop_pages(nodeid)
            return
        first = offset // PAGE_SIZE
        end = END_PAGE if length <= 0 else -(-(offset + length) // PAGE_SIZE)
        self._saw_invalidation(nodeid, first, end, generation)
        self.drop_page_span(nodeid, first, end)

    def own_modification_done(self, nodeid: int, generation: int, span: tuple[int, int]) -> None:
        """The reply to this guest's own modification of `nodeid` carried
        `generation`: drop what `span` (its `own_write_span`) covers, and
        refuse every grant older than it, of any page.  The host may have
        counted more as changed than this guest could tell (a write past an
        end of file it had not cached), and a READ of those pages it sent
        before the write may still be on its way; the host does not recall
        the writer."""
        self.invalidate_inode(nodeid, generation, *span)
        self._saw_invalidation(nodeid, -1, END_PAGE, generation)

    def own_write_span(self, nodeid: int, offset: int, length: int) -> tuple[int, int]:
        """What this guest's own write of `length` bytes at `offset` makes
        stale in its cache, as an INVALIDATE's (offset, length): everything
        under inode granularity; under range, the pages written and, if the
        write reaches the cached end of the file (its short last page or
        end marker), everything from there on."""
        if self.granularity is not Granularity.RANGE:
            return 0, 0
        first = offset // PAGE_SIZE
        end = -(-(offset + max(length, 1)) // PAGE_SIZE)
        short = [i for i in self._pages_of.get(nodeid, ())
                 if len(self._pages.get((nodeid, i), b"x" * PAGE_SIZE)) < PAGE_SIZE]
        eof = min(short, default=None)
        if eof is not None and eof < end:
            first = min(first, eof)
            return first * PAGE_SIZE, 0  # the size changes: to the end
        return first * PAGE_SIZE, (end - first) * PAGE_SIZE

    def invalidate_entry(self, parent: int, name: bytes, generation: int = 0) -> None:
        """A name in `parent` changed (or is about to, by this guest): forget it,
        refuse LOOKUP replies already on their way, and forget the directory's
        own attributes (its mtime, ctime and link count change with its names);
        a grant on `parent` older than `generation` raced with this and is dropped."""
        if generation > self._seen_generation.get(parent, 0):
            self._seen_generation[parent] = generation
        self._entries.pop((parent, name), None)
        self._entry_epoch[parent] = self._entry_epoch.get(parent, 0) + 1
        self._attrs.pop(parent, None)

    @contextmanager
    def own_modification(self, nodeid: int):
        """`with cache.own_modification(nodeid):` around this guest's own
        modification of `nodeid`, from before its request is sent until its
        reply's trailer is applied.  No grant on `nodeid` is taken meanwhile:
        one the host issued just before the modification's recall began (a
        READ of another thread of this guest) may arrive first, and the host,
        which does not recall the writer, no longer counts this guest as a
        holder, so nothing would recall that copy once the modification (or
        any later one) landed (found by cleanlease dst)."""
        self._modifying[nodeid] = self._modifying.get(nodeid, 0) + 1
        try:
            yield
        finally:
            count = self._modifying.pop(nodeid) - 1
            if count:
                self._modifying[nodeid] = count

    def forget_own_copy(self, nodeid: int, span: tuple[int, int] = (0, 0)) -> None:
        """This guest is about to modify `nodeid`: its cache of it (of `span`,
        an `own_write_span`) is no longer current."""
        offset, length = span
        if offset == 0 and length <= 0:
            self._leases.discard(nodeid)
            self.drop_pages(nodeid)
            self._attrs.pop(nodeid, None)
            return
        self._attrs.pop(nodeid, None)
        self.drop_page_span(nodeid, offset // PAGE_SIZE,
                            END_PAGE if length <= 0 else -(-(offset + length) // PAGE_SIZE))

    def new_host(self) -> None:
        """The host restarted (a new boot id): its generations start again, so
        those seen from the old one mean nothing.  Call after `clear`."""
        self._seen_generation.clear()
        self._seen_spans.clear()
        self._entry_epoch.clear()

    def clear(self) -> None:
        """Drop every cache (the host restarted, or this guest was fenced)."""
        self._pages.clear()
        self._pages_of.clear()
        self._attrs.clear()
        self._entries.clear()
        self._leases.clear()
        self._page_version.clear()
        self.renewed_until = 0.0
