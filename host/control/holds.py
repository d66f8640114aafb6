"""Per-file holds: freeze (every modification waits) and seal (layout changes wait).

One gate for both kinds of writer.  A guest modification passes it in
`HostDaemon.modification` (`FileHolds.gate`, an async context manager: the
modification counts as in flight until its body exits); a host-local write
held in its fanotify pre-content event passes it before the event is
answered (`FileHolds.admit`, with a `landed` callable the releaser awaits).

Promises:

* `hold()` returns once no modification that was in flight when it was
  called is any more: each of `drains` has returned (the daemon's: every
  guest modification past the gate has landed; the detector's: every host
  thread it let write the file is out of its system call).  From then until `release()` nothing that
  must wait lands.
* Waiters are let go in arrival order, one at a time: each is let go only
  once the one before it has landed (or `LANDING_TIMEOUT_S` passed), so
  writes that overlap land in the order they arrived.  A modification that
  arrives while others wait queues behind them (it does not overtake).
* Reads never pass the gate: they never wait.
* A hold is owned (`owner`: a control connection); `release_owner()` lifts
  all of an owner's holds (its connection closed); `max_hold_s` lifts a hold
  by itself.  If the daemon dies the fanotify group closes and the kernel
  lets every held host-local writer go.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Awaitable, Callable

from host.control.journal import EVERYTHING

log = logging.getLogger("cleanlease.control")

LANDING_TIMEOUT_S = 5.0  # a released writer that does not land by then no longer holds the next


class HoldKind(enum.Enum):
    FREEZE = "freeze"
    SEAL = "seal"


@dataclass(frozen=True)
class Change:
    """What a modification is about to do: bytes [start, end) (EVERYTHING: to
    the end of the file, whatever it is; start == end: no data, e.g. chmod),
    and whether it may change the file's size or extent map (`layout`)."""

    start: int
    end: int
    layout: bool

    @property
    def data(self) -> bool:
        return self.end > self.start


UNKNOWN_CHANGE = Change(0, EVERYTHING, True)  # the safe side: anything at all
METADATA_CHANGE = Change(0, 0, False)  # mode, owner, times, xattrs: no bytes, no layout


@dataclass
class _Waiter:
    change: Change
    go: asyncio.Future  # set when it may go
    landed: Callable[[], Awaitable[None]] | None = None  # awaited before the next goes
    arrived_ns: int = field(default_factory=time.monotonic_ns)


@dataclass
class _FileHold:
    holds: dict[tuple[HoldKind, object], asyncio.TimerHandle | None] = field(default_factory=dict)
    waiting: collections.deque = field(default_factory=collections.deque)
    releasing: asyncio.Task | None = None

    def count(self, kind: HoldKind) -> int:
        return sum(1 for k, _ in self.holds if k is kind)

    def must_wait(self, change: Change) -> bool:
        if self.count(HoldKind.FREEZE):
            return True
        if change.layout and self.count(HoldKind.SEAL):
            return True
        if self.waiting or self.releasing is not None:
            # Do not overtake those waiting or still being let go, except that
            # under a seal an overwrite goes on past the layout changes it holds.
            return not (not change.layout and self.count(HoldKind.SEAL)
                        and all(w.change.layout for w in self.waiting))
        return False


