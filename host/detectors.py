"""How the daemon learns of modifications that do not come through it.

A detector watches the export for host-local writers (an editor, `git
checkout`, `dd`) and drives the same lease transitions as a guest's WRITE.
`NullDetector` sees nothing: only guests write.  The inotify detector reports
after the fact; the fanotify detector holds the writer until guests have
dropped their copies.  The daemon calls `arm(nodeid)` before it leases a clean
inode and `disarm(nodeid)` once the inode is dirty, so that a detector that
costs something per event only pays while guests hold leases.
"""

from __future__ import annotations

from protocol.messages import Detector as DetectorKind


class Detector:
    """The interface every detector implements."""

    kind: DetectorKind = DetectorKind.NONE
    needs_arming: bool = False  # True: an inode may be leased only once arm() succeeded

    def __init__(self) -> None:
        self.events = 0

    async def start(self, daemon) -> None:
        """Begin watching; `daemon` is the HostDaemon whose leases to drive."""

    async def stop(self) -> None:
        """Stop watching; every event still pending must be answered first."""

    def watch(self, nodeid: int, is_dir: bool) -> None:
        """A guest was granted a lease on `nodeid`: changes to it must be reported."""

    def arm(self, nodeid: int) -> None:
        """Report the next modification of `nodeid` (before it lands, if possible)."""

    def disarm(self, nodeid: int) -> None:
        """Modifications of `nodeid` need not be reported until the next arm()."""


class NullDetector(Detector):
    """Guests are the only writers."""


def make_detector(name: str, export: str) -> tuple[Detector, str]:
    """The detector called `name` for `export`, and a sentence saying what was chosen and why.

    `auto` picks the best one this machine supports.  Raises ValueError for an
    unknown name or for one this machine cannot run (saying what is missing).
    """
    if name == "none":
        return NullDetector(), "detector none: only writes through the daemon are seen"
    if name in ("inotify", "auto"):
        from host.inotify_detector import InotifyDetector

        return InotifyDetector(), ("detector inotify: host-local writes are seen after they "
                                   "land (a short stale window remains)")
    raise ValueError(f"detector {name!r} is not available; choose none, inotify or auto")
