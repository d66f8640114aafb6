"""The daemon's budgets: what one guest or network peer may take of it.

Each piece here bounds one resource, so that whatever one guest or peer
does, the daemon keeps serving everyone else (docs/reliability.md, "Limits",
has the table of every number):

* `FlowControl`: one session's unsent output (the transport's write buffer
  plus the replies being built) and its requests in flight.  Over either
  bound the session's requests are no longer read; a session whose output
  stays over the bound past `output_timeout_ms` is disconnected.  It also
  gives a started frame (its header read, its payload trickling in) a
  deadline.
* `FdBudget`: how many file descriptors the export may hold (one O_PATH fd
  per node id, one writable fd per written inode, one per open handle), in
  all and per guest, derived from RLIMIT_NOFILE with a reserve for the
  listener, the sockets and the detector, so that those never starve.
* `PeerGate`: handshake slots per peer address and the delay before a
  wrong token is refused, with bounded memory.

None of it knows the lease table: the daemon (host/server.py) asks these
objects and acts on their answer.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

log = logging.getLogger("cleanlease.host")


# --- descriptors -----------------------------------------------------------------------

def raise_nofile_limit() -> tuple[int, int]:
    """Raise RLIMIT_NOFILE's soft limit to its hard limit; return (soft, hard) after.

    Never raises: if the kernel refuses, the soft limit stays as it was."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20  # what Linux allows at most by default (fs.nr_open)
    if soft == resource.RLIM_INFINITY or soft >= hard:
        return min(soft, hard), hard
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    except (OSError, ValueError) as exc:
        log.warning("cannot raise the file descriptor limit from %d to %d: %s", soft, hard, exc)
    return soft, hard


