"""What one mount keeps about the kernel's copies: the client, counters,
the per-inode record, and the exceptions its handlers raise."""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass, field

from guest.client import GuestClient
from protocol import wire

PAGE = 4096
NOTIFIER_THREADS = 4
# What the kernel may ask for in one READ/WRITE: bounded by the frame size.
MAX_PAGES_LIMIT = 256
# The watchdog fires this much before the term's end (the smaller of the two),
# so that its purge is over before the host's clock margin runs out too
# (host/leases.py, term_end: at least 50 ms and 1% of the term after it).
WATCHDOG_GUARD_S = 0.1
WATCHDOG_GUARD_SHARE = 0.1
TERM_PUBLISH_S = 0.02  # how often the term's end is published to the watchdog


class MountClient(GuestClient):
    """The client of a mount.  Its `on_invalidate` returns a future, so that the
    ACK waits until the kernel has dropped its copy (R2), without blocking the
    thread that must answer the READs the kernel may be waiting on (R1).

    Node ids belong to one session, and the kernel keeps using the ones it
    has, so a mount cannot carry over to a new session: connect with
    reconnect=False and unmount when the session ends.

    The kernel's page cache takes every READ reply, leased or not (R4 drops
    an unleased one again, but not at once): so it tells the host so
    (FEATURE_CACHES_UNLEASED), and the host recalls it before the next
    modification of an inode it read without a lease.
    """

    # A mount's watchdog witnesses it (guest/witness.py).
    extra_features = wire.FEATURE_CACHES_UNLEASED | wire.FEATURE_WITNESS


@dataclass
class MountStats:
    """Counters of one mounted guest (written as JSON to --stats)."""

    requests: int = 0  # kernel requests read from /dev/fuse
    host_requests: int = 0  # FS requests sent to the host (FORGETs apart)
    read_requests: int = 0  # READs received (counted on arrival; kernel_reads once answered)
    kernel_reads: int = 0  # READ requests: every one is a kernel page-cache miss or a direct read
    kernel_read_bytes: int = 0
    cached_reads: int = 0  # READs on KEEP_CACHE handles (page-cache misses)
    cached_read_bytes: int = 0
    direct_reads: int = 0  # READs on DIRECT_IO handles (no page cache)
    direct_read_bytes: int = 0
    kernel_writes: int = 0
    kernel_write_bytes: int = 0
    opens_cached: int = 0
    opens_direct: int = 0
    lookups: int = 0
    getattrs: int = 0
    invalidations: int = 0  # INVALIDATE from the host
    inval_entries: int = 0  # INVAL_ENTRY from the host
    notify_inval_inode: int = 0  # FUSE_NOTIFY_INVAL_INODE written
    notify_inval_entry: int = 0
    notify_errors: int = 0  # failed, cancelled, or refused by the kernel
    notify_nothing_cached: int = 0  # answered ENOENT: the kernel holds no such inode or name
    notify_max_ns: int = 0  # longest a notification write took
    acks_held: int = 0  # invalidations whose ACK waits for the kernel's answer
    acks_withheld: int = 0  # ... and got none: the notification failed or was cancelled
    unleased_cached_replies: int = 0  # READ replies on KEEP_CACHE handles without a grant
    purges: int = 0  # page drops the guest started itself (R4, R5)
    writebacks: int = 0  # WRITEs of the kernel's dirty pages (FUSE_WRITE_CACHE, R7)
    size_repairs: int = 0  # FUSE_NOTIFY_STOREs that grew the kernel's i_size ("The size a read sees")
    enosys: dict[str, int] = field(default_factory=dict)
    errors: int = 0

    def as_dict(self) -> dict:
        # Not dataclasses' asdict (a deep copy, field by field): this runs every
        # 20 ms with --stats (10% of a busy guest's samples, docs/performance.md).
        d = dict(self.__dict__)
        d["enosys"] = dict(self.enosys)
        return d


def hit_rate(app_read_bytes: int, stats: dict | MountStats) -> float:
    """Hit rate of a mounted guest: the share of what the application read that
    the kernel did not have to fetch from the guest (pages, not calls)."""
    if isinstance(stats, MountStats):
        stats = stats.as_dict()
    if app_read_bytes <= 0:
        return 0.0
    fetched = stats["kernel_read_bytes"]
    return max(0.0, 1.0 - fetched / app_read_bytes)


class _Inode:
    """What the guest knows about the kernel's copy of one inode."""

    __slots__ = ("reads", "tainted", "taint_seq", "fill_seq", "may_have_pages",
                 "purge_scheduled")

    def __init__(self):
        self.reads: set[asyncio.Future] = set()  # READs not yet answered to the kernel
        self.tainted = False  # unleased data may be in the page cache
        self.taint_seq = 0
        self.fill_seq = 0
        self.may_have_pages = False
        self.purge_scheduled = False


class NotificationFailed(Exception):
    """A notification did not reach the kernel, or the kernel refused it."""

    def __init__(self, err: int):
        super().__init__(f"notification failed: {os.strerror(err)}")
        self.errno = err


class _Reply(Exception):
    """Raised by a handler to answer with an errno."""

    def __init__(self, err: int):
        self.err = err


