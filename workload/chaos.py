"""`cleanlease chaos`: a seeded fault-injection run against a real simulation.

While a multi-writer workload runs under clean-lease, faults are injected at
seeded instants: a guest stopped (SIGSTOP) and resumed, a guest's connection
cut, the host killed (SIGKILL) and restarted on the same export, bursts of
malformed frames.  Afterwards the checker judges every read, and a final read
of every block, made directly on the export, must not be stale: a stale final
read is a lost write.  The report gives faults injected, stale reads, lost
writes, the worst writer stall against ack timeout + lease term + the clock
margin (host/leases.py, `stall_bound_s`), and daemon
crashes (host exits nobody asked for).
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from dataclasses import dataclass, field

from rich.console import Console
from rich.table import Table

from host.leases import stall_bound_s
from workload import fuzz
from workload import stamp as stamps
from workload.oplog import ReadRecord, WriteRecord
from workload.simulate import SimOptions, Simulation
from workload.workloads import make_workload

FAULTS = ("stop-guest", "cut-connection", "restart-host", "fuzz")


@dataclass
class ChaosReport:
    seed: int
    duration: float
    faults: dict[str, int] = field(default_factory=dict)
    reads: int = 0
    stale_reads: int = 0
    worst_stale_ms: float = 0.0
    lost_writes: int = 0
    corrupt: int = 0
    writes: int = 0
    worst_write_stall_ms: float = 0.0  # writes with no host restart while they ran
    stall_bound_ms: float = 0.0  # ack timeout + lease term + clock margin
    # Writes during which their own guest was stopped or had its connection cut:
    # the time it spent stopped or reconnecting is its own, not a stall another
    # guest imposed, so these are not held to the bound.
    own_fault_writes: int = 0
    worst_own_fault_ms: float = 0.0
    restart_writes: int = 0
    worst_restart_stall_ms: float = 0.0  # writes that overlapped a host restart
    daemon_crashes: int = 0
    op_errors: dict[str, int] = field(default_factory=dict)


class _Injector:
    """Runs the seeded fault schedule from the coordinator's wait loop."""

    def __init__(self, sim: Simulation, seed: int, duration: float, mean_gap_s: float):
        self.sim = sim
        self.rng = random.Random(seed)
        self.faults = {name: 0 for name in FAULTS}
        self.crashes = 0
        self.schedule = []
        t = 0.3
        while True:
            t += self.rng.expovariate(1.0 / mean_gap_s)
            if t > duration - 0.3:
                break
            self.schedule.append((t, self.rng.choice(FAULTS)))
        self._resume: list[tuple[float, object]] = []
        self.restarts: list[tuple[int, int]] = []  # (killed, ready again), monotonic ns
        self._fuzzers: list[threading.Thread] = []
        self.log: list[tuple[int, str, str]] = []  # (monotonic ns, fault, target), as injected

    def __call__(self, since: float) -> None:
        host = self.sim.host
        if host.popen.poll() is not None:  # nobody killed it: a crash
            self.crashes += 1
            self.sim.start_host()
        for due, proc in list(self._resume):
            if since >= due:
                self._continue(proc)
                self._resume.remove((due, proc))
        while self.schedule and self.schedule[0][0] <= since:
            _, fault = self.schedule.pop(0)
            self._inject(fault, since)

    def _inject(self, fault: str, since: float) -> None:
        guests = [p for p in self.sim.guest_procs() if p.popen.poll() is None
                  and all(p is not q for _, q in self._resume)]
        target = "host"
        if fault == "stop-guest" and guests:
            proc = self.rng.choice(guests)
            proc.popen.send_signal(signal.SIGSTOP)
            self._resume.append((since + self.rng.uniform(0.2, 1.5), proc))
            target = proc.name
        elif fault == "cut-connection" and guests:
            proc = self.rng.choice(guests)
            proc.popen.send_signal(signal.SIGUSR1)
            target = proc.name
        elif fault == "restart-host":
            killed = time.monotonic_ns()
            self.sim.host.stop(signal.SIGKILL)
            self.sim.start_host()
            self.restarts.append((killed, time.monotonic_ns()))
        elif fault == "fuzz":
            thread = threading.Thread(target=_quiet_fuzz, daemon=True,
                                      args=(self.sim.address, 500, self.rng.randrange(1 << 30)))
            thread.start()
            self._fuzzers.append(thread)
        else:
            return
        self.faults[fault] += 1
        self.log.append((time.monotonic_ns(), fault, target))

    def _continue(self, proc) -> None:
        proc.popen.send_signal(signal.SIGCONT)
        self.log.append((time.monotonic_ns(), "resume-guest", proc.name))

    def settle(self) -> None:
        """Resume every stopped guest and wait for the fuzzers."""
        for _, proc in self._resume:
            self._continue(proc)
        self._resume.clear()
        for thread in self._fuzzers:
            thread.join(30)


def _quiet_fuzz(address: str, frames: int, seed: int) -> None:
    try:
        fuzz.fuzz(address, frames, seed)
    except OSError:
        pass  # the host was being restarted: the frames had nowhere to go