def set_nofile_limit(soft: int) -> int:
    """Set RLIMIT_NOFILE's soft limit to `soft` (at most the hard limit); return it.

    Raises SystemExit with what to do if the kernel refuses."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY:
        soft = min(soft, hard)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    except (OSError, ValueError) as exc:
        raise SystemExit(f"cleanlease host: --fd-limit {soft}: {exc}")
    return soft


# Descriptors the daemon needs besides the export and the guests' sockets: the
# listener, stdio, the event loop's own (epoll, self-pipe, signal fd), the
# detector's groups (fanotify, inotify), the boot marker, the threads of
# asyncio.to_thread, /proc files read per event, and the fds of the
# permission events the detector holds until it answers them
# (`DETECTOR_EVENT_FDS`).
DAEMON_RESERVE = 64
DETECTOR_EVENT_FDS = 128


@dataclass(frozen=True)
class FdBudget:
    """How the descriptor limit is shared out.

    `nodeids` and `handles` bound the export's fds in all (an O_PATH fd per
    node id, and at most one writable fd per node id for the daemon's own
    flushes and one kernel lease fd (open-lease), so 3 x nodeids + handles,
    which `derive` keeps within what is left after the reserve and the
    sockets); `nodeids_per_guest` and
    `handles_per_guest` bound what one guest may take of them.  Past a
    guest's own cap it gets EMFILE; past the daemon's total, ENFILE."""

    limit: int
    reserve: int
    sockets: int
    nodeids: int
    handles: int
    nodeids_per_guest: int
    handles_per_guest: int

    @classmethod
    def derive(cls, limit: int, *, max_sessions: int, max_handshakes: int,
               handles_per_guest: int | None = None,
               nodeids_per_guest: int | None = None) -> "FdBudget":
        """Share out `limit` descriptors.

        Sockets: one per session and per handshake slot, plus as many again
        for connections that are accepted only to be refused at once.  Of
        what is left, 1/4 goes to node ids (each may need 3 fds) and 1/4 to
        handles; one guest may take a quarter of either (and at most
        `handles_per_guest`, if given; `nodeids_per_guest`, if given, instead
        of the quarter, up to all of them: one mount whose kernel keeps a
        node id for every name it has seen, alone on a host, needs more).

        Raises ValueError if `limit` leaves nothing for the export."""
        reserve = DAEMON_RESERVE + DETECTOR_EVENT_FDS
        sockets = 2 * (max_sessions + max_handshakes) + 1
        export = limit - reserve - sockets
        if export < 64:
            raise ValueError(
                f"the file descriptor limit ({limit}) leaves {export} for the export once "
                f"{reserve} are kept for the daemon and {sockets} for sockets; raise the hard "
                f"limit (ulimit -Hn, LimitNOFILE=) or lower --max-sessions")
        nodeids = export // 4
        handles = export // 4
        per_node = max(1, nodeids // 4)
        per_handle = max(1, handles // 4)
        if nodeids_per_guest is not None:  # replaces the quarter, up to the whole pool
            per_node = max(1, min(nodeids, nodeids_per_guest))
        if handles_per_guest is not None:
            per_handle = min(per_handle, handles_per_guest)
        return cls(limit, reserve, sockets, nodeids, handles, per_node, per_handle)

    def describe(self) -> str:
        return (f"fd limit {self.limit}: {self.reserve} kept for the daemon and its detector, "
                f"{self.sockets} for sockets; node ids {self.nodeids} in all, "
                f"{self.nodeids_per_guest} per guest; handles {self.handles} in all, "
                f"{self.handles_per_guest} per guest")


def fds_in_use() -> int:
    """How many descriptors this process has open now (for reports, not for decisions)."""
    import os
    return len(os.listdir("/proc/self/fd")) - 1  # the listing's own


# Frames of one session handled in one turn of the event loop; the rest wait
# for the next turn (the others' frames and the tasks already started go
# first), with that session's reading paused meanwhile.
FRAMES_PER_TURN = 16
SMALL_REPLY = 512  # the room reserved for a reply without data (attributes, an entry)


# --- one session's flow --------------------------------------------------------------

class FlowControl:
    """Bounds one session's output and input, and times out stalled frames.

    Output: the transport's write buffer is bounded by `output_bound` (its
    high-water mark; asyncio calls `pause_writing` above it).  A request
    whose reply carries data waits for room before it is carried out
    (`reply_room`): while over the bound, at most `max_building` such
    replies are built.  While
    over, the session's requests are not read (`pause_reading`); if it
    stays over for `output_timeout` seconds,
    `on_stuck` is called (the daemon disconnects the session).

    Input: the bytes of requests in flight (read, not yet answered) are
    bounded by `input_bound`; over it, reading pauses too, until replies
    bring it back under.

    A frame whose first bytes have arrived must be complete within
    `frame_timeout` seconds of reading (the time reading is paused does not
    count); else `on_slow_frame` is called.
    """

    def __init__(self, transport: asyncio.Transport, *, output_bound: int, input_bound: int,
                 output_timeout: float, frame_timeout: float, small_reply: int = 512,
                 max_building: int = 4,
                 on_stuck: Callable[[], None], on_slow_frame: Callable[[], None]):
        self.transport = transport
        self.output_bound = output_bound
        self.input_bound = input_bound
        self.output_timeout = output_timeout
        self.frame_timeout = frame_timeout
        self._on_stuck = on_stuck
        self._on_slow_frame = on_slow_frame
        self.writing_paused = False
        self.reading_paused = False
        self.held = False  # frames buffered for the next turn
        self.reserved = 0  # bytes of replies with data being built
        self.building = 0  # how many
        self.max_building = max_building
        self.small = small_reply
        self.in_flight = 0  # bytes of requests read and not yet answered
        self.paused_count = 0  # times output went over the bound
        self._room = asyncio.Event()
        self._room.set()
        self._stuck_timer: asyncio.TimerHandle | None = None
        self._frame_timer: asyncio.TimerHandle | None = None
        self._frame_left = frame_timeout  # reading time left for the started frame
        self._frame_since = 0.0
        self._frame_pending = False
        self._closed = False
        try:
            transport.set_write_buffer_limits(high=output_bound, low=output_bound // 4)
        except (AttributeError, NotImplementedError):  # pragma: no cover - all ours have it
            pass

    # asyncio's callbacks, forwarded by the protocol object
    def pause_writing(self) -> None:
        self.writing_paused = True
        self.paused_count += 1
        self._room.clear()
        if self._stuck_timer is None and not self._closed:
            self._stuck_timer = asyncio.get_running_loop().call_later(
                self.output_timeout, self._stuck)
        self._update_reading()

    def resume_writing(self) -> None:
        self.writing_paused = False
        if self._stuck_timer is not None:
            self._stuck_timer.cancel()
            self._stuck_timer = None
        self._update_room()
        self._update_reading()

    # --- output --------------------------------------------------------------------

    def _blocked(self) -> bool:
        """No reply with data may be started now: the write buffer is over its
        bound (asyncio paused us and has not resumed), or `max_building`
        replies with data are under way already."""
        if self._closed:
            return False
        return self.writing_paused or self.building >= self.max_building

    def _update_room(self) -> None:
        if self._blocked():
            self._room.clear()
        else:
            self._room.set()

    async def reply_room(self, size: int) -> int:
        """Wait until a reply of up to `size` bytes may be built; returns the
        bytes it counts for, which `reply_sent` releases.

        A reply with data (over `small` bytes: READ, READDIR) waits while the
        write buffer is over the bound or `max_building` others are under way
        (a READ may wait inside its handler, for a recall): so at most that
        many replies with data are built while the buffer is over the bound.
        A small one (attributes, an entry, a write's count) never waits,
        since it may be the answer a recall or a writer waits for, and at
        most `max_in_flight` of them are outstanding.  Returns at once once
        the session is closed (the reply is then dropped)."""
        if size <= self.small:
            return 0
        while self._blocked():
            self._room.clear()
            await self._room.wait()
        self.building += 1
        self.reserved += size
        return size

    def reply_sent(self, reserved: int) -> None:
        if reserved:
            self.building -= 1
            self.reserved -= reserved
            self._update_room()

    # --- input ---------------------------------------------------------------------

    def request_read(self, size: int) -> None:
        self.in_flight += size
        if self.in_flight > self.input_bound:
            self._update_reading()

    def request_done(self, size: int) -> None:
        self.in_flight -= size
        if self.reading_paused:
            self._update_reading()

    def hold_reading(self, held: bool) -> None:
        """Frames are buffered for the next turn (`FRAMES_PER_TURN`): read no more
        until they are handled."""
        if held != self.held:
            self.held = held
            self._update_reading()

    def _update_reading(self) -> None:
        pause = self.writing_paused or self.in_flight > self.input_bound or self.held
        if self._closed or pause == self.reading_paused or self.transport.is_closing():
            return
        self.reading_paused = pause
        if pause:
            self.transport.pause_reading()
            self._stop_frame_clock()
        else:
            self.transport.resume_reading()
            self._start_frame_clock()

    # --- the started frame's deadline ----------------------------------------------------

    def frame_progress(self, unfinished: int) -> None:
        """After bytes were fed: `unfinished` bytes of an incomplete frame are buffered."""
        self._frame_pending = bool(unfinished)
        if not unfinished:
            self._stop_frame_clock()
            self._frame_left = self.frame_timeout
        elif not self.reading_paused:
            self._start_frame_clock()

    def _start_frame_clock(self) -> None:
        if self._closed or not self._frame_pending or self._frame_timer is not None:
            return
        loop = asyncio.get_running_loop()
        self._frame_since = loop.time()
        self._frame_timer = loop.call_later(max(0.0, self._frame_left), self._slow_frame)

    def _stop_frame_clock(self) -> None:
        if self._frame_timer is not None:
            self._frame_timer.cancel()
            self._frame_timer = None
            self._frame_left -= asyncio.get_running_loop().time() - self._frame_since

    # --- endings -------------------------------------------------------------------------

    def _stuck(self) -> None:
        self._stuck_timer = None
        if not self._closed and self.writing_paused:
            self._on_stuck()

    def _slow_frame(self) -> None:
        self._frame_timer = None
        if not self._closed:
            self._on_slow_frame()

    def close(self) -> None:
        """The session is gone: cancel the timers and wake every waiter."""
        self._closed = True
        self.reading_paused = self.writing_paused = False
        for timer in (self._stuck_timer, self._frame_timer):
            if timer is not None:
                timer.cancel()
        self._stuck_timer = self._frame_timer = None
        self._room.set()


# --- log lines ---------------------------------------------------------------------------

class ThrottledLog:
    """One log line per kind of event per `interval` seconds, so that a flood of
    peers cannot flood the log: the first of a kind is logged; the next ones
    within the interval are only counted, and the count is said with the
    next line of that kind (or by `flush`, when the daemon stops)."""

    def __init__(self, logger: logging.Logger, interval: float = 10.0, *, clock=time.monotonic):
        self.logger = logger
        self.clock = clock  # the daemon's (the simulator's is virtual)
        self.interval = interval
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def warning(self, kind: str, message: str, *args, level: int = logging.WARNING,
                exc_info: bool = False) -> None:
        now = self.clock()
        if now - self._last.get(kind, -1e18) < self.interval:
            self._held[kind] = self._held.get(kind, 0) + 1
            return
        self._last[kind] = now
        held = self._held.pop(kind, 0)
        if held:
            message += f" ({held} more of this kind since the last such line)"
        self.logger.log(level, message, *args, exc_info=exc_info)

    def exception(self, kind: str, message: str, *args) -> None:
        """`warning` at ERROR with the traceback being handled (the first of a kind)."""
        self.warning(kind, message, *args, level=logging.ERROR, exc_info=True)

    def info(self, kind: str, message: str, *args) -> None:
        self.warning(kind, message, *args, level=logging.INFO)

    def flush(self) -> None:
        for kind, held in sorted(self._held.items()):
            self.logger.warning("%d more of this kind since the last line: %s", held, kind)
        self._held.clear()


# --- peers -------------------------------------------------------------------------------

@dataclass
class _Peer:
    handshakes: int = 0
    failures: float = 0.0  # wrong tokens, decaying by one per `failure_decay` seconds
    failures_at: float = 0.0


class PeerGate:
    """Per peer address: handshakes under way, and recent wrong tokens.

    `handshake_slot(peer)` says whether a new connection from `peer` may
    start its handshake (at most `per_peer` at once); `wrong_token_delay`
    says how long to wait before refusing a wrong token: `base_delay`,
    doubled for each recent failure of that peer, at most `max_delay`.
    Memory is bounded: at most `max_peers` addresses are remembered (the
    least recently seen without a handshake under way goes first)."""

    def __init__(self, *, per_peer: int, base_delay: float, max_delay: float,
                 failure_decay: float = 10.0, max_peers: int = 4096):
        self.per_peer = per_peer
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.failure_decay = failure_decay
        self.max_peers = max_peers
        self._peers: OrderedDict[str, _Peer] = OrderedDict()

    def __len__(self) -> int:
        return len(self._peers)

    def _peer(self, peer: str) -> _Peer:
        entry = self._peers.get(peer)
        if entry is None:
            entry = self._peers[peer] = _Peer()
            self._trim()
        else:
            self._peers.move_to_end(peer)
        return entry

    def _trim(self) -> None:
        if len(self._peers) <= self.max_peers:
            return
        for key in list(self._peers):
            if len(self._peers) <= self.max_peers:
                return
            if self._peers[key].handshakes == 0:
                del self._peers[key]

    def handshakes_of(self, peer: str) -> int:
        entry = self._peers.get(peer)
        return entry.handshakes if entry else 0

    def handshake_slot(self, peer: str) -> bool:
        """Take a handshake slot for `peer`, or False if it holds `per_peer` already."""
        entry = self._peer(peer)
        if entry.handshakes >= self.per_peer:
            return False
        entry.handshakes += 1
        return True

    def handshake_over(self, peer: str) -> None:
        entry = self._peers.get(peer)
        if entry is not None and entry.handshakes > 0:
            entry.handshakes -= 1

    def wrong_token_delay(self, peer: str, now: float | None = None) -> float:
        """Count a wrong token from `peer`; return the delay before refusing it."""
        now = time.monotonic() if now is None else now
        entry = self._peer(peer)
        if entry.failures_at:
            decayed = (now - entry.failures_at) / self.failure_decay
            entry.failures = max(0.0, entry.failures - decayed)
        entry.failures += 1
        entry.failures_at = now
        return min(self.max_delay, self.base_delay * 2 ** (entry.failures - 1))
