"""How the daemon learns of modifications that do not come through it.

A detector watches the export for host-local writers (an editor, `git
checkout`, `dd`) and drives the same lease transitions as a guest's WRITE.

| name | class | sees a host-local write | policy |
|---|---|---|---|
| none | `NullDetector` | never: only guests write | any |
| inotify | `host.inotify_detector.InotifyDetector` | after it landed | any |
| fanotify | `host.fanotify_detector.FanotifyDetector` | before it lands (pre-content permission event) | clean-lease |
| kernel-lease | `host.open_lease_detector.KernelLeaseDetector` | at the open for write, before the open returns (F_SETLEASE) | open-lease (refused under clean-lease) |

`auto` picks the best this machine supports for the policy and says why.
`fanotify` under open-lease means kernel leases: open-lease breaks on
open-for-write, which is what a kernel read lease reports.

The daemon calls `arm(nodeid)` before it leases an inode (for a fresh inode
on the first read that would be granted, for a dirty one when it is flushed)
and `disarm(nodeid)` once the inode is dirty, so that a detector that costs
something per event only pays while guests hold leases.
"""

from __future__ import annotations

import os

from protocol.messages import Detector as DetectorKind
from protocol.messages import Policy


class Detector:
    """The interface every detector implements."""

    kind: DetectorKind = DetectorKind.NONE
    needs_arming: bool = False  # True: an inode may be leased only once arm() succeeded

    def __init__(self) -> None:
        self.events = 0

    @property
    def label(self) -> str:
        """The name printed in READY and in the stats (`kind` is what HELLO carries)."""
        return self.kind.label

    async def start(self, daemon) -> None:
        """Begin watching; `daemon` is the HostDaemon whose leases to drive."""

    async def stop(self) -> None:
        """Stop watching; every event still pending must be answered first."""

    def watch(self, nodeid: int, is_dir: bool) -> None:
        """A guest was granted a lease on `nodeid`: changes to it must be reported."""

    def arm(self, nodeid: int) -> bool:
        """Report the next modification of `nodeid` (before it lands, if possible).

        Returns False when `nodeid` must not be leased yet although the call
        succeeded: the detector could not arm it (a kernel lease is refused
        while the file is open for write), or knows of a host-local
        modification still in flight (a write it let through that may not
        have landed, a writable shared mapping).  The daemon checks that the
        file is clean only after this returned True (invariant 4).
        """
        return True

    def disarm(self, nodeid: int) -> None:
        """Modifications of `nodeid` need not be reported until the next arm()."""

    def forget(self, nodeid: int) -> None:
        """No guest references `nodeid` any more and the lease table has let go of
        it: drop what is kept for it (a watch).  It will not be leased again;
        the same file looked up later gets a new node id."""

    def may_have_missed_writes(self, nodeid: int) -> bool:
        """Asked before the first arm() of an inode: could it have been modified
        unseen until now?  If so the daemon checks it is clean after arming."""
        return True

    def stats(self) -> dict:
        """Counters for the host's --stats file."""
        return {"events": self.events}


class NullDetector(Detector):
    """Guests are the only writers."""


def _inotify() -> tuple[Detector, str]:
    from host.inotify_detector import InotifyDetector

    return InotifyDetector(), "host-local writes are seen after they land (a short stale window remains)"


def make_detector(name: str, export: str, policy: Policy = Policy.CLEAN_LEASE) -> tuple[Detector, str]:
    """The detector called `name` for `export` under `policy`, and a sentence saying
    what was chosen and why.

    `auto` picks the best one this machine supports: fanotify pre-content
    events for clean-lease, kernel read leases for open-lease, else inotify
    (the sentence then says what is missing).  Raises ValueError for an
    unknown name or for one this machine cannot run (saying what is missing).
    """
    export = os.path.realpath(export)
    if name == "none":
        return NullDetector(), "detector none: only writes through the daemon are seen"
    if name == "inotify":
        detector, what = _inotify()
        return detector, f"detector inotify: {what}"
    if name not in ("auto", "fanotify", "kernel-lease"):
        raise ValueError(f"detector {name!r} is not known; choose auto, none, inotify, fanotify "
                         f"or kernel-lease")
    if name == "auto" and policy not in (Policy.CLEAN_LEASE, Policy.OPEN_LEASE):
        detector, what = _inotify()
        return detector, f"detector auto: inotify, since {policy.label} grants no leases; {what}"
    if name == "kernel-lease" and policy is Policy.CLEAN_LEASE:
        raise ValueError("detector kernel-lease reports opens for write (open-lease); clean-lease "
                         "recalls on the first write: use fanotify or inotify")
    if name == "kernel-lease" or (policy is Policy.OPEN_LEASE and name in ("auto", "fanotify")):
        from host.open_lease_detector import KernelLeaseDetector

        ok, why = KernelLeaseDetector.usable(export)
        if ok:
            return KernelLeaseDetector(), (
                f"detector kernel-lease (asked: {name}): a kernel read lease on every leased file; "
                "an open for write anywhere on the host waits until the guests' copies are "
                "recalled; namespace changes are seen after the fact (inotify)")
        if name != "auto":
            raise ValueError(f"detector {name} under {policy.label} needs kernel read leases, "
                             f"which are not available here: {why}")
        detector, what = _inotify()
        return detector, f"detector auto: inotify, because kernel read leases are not available ({why}); {what}"
    from host.fanotify_detector import FanotifyDetector

    ok, why = FanotifyDetector.usable(export)
    if ok:
        return FanotifyDetector(), (
            f"detector fanotify (asked: {name}): pre-content events on a private bind mount of "
            f"{export} hold every host-local write until the guests' copies are recalled; "
            "namespace changes are seen after the fact (inotify)")
    if name != "auto":
        raise ValueError(f"detector fanotify is not available for {export}: {why}")
    detector, what = _inotify()
    return detector, f"detector auto: inotify, because fanotify pre-content events are not available ({why}); {what}"
