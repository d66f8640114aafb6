"""What every simulated schedule must satisfy, checked once it is over.

* No stale read, and no read that cannot be right (corrupt, phantom,
  future): the existing checker (workload/checker.py) on every block every
  guest read.
* No lost write: every block read from the export at the end, after every
  guest closed, is held to the same rule (actor "final"): a completed write
  that is neither there nor overwritten was lost.
* No recall longer than ack timeout + term + margin (invariant 3,
  host/leases.py `stall_bound_s`), on the host's own (virtual) clock.
* Every recall finishes: no inode is left RECALLING and no writer waits
  for a recall; every guest operation of the budget ended.
* No lease state left once every session ended and its term ran out: no
  session, no departed holder, no holder, tainted guest or writer count
  on any inode.
* Nothing the daemon or a guest logged as a bug (an exception in a handler),
  and no exception an asyncio callback let escape.
"""

from __future__ import annotations

from host.leases import InodeState, stall_bound_s
from workload.checker import check

# A recall is measured between two of the daemon's steps: allow what the
# simulated scheduling adds (callbacks in between, within one virtual ms).
_STALL_SLACK_S = 0.005


class Violation(Exception):
    """A broken invariant: `kind` names it, the message says what was seen."""

    def __init__(self, kind: str, detail: str, *, file: int | None = None,
                 at_ms: float | None = None):
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail
        self.file = file  # the file it concerns, if one: the trace shows its events
        self.at_ms = at_ms  # when it was seen (virtual ms): the trace ends there


def check_world(world) -> Violation | None:
    """The first broken invariant of a finished `world`, or None."""
    if world.errors:
        return Violation("bug", world.errors[0])
    result = check(world.actors.records)
    if not result.ok:
        if result.examples:
            ex = result.examples[0]
            r = ex.read
            kind = "lost write" if r.actor == "final" else "stale read"
            ov = ex.overwrite
            version = f"v{r.writer}.{r.seq}"
            return Violation(kind, (
                f"{r.actor} read f{r.file_id} block {r.block} = {version} at "
                f"{r.start_ns / 1e6:.3f} ms ({'cache hit' if r.hit else 'from the host'}), but "
                f"v{ov.writer}.{ov.seq} by {ov.actor} had replaced it at {ov.end_ns / 1e6:.3f} ms"),
                file=r.file_id, at_ms=r.end_ns / 1e6)
        return Violation("bad read", f"corrupt {dict(result.corrupt)}, phantom {result.phantom}, "
                                     f"future {result.future}")
    bound = stall_bound_s(world.p.ack_timeout_ms / 1000, world.p.term_ms / 1000) + _STALL_SLACK_S
    for host in world.hosts:
        waited = host.daemon.stats.recall_wait_max_ns / 1e9
        if waited > bound:
            return Violation("stall", f"{host.node.name}: a recall took {waited * 1000:.1f} ms, "
                                      f"over the bound of {bound * 1000:.1f} ms")
    return check_lease_state(world.host)


def check_lease_state(host) -> Violation | None:
    """Nothing leased, recalling or waiting on the live daemon once every session is over."""
    daemon = host.daemon
    if daemon.sessions:
        return Violation("leftover", f"sessions still open: {sorted(daemon.sessions)}")
    if daemon.recaller.departed:
        return Violation("leftover", f"departed holders never forgotten: "
                                     f"{sorted(daemon.recaller.departed)}")
    if daemon._recall_over:
        return Violation("recall", f"recalls never finished on nodes {sorted(daemon._recall_over)}")
    for ino, leases in sorted(daemon.leases._inodes.items()):
        if leases.state is InodeState.RECALLING:
            return Violation("recall", f"node {ino} left RECALLING")
        if leases.holders or leases.tainted or any(leases.writers.values()):
            return Violation("leftover", f"node {ino}: holders {sorted(leases.holders)}, tainted "
                                         f"{sorted(leases.tainted)}, writers {leases.writers}")
        if leases.names_changing:
            return Violation("leftover", f"directory {ino}: a namespace change never landed")
    return None