def final_reads(sim: Simulation) -> list[ReadRecord]:
    """Every block of every file, read directly from the export after the run."""
    records = []
    for spec in sim.workload.files:
        with open(os.path.join(sim.export, spec.path), "rb") as f:
            data = f.read()
        now = time.monotonic_ns()
        for block in range(len(data) // stamps.BLOCK_SIZE):
            chunk = data[block * stamps.BLOCK_SIZE:(block + 1) * stamps.BLOCK_SIZE]
            try:
                s = stamps.parse_block(chunk)
                records.append(ReadRecord("final", spec.file_id, block, s.writer, s.seq, now, now,
                                          False, block, None))
            except stamps.CorruptBlock as exc:
                records.append(ReadRecord("final", spec.file_id, block, -1, -1, now, now, False,
                                          block, exc.kind))
    return records


def run(args) -> int:
    console = Console()
    opts = SimOptions(workload=args.workload, guests=args.guests, duration=args.duration,
                      seed=args.seed, lease_term_ms=args.lease_term, ack_timeout_ms=args.ack_timeout,
                      detector="none", keep=args.keep, tcp=args.tcp)
    workload = make_workload(args.workload, opts.guests)
    sim = Simulation(workload, args.policy, opts, args.workdir)
    injector = _Injector(sim, args.seed, args.duration, args.mean_gap)
    try:
        sim.start()
        sim.go()
        with console.status(f"chaos: {len(injector.schedule)} faults over {args.duration:.0f} s"):
            sim.wait_done(during=injector)
        injector.settle()
        finals = final_reads(sim)
    except BaseException:
        injector.settle()
        sim.abort()
        raise
    records = sim.records()
    run = sim.finish(extra_records=finals)
    report = _report(args, injector, run, records)
    _print(console, report)
    ok = (report.stale_reads == 0 and report.lost_writes == 0 and report.corrupt == 0
          and report.daemon_crashes == 0 and report.worst_write_stall_ms <= report.stall_bound_ms)
    console.print("[green]chaos: all promises held[/green]" if ok else "[red]chaos: a promise broke[/red]")
    return 0 if ok else 1


def _report(args, injector: _Injector, run, records) -> ChaosReport:
    final = run.check.per_actor.get("final")
    lost = final.stale_reads if final else 0
    guest_stale = run.check.stale_ops - (final.stale_ops if final else 0)
    # One entry per guest write operation: (start, end) of the whole call.
    ops = {(r.actor, r.start_ns, r.end_ns) for r in records
           if isinstance(r, WriteRecord) and r.via == "guest"}
    own = _own_fault_intervals(injector.log)
    calm, across_restart, own_fault = [], [], []
    for actor, start, end in ops:
        if any(start < ready and end > killed for killed, ready in injector.restarts):
            across_restart.append(end - start)
        elif any(start <= until and end >= since for since, until in own.get(actor, ())):
            own_fault.append(end - start)
        else:
            calm.append(end - start)
    errors: dict[str, int] = {}
    for a in run.actors:
        for key, n in a.get("errors", {}).items():
            kind = key.split(":")[0]
            errors[kind] = errors.get(kind, 0) + n
    return ChaosReport(
        seed=args.seed, duration=args.duration, faults=injector.faults,
        reads=sum(a.get("reads", 0) for a in run.actors), stale_reads=guest_stale,
        worst_stale_ms=run.check.worst_stale_age_ns / 1e6 if guest_stale else 0.0,
        lost_writes=lost, corrupt=sum(run.check.corrupt.values()) + run.check.phantom,
        writes=len(calm), worst_write_stall_ms=max(calm, default=0) / 1e6,
        stall_bound_ms=1000 * stall_bound_s(args.ack_timeout / 1000, args.lease_term / 1000),
        own_fault_writes=len(own_fault), worst_own_fault_ms=max(own_fault, default=0) / 1e6,
        restart_writes=len(across_restart),
        worst_restart_stall_ms=max(across_restart, default=0) / 1e6,
        daemon_crashes=injector.crashes, op_errors=errors)


def _own_fault_intervals(log: list[tuple[int, str, str]]) -> dict[str, list[tuple[int, int]]]:
    """actor -> the (from, to) monotonic ns in which it was stopped, or was cut (an
    instant; its reconnection follows)."""
    intervals: dict[str, list[tuple[int, int]]] = {}
    stopped: dict[str, int] = {}
    for t, fault, target in log:
        if fault == "stop-guest":
            stopped[target] = t
        elif fault == "resume-guest" and target in stopped:
            intervals.setdefault(target, []).append((stopped.pop(target), t))
        elif fault == "cut-connection":
            intervals.setdefault(target, []).append((t, t))
    for target, t in stopped.items():  # never resumed by the end of the log
        intervals.setdefault(target, []).append((t, 1 << 63))
    return intervals


def _print(console: Console, r: ChaosReport) -> None:
    table = Table(title=f"chaos, seed {r.seed}, {r.duration:.0f} s", title_justify="left")
    table.add_column("what")
    table.add_column("count", justify="right")
    for name, n in r.faults.items():
        table.add_row(f"faults injected: {name}", str(n))
    table.add_row("guest reads checked", str(r.reads))
    table.add_row("stale reads", str(r.stale_reads))
    table.add_row("lost writes (final read stale)", str(r.lost_writes))
    table.add_row("corrupt or phantom blocks", str(r.corrupt))
    table.add_row("guest writes (no host restart, own guest not stopped or cut)", str(r.writes))
    table.add_row("worst writer stall (ms)", f"{r.worst_write_stall_ms:.0f}")
    table.add_row("bound: ack timeout + lease term + clock margin (ms)", f"{r.stall_bound_ms:.0f}")
    table.add_row("guest writes whose own guest was stopped or cut", str(r.own_fault_writes))
    table.add_row("worst of those (ms, its own stop or reconnect included)",
                  f"{r.worst_own_fault_ms:.0f}")
    table.add_row("guest writes across a host restart", str(r.restart_writes))
    table.add_row("worst stall across a restart (ms, reconnect included)",
                  f"{r.worst_restart_stall_ms:.0f}")
    table.add_row("daemon crashes", str(r.daemon_crashes))
    for kind, n in sorted(r.op_errors.items()):
        table.add_row(f"operations failed ({kind}, reported to the caller)", str(n))
    console.print(table)
