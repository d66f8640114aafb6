"""A guest that mounts: the real kernel page cache is the guest cache.

`cleanlease guest --connect ADDR --mount MNT` mounts a FUSE file system at
MNT through /dev/fuse and forwards every kernel request, with the same
opcode and node id, to the host daemon through `GuestClient.request`.  The
kernel caches pages, attributes and dentries; this module decides, from the
lease each reply carries, what the kernel may keep, and turns the host's
INVALIDATE / INVAL_ENTRY into FUSE_NOTIFY_INVAL_INODE / _ENTRY before the
ACK goes back.  docs/mount.md gives the design and the proof that no read
returns stale data; the rules, in short:

  R1  Requests are read and answered on the asyncio thread; notifications
      are written on notifier threads, which answer nothing.  A notification
      may sleep on a page locked for a READ we have not answered yet; that
      READ is answered by the asyncio thread meanwhile, so nothing waits on
      itself (KERNEL-NOTES: never invalidate a page whose READ you have not
      answered from the same thread).
  R2  The ACK of an INVALIDATE is written only once the kernel has dropped
      the pages and attributes (the notification write returned).  The
      asyncio thread does not wait for it: the ACK is held back
      (`on_invalidate` returns a future; the client ACKs when it completes
      successfully: never for a notification that failed or was cancelled).
  R3  Lease policies: a file opens with FOPEN_KEEP_CACHE only if its OPEN
      reply carries a grant the guest accepts; otherwise FOPEN_DIRECT_IO.
      Every open for write is DIRECT_IO (the host never grants to it), so no
      request ever holds page locks while it waits on the host.
  R4  Lease policies: attributes are valid in the kernel only under a lease
      (attr_valid = the lease's remaining term, 0 without a grant), and the
      connection runs with FUSE_AUTO_INVAL_DATA, so every read(2) of a
      cached file whose inode is not leased first sends GETATTR.  That
      GETATTR waits for the READs already in flight, drops the pages
      that unleased READ replies put into the page cache ("tainted"), and
      only then answers.  A reply that would make attributes valid drops
      tainted pages first.
  R5  Own modifications (WRITE, SETATTR, CREATE, open for write) drop the
      kernel's cached pages of the inode before the reply goes back.
  R6  The kernel drops a GETATTR reply if the inode's attr_version moved
      while it waited (any INVAL_INODE, or another reply taken first), and a
      read then stops at the old i_size.  So before answering a read's
      GETATTR (one with a file handle) whose size is above every size the
      kernel may hold, the guest grows i_size with FUSE_NOTIFY_STORE of the
      file's last byte (`_repair_size`; docs/mount.md, "The size a read sees").

The package, by idea: `state` (the client, counters, per-inode record),
`core` (`GuestMount`: lifecycle, watchdog, reading and dispatching requests),
`coherence` (notifications, purges, lease rules: R1-R5), `size` (R6),
`dispatch` (the opcode tables), `local` (requests answered here), `names`,
`files`, `data` (requests forwarded to the host, by family), `run` (the
command-line entry points and a throughput measurement).
"""

from guest.mount.core import GuestMount
from guest.mount.run import cached_read_throughput, open_mount, run_mount
from guest.mount.state import (
    NOTIFIER_THREADS,
    MountClient,
    MountStats,
    NotificationFailed,
    hit_rate,
)

__all__ = [
    "NOTIFIER_THREADS",
    "GuestMount",
    "MountClient",
    "MountStats",
    "NotificationFailed",
    "cached_read_throughput",
    "hit_rate",
    "open_mount",
    "run_mount",
]
