"""How long the leases of the previous daemon on this export may still be live.

A daemon that dies (SIGKILL, a crash) leaves its guests' leases behind: a
mount's kernel keeps its pages until its term runs out, whatever became of
the daemon.  A new daemon on the same export must therefore let no
modification land until every lease its predecessor could have granted has
surely run out.  It learns how long that is from a small marker file per
export, in a runtime directory:

* while a daemon runs, the marker says "running, term T ms": if it is found
  so at start, the predecessor died uncleanly at some unknown instant, and
  the new daemon waits one whole term (with the clock margin) from its own
  start;
* a daemon that closes cleanly writes "until U" (CLOCK_BOOTTIME ns): the end
  of the last term it may have granted; the next one waits until then.

No marker: nothing to wait for.  The clock is CLOCK_BOOTTIME, which every
process on the machine shares and which counts a suspend.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time

from host.leases import term_end

__all__ = ["BootMarker"]


def _now() -> float:
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def _runtime_dir() -> str:
    for candidate in (os.environ.get("XDG_RUNTIME_DIR"), "/run"):
        if candidate and os.access(candidate, os.W_OK):
            return candidate
    return tempfile.gettempdir()


class BootMarker:
    """The marker of one export; `path` may be given (tests), else derived."""

    def __init__(self, export: str, term_ms: int, path: str | None = None, *, clock=None):
        """`clock` (CLOCK_BOOTTIME seconds by default) is given by the simulator."""
        self._now = clock or _now
        digest = hashlib.sha256(os.fsencode(os.path.realpath(export))).hexdigest()[:16]
        self.path = path or os.path.join(_runtime_dir(), f"cleanlease-{digest}.boot")
        self.term_s = term_ms / 1000.0

    def start(self) -> float:
        """Read what the predecessor left, mark this daemon as running, and
        return how many seconds from now no modification may land (0: none)."""
        grace = 0.0
        try:
            with open(self.path) as f:
                words = f.read().split()
        except FileNotFoundError:
            words = []
        except OSError:
            words = ["running", str(int(self.term_s * 1000))]  # unreadable: assume the worst
        if words[:1] == ["running"]:
            old_term = int(words[1]) / 1000.0 if len(words) > 1 and words[1].isdigit() else 0.0
            grace = term_end(0.0, max(old_term, self.term_s))
        elif words[:1] == ["until"] and len(words) > 1:
            try:
                grace = max(0.0, int(words[1]) / 1e9 - self._now())
            except ValueError:
                grace = term_end(0.0, self.term_s)
        self._write(f"running {int(self.term_s * 1000)}\n")
        return grace

    def closed(self, leases_may_live: bool) -> None:
        """A clean close: say until when the leases this daemon granted may live."""
        if not leases_may_live:
            try:
                os.unlink(self.path)
            except OSError:
                pass
            return
        self._write(f"until {int((self._now() + term_end(0.0, self.term_s)) * 1e9)}\n")

    def _write(self, text: str) -> None:
        tmp = f"{self.path}.{os.getpid()}"
        try:
            with open(tmp, "w") as f:
                f.write(text)
            os.replace(tmp, self.path)
        except OSError:
            pass  # no runtime directory we may write: nothing is remembered
