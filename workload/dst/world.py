"""One simulated schedule: the host, the guests, the network, the faults, from one seed.

`World(seed, params).run()` builds everything on one `VirtualLoop`:

* the host: the project's `HostDaemon` (lease table, request and recall
  logic, sessions, handlers) on a real temporary export directory through
  the fault layer (workload/dst/faults.py), in its own node with its own
  clock rate; restarted (crashed or closed) with a new boot id;
* guests: the project's `GuestClient` (its cache, its reconnects, its
  retries), each in its own node, driven by workers (workload/dst/actors.py);
  paused (clock running or stopped), cut from the host (noticing at once or
  late), killed and replaced;
* host-local writers, through the pre-content detector's entry point
  (workload/dst/kernel.py).

Every random choice comes from the seed, and nothing reads a wall clock, so
a seed replays bit for bit.  After the schedule, every guest closes, the
terms run out, and the invariants are checked (workload/dst/invariants.py).
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import os
import random
import shutil
import tempfile
from dataclasses import dataclass

from host.boot import BootMarker
from host.leases import CLOCK_RATE_MARGIN, stall_bound_s
from host.server import HostDaemon, _GuestProtocol
from host.session import HostConfig
from protocol.messages import Policy
from workload.dst.actors import SLOTS, Actors, Guest, file_path, slot_id
from workload.dst.faults import FaultyExportFS
from workload.dst.invariants import Violation, check_world
from workload.dst.kernel import SimPreContentDetector
from workload.dst.loop import Idle, Node, VirtualLoop
from workload.dst.net import Network
from workload.stamp import Stamp, make_block


@dataclass(frozen=True)
class Params:
    steps: int = 40  # guest operations in all
    guests: int = 3
    workers: int = 2  # concurrent operations per guest
    files: int = 3
    blocks: int = 4
    term_ms: int = 1000
    ack_timeout_ms: int = 250
    request_timeout_s: float = 5.0
    think_s: float = 0.3
    fault_gap_s: float = 0.15  # mean time between injected faults


@dataclass
class Host:
    node: Node
    daemon: HostDaemon
    detector: SimPreContentDetector
    incarnation: int


class World:
    def __init__(self, seed: int, params: Params = Params()):
        self.seed = seed
        self.p = params
        self.rng = random.Random(seed)
        self.loop = VirtualLoop()
        self.loop.set_exception_handler(self._loop_exception)
        self.net = Network(self.loop, random.Random(self.rng.getrandbits(64)))
        self.events: list[str] = []
        self.errors: list[str] = []  # bugs the daemon or a guest logged
        self.actors = Actors(self)
        self.guests: list[Guest] = []
        self.hosts: list[Host] = []
        self.host: Host | None = None
        self.budget = params.steps
        self._next_writer = 1
        self._host_writers = 0
        # A seed's fault profile: some seeds are calm, some stormy.
        r = self.rng
        self.read_fraction = r.choice((0.5, 0.75, 0.9))
        self.files = r.randint(1, params.files)  # files the guests use (fewer: more contention)
        self.favourite_p = r.choice((0.0, 0.0, 0.8))
        self.namespace_p = r.choice((0.0, 0.1, 0.3))  # operations on names (actors.SLOTS)
        self.fault_p = r.choice((0.0, 0.0, 0.02, 0.1))
        self.weights = {
            "cut": r.choice((0, 1, 3)), "pause": r.choice((0, 1, 3)),
            "pause_many": r.choice((0, 0, 1)), "kill": r.choice((0, 0, 1)),
            "restart": r.choice((0, 0, 1)), "host_write": r.choice((0, 1, 2)),
        }
        self.root = tempfile.mkdtemp(prefix="cleanlease-dst-")
        self.export = os.path.join(self.root, "export")

    # --- the trace -------------------------------------------------------------------

    def trace(self, who: str, text: str) -> None:
        self.events.append(f"{self.loop.now * 1000:10.3f} ms  {who:<6} {text}")

    def digest(self) -> str:
        """A fingerprint of the whole schedule: equal for a replay of the same seed."""
        return hashlib.sha256("\n".join(self.events).encode()).hexdigest()[:16]

    def _loop_exception(self, loop, context) -> None:
        exc = context.get("exception")
        message = context.get("message", "")
        if "was destroyed but it is pending" in message:
            return  # a killed node's task
        self.errors.append(f"{message}: {exc!r}")

    # --- setup -------------------------------------------------------------------------

    def _setup_files(self) -> None:
        os.makedirs(os.path.join(self.export, "d0"))
        os.makedirs(os.path.join(self.export, "d1"))
        for index in range(self.p.files):
            with open(os.path.join(self.export, file_path(index)), "wb") as f:
                for block in range(self.p.blocks):
                    f.write(make_block(Stamp.initial(index, block)))
        for slot, path in enumerate(SLOTS):
            with open(os.path.join(self.export, path), "wb") as f:
                f.write(make_block(Stamp.initial(slot_id(slot), 0)))

    def _rate(self) -> float:
        # Each node within half the documented rate margin of true time, so
        # that any two differ by less than the margin.
        return 1.0 + self.rng.uniform(-CLOCK_RATE_MARGIN / 2.5, CLOCK_RATE_MARGIN / 2.5)

    async def _start_host(self) -> None:
        incarnation = len(self.hosts) + 1
        node = Node(self.loop, f"host{incarnation}", rate=self._rate(),
                    offset=self.rng.uniform(0, 1000))
        detector = SimPreContentDetector()
        config = HostConfig(self.export, Policy.CLEAN_LEASE, lease_term_ms=self.p.term_ms,
                            ack_timeout_ms=self.p.ack_timeout_ms, clean_after_ms=20)
        fs_rng = random.Random(self.rng.getrandbits(64))
        export_fs = functools.partial(FaultyExportFS, rng=fs_rng, p=self.fault_p,
                                      on_fault=lambda text: self.trace(node.name, text))
        marker = BootMarker(self.export, self.p.term_ms, path=os.path.join(self.root, "boot"),
                            clock=lambda: self.loop.now)  # CLOCK_BOOTTIME: one for the machine
        blocking_rng = random.Random(self.rng.getrandbits(64))

        async def run_blocking(fn):
            # Inline, after a seeded while (an fdatasync takes time): no threads here.
            await asyncio.sleep(blocking_rng.uniform(0, 0.003))
            return fn()

        daemon = HostDaemon(config, detector, clock=node.clock, run_blocking=run_blocking,
                            boot_id=self.rng.randbytes(16), boot_marker=marker,
                            export_fs=export_fs)
        host = Host(node, daemon, detector, incarnation)
        await node.spawn(daemon.begin())
        self.hosts.append(host)
        self.host = host
        self.net.listener = lambda: (_GuestProtocol(daemon), node)
        self.trace(node.name, f"up (rate {node.rate:.4f})")

    def _new_guest(self) -> Guest:
        writer = self._next_writer
        self._next_writer += 1
        node = Node(self.loop, f"g{writer}", rate=self._rate(), offset=self.rng.uniform(0, 1000))
        g = Guest(name=node.name, writer=writer, node=node)
        self.guests.append(g)
        g.main = node.spawn(self.actors.guest_main(g))
        return g

    # --- faults ------------------------------------------------------------------------

    async def _chaos(self) -> None:
        kinds = [k for k, weight in self.weights.items() for _ in range(weight)]
        if not kinds:
            return
        rng = self.rng
        while self.budget > 0:
            await asyncio.sleep(rng.expovariate(1.0 / self.p.fault_gap_s))
            if self.budget <= 0:
                return
            kind = rng.choice(kinds)
            live = [g for g in self.guests if g.alive and g.client is not None]
            if kind == "host_write":
                self._host_writers += 1
                in_write = rng.uniform(0, 0.2) if rng.random() < 0.3 else 0.0
                writer = Node(self.loop, f"hw{self._host_writers}")
                writer.spawn(self.actors.host_write(self._host_writers, in_write))
            elif kind == "restart":
                await self._restart_host(crash=rng.random() < 0.6)
            elif not live:
                continue
            elif kind == "cut":
                g = self._victim(live)
                session = g.client.session
                if session is not None and session.transport is not None:
                    late = rng.uniform(0.1, 2.0 * self.p.term_ms / 1000) if rng.random() < 0.3 else None
                    self.trace(g.name, "connection cut" + (f", noticed after {late * 1000:.0f} ms"
                                                           if late else ""))
                    session.transport.conn.cut(guest_notices_after=late)
            elif kind == "pause":
                self._pause(self._victim(live))
            elif kind == "pause_many":
                # Several guests stall at once (an overloaded host machine).
                length = self._pause_length()
                for g in rng.sample(live, rng.randint(1, len(live))):
                    self._pause(g, length)
            elif kind == "kill":
                g = rng.choice(live)
                self._kill(g)
                self._new_guest()

    def _victim(self, live: list[Guest]) -> Guest:
        """A guest to fault: half the time one that holds a lease now (the
        adversary knows the host's lease table), else any."""
        if self.rng.random() < 0.5:
            holding = set()
            for leases in self.host.daemon.leases._inodes.values():
                holding |= leases.holders
            holders = [g for g in live if g.client.hello is not None
                       and g.client.hello.guest_id in holding]
            if holders:
                return self.rng.choice(holders)
        return self.rng.choice(live)

    def _pause_length(self) -> float:
        term = self.p.term_ms / 1000
        if self.rng.random() < 0.7:
            return self.rng.uniform(0.05, 1.5 * term)  # around the ack timeout and the term
        return self.rng.uniform(0.05, 2.5 * term)

    def _pause(self, g: Guest, length: float | None = None) -> None:
        if g.paused:
            return
        stops = length is None and self.rng.random() < 0.3
        if stops:
            # A stopped clock is outside every margin (docs/design.md): only as
            # long as the fixed margin covers.
            length = self.rng.uniform(0.001, 0.02)
        elif length is None:
            length = self._pause_length()
        g.paused = True
        g.node.pause(clock_stops=stops)
        self.trace(g.name, f"paused for {length * 1000:.0f} ms{', clock stopped' if stops else ''}")
        self.loop.call_global_at(self.loop.now + length, self._resume, g)

    def _resume(self, g: Guest) -> None:
        if g.paused and g.alive:
            g.paused = False
            g.node.resume()
            self.trace(g.name, "resumed")

    def _kill(self, g: Guest) -> None:
        self.trace(g.name, "killed")
        g.alive = False
        g.node.kill()
        self.net.cut_all_of(g.node)
        self.actors.guest_died(g)

    async def _restart_host(self, crash: bool) -> None:
        host = self.host
        self.net.listener = None
        if crash:
            self.trace(host.node.name, "crashed")
            host.node.kill()
            host.detector.died()
            self.net.cut_all_of(host.node)
        else:
            self.trace(host.node.name, "closing")
            await host.node.spawn(host.daemon.close())
            host.node.kill()
            self.net.cut_all_of(host.node)
        host.daemon.fs.close()
        self.net.prune()
        await asyncio.sleep(self.rng.uniform(0.01, 0.3))
        await self._start_host()

    # --- the whole run -------------------------------------------------------------------

    async def _main(self) -> None:
        self._setup_files()
        await self._start_host()
        for _ in range(self.p.guests):
            self._new_guest()
        chaos = asyncio.ensure_future(self._chaos())
        # The schedule: until every operation of the budget has run.
        deadline = self.loop.now + 600.0
        while True:
            live = [g for g in self.guests if g.alive]
            if self.budget <= 0 and all(g.main.done() for g in live):
                break
            if self.loop.now > deadline:
                raise Violation("stuck", "guest operations still under way after 600 s")
            await asyncio.sleep(0.1)
            if self.budget <= 0:
                for g in live:
                    self._resume(g)
        await chaos
        for g in self.guests:
            if g.main.done() and g.main.exception() is not None:
                raise Violation("guest", f"{g.name} failed: {g.main.exception()!r}")
        # Quiesce: every guest closes; every term runs out; flushes land.
        for g in self.guests:
            if g.alive and g.client is not None:
                await g.node.spawn(g.client.close())
        self.trace("sim", "every guest closed")
        await asyncio.sleep(stall_bound_s(self.p.ack_timeout_ms / 1000, self.p.term_ms / 1000) + 1)
        self.actors.final_reads()

    def run(self) -> "Outcome":
        """Run the schedule and check it; never raises for a broken invariant."""
        handler = _Collect(self)
        logger = logging.getLogger("cleanlease")
        logger.addHandler(handler)
        old_level, logger.level = logger.level, logging.WARNING
        old_propagate, logger.propagate = logger.propagate, False
        violation = None
        try:
            self.loop.run_until(self._main())
            violation = check_world(self)
        except Violation as exc:
            violation = exc
        except Idle as exc:
            violation = Violation("stuck", str(exc))
        finally:
            logger.removeHandler(handler)
            logger.level, logger.propagate = old_level, old_propagate
            for host in self.hosts:
                try:
                    host.daemon.fs.close()
                except OSError:
                    pass
            self.loop.close()
            shutil.rmtree(self.root, ignore_errors=True)
        return Outcome(self.seed, violation, self.digest(), self.events,
                       self.p.steps - max(self.budget, 0), self.loop.now)


class _Collect(logging.Handler):
    """Warnings go to the trace; an exception the code logged is a bug."""

    def __init__(self, world: World):
        super().__init__(logging.WARNING)
        self.world = world

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        self.world.trace("log", text[:160])
        if record.exc_info:
            self.world.errors.append(f"{text}: {record.exc_info[1]!r}")


@dataclass
class Outcome:
    seed: int
    violation: Violation | None
    digest: str
    events: list[str]
    ops: int
    virtual_s: float

    @property
    def ok(self) -> bool:
        return self.violation is None