class FileHolds:
    """The holds of every file, by key `(st_dev, st_ino)`."""

    def __init__(self) -> None:
        self._files: dict[tuple[int, int], _FileHold] = {}
        # Each returns, once every modification of the key in flight when it
        # was called has landed, how many it waited for: the daemon's (guest
        # modifications) and the detector's (host threads it let write).
        self.drains: list[Callable[[tuple[int, int]], Awaitable[int]]] = []
        self.released = 0
        self.held_total = 0

    def __bool__(self) -> bool:
        return bool(self._files)

    def __contains__(self, key) -> bool:
        return key in self._files

    def _file(self, key) -> _FileHold:
        f = self._files.get(key)
        if f is None:
            f = self._files[key] = _FileHold()
        return f

    def _maybe_drop(self, key) -> None:
        f = self._files.get(key)
        if f and not f.holds and not f.waiting and f.releasing is None:
            del self._files[key]

    # --- the writers' side -----------------------------------------------------

    def must_wait(self, key, change: Change) -> bool:
        f = self._files.get(key)
        return f is not None and f.must_wait(change)

    async def admit(self, key, change: Change,
                    landed: Callable[[], Awaitable[None]] | None = None) -> bool:
        """Return once a modification `change` of `key` may go; True if it
        waited.  `landed()`, if given, returns once it has landed: the next
        waiter is let go only then."""
        f = self._files.get(key)
        if f is None or not f.must_wait(change):
            return False
        waiter = _Waiter(change, asyncio.get_running_loop().create_future(), landed)
        f.waiting.append(waiter)
        self.held_total += 1
        try:
            await asyncio.shield(waiter.go)
        except asyncio.CancelledError:
            if waiter in f.waiting:
                f.waiting.remove(waiter)
                self._kick(key)
            raise
        return True

    @asynccontextmanager
    async def gate(self, key, change: Change):
        """`async with holds.gate(key, change):` a guest modification: waits
        while it must; the body is what the next waiter, if any, waits for.
        Returns into the body in the step `admit` returned in (no await in
        between), so a caller that enters its "in flight" state first thing
        in the body is seen by every later `hold()`'s drain."""
        landed = asyncio.get_running_loop().create_future()

        async def wait_landed() -> None:
            await asyncio.shield(landed)

        try:
            await self.admit(key, change, wait_landed)
            yield
        finally:
            if not landed.done():
                landed.set_result(None)

    # --- the administrator's side -------------------------------------------------

    async def hold(self, key, kind: HoldKind, owner: object, *, max_hold_s: float = 0.0,
                   on_expiry: Callable[[], None] | None = None) -> tuple[int, int]:
        """Hold `key` for `owner`; return (ns spent draining, writers drained)
        once nothing that must wait is in flight.  Raises ValueError if
        `owner` holds `key` this way already."""
        f = self._file(key)
        if (kind, owner) in f.holds:
            raise ValueError(f"already {kind.value}d by this client")
        timer = None
        if max_hold_s > 0:
            timer = asyncio.get_running_loop().call_later(
                max_hold_s, self._expired, key, kind, owner, on_expiry)
        f.holds[(kind, owner)] = timer
        t0 = time.monotonic_ns()
        drained = 0
        try:
            for drain in list(self.drains):
                drained += await drain(key)
        except BaseException:
            self.release(key, kind, owner)
            raise
        return time.monotonic_ns() - t0, drained

    def _expired(self, key, kind, owner, on_expiry) -> None:
        f = self._files.get(key)
        if f is not None and (kind, owner) in f.holds:
            f.holds[(kind, owner)] = None  # fired: nothing to cancel
            log.info("a %s of %s reached its --max-hold: lifted", kind.value, key)
            self.release(key, kind, owner)
            if on_expiry is not None:
                on_expiry()

    def release(self, key, kind: HoldKind, owner: object | None = None) -> int:
        """Lift `owner`'s hold of `key` (None: every hold of that kind); return
        how many waiters this lets go (they go one by one, in arrival order)."""
        f = self._files.get(key)
        if f is None:
            return 0
        for k in [k for k in f.holds if k[0] is kind and (owner is None or k[1] == owner)]:
            timer = f.holds.pop(k)
            if timer is not None:
                timer.cancel()
        n = sum(1 for w in f.waiting if not self._held_for(f, w.change))
        self._kick(key)
        self._maybe_drop(key)
        return n

    def release_owner(self, owner: object) -> int:
        """Lift every hold `owner` has (its connection went away)."""
        n = 0
        for key in list(self._files):
            for kind in HoldKind:
                if (kind, owner) in self._files.get(key, _FileHold()).holds:
                    n += self.release(key, kind, owner)
        return n

    def holders(self, key) -> list[tuple[HoldKind, object]]:
        f = self._files.get(key)
        return list(f.holds) if f else []

    def status(self, key) -> tuple[int, int, int]:
        """(freezes, seals, modifications waiting) of `key`."""
        f = self._files.get(key)
        if f is None:
            return 0, 0, 0
        return f.count(HoldKind.FREEZE), f.count(HoldKind.SEAL), len(f.waiting)

    def _kick(self, key) -> None:
        f = self._files.get(key)
        if f is None or f.releasing is not None or not f.waiting:
            return
        f.releasing = asyncio.ensure_future(self._release_in_order(key, f))

    async def _release_in_order(self, key, f: _FileHold) -> None:
        try:
            while f.waiting:
                head = f.waiting[0]
                if self._held_for(f, head.change):
                    # Still held for it: an overwrite behind it may go under a seal.
                    if not any(not self._held_for(f, w.change) for w in f.waiting):
                        return
                    head = next(w for w in f.waiting if not self._held_for(f, w.change))
                f.waiting.remove(head)
                self.released += 1
                if not head.go.done():
                    head.go.set_result(None)
                if head.landed is not None:
                    try:
                        await asyncio.wait_for(head.landed(), LANDING_TIMEOUT_S)
                    except asyncio.TimeoutError:
                        log.warning("a released writer of %s did not land within %.0f s; "
                                    "letting the next go", key, LANDING_TIMEOUT_S)
        finally:
            f.releasing = None
            self._maybe_drop(key)

    @staticmethod
    def _held_for(f: _FileHold, change: Change) -> bool:
        return bool(f.count(HoldKind.FREEZE)) or (change.layout and bool(f.count(HoldKind.SEAL)))
