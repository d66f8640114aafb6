"""`cleanlease chaos`: a seeded fault-injection run against a real simulation.

While a multi-writer workload runs under clean-lease (the fanotify detector
when it can run here, so host-local writes are recalled before they land),
faults are injected at seeded instants, each class at least once per block
of as many faults as there are classes (`FAULTS`, each with the promise it
tests in `PROMISES`).  The processes' faults: a guest stopped (SIGSTOP) and
resumed, a guest's connection cut, the host killed (SIGKILL) and restarted
on the same export, bursts of malformed frames.  The peers' faults, each
injected by a separate OS process (workload/chaos_peers.py): a write that
fails after its recall, holders that heartbeat but never ACK (one, and
many at once), host-local writers with O_DIRECT and with long buffered
writes (inside write(2) for a seeded stall), host restarts while a guest
write and while a host-local write are in flight, and concurrent namespace
changes in directories that guests hold leases on.

Afterwards the checker judges every read, the peers' included (and the
silent holders' last-instant reads: what each would have served at the
end of its term), and a final read of every block, made directly on the
export, must not be stale: a stale final read is a lost write.  The report
gives each class's count, stale reads, lost writes, corrupt blocks, the
worst stall of every modification held to ack timeout + lease term + the
clock margin (host/leases.py, `stall_bound_s`), what the peers checked from
their side, and daemon crashes.  `python -m workload.chaos --seeds 1,2,3`
runs several seeds and sums them up; it exits 1 if any seed broke a promise.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field

from rich.console import Console
from rich.table import Table

from host.leases import stall_bound_s, term_end
from workload import fuzz
from workload import stamp as stamps
from workload.checker import corrupt_reads
from workload.oplog import ReadRecord, WriteRecord, read_logs
from workload.simulate import SimOptions, Simulation
from workload.workloads import make_workload

FAULTS = (
    "stop-guest", "cut-connection", "restart-host", "fuzz",
    "failing-write", "silent-holder", "silent-holders-many",
    "host-odirect", "host-buffered-long",
    "restart-guest-write-in-flight", "restart-host-write-in-flight",
    "namespace-churn",
)

# Which promise each class tests (the docs' table says the same).
PROMISES = {
    "stop-guest": "a stopped holder is fenced within the bound; after SIGCONT it serves "
                  "nothing stale",
    "cut-connection": "a lost connection is not an ACK: a writer waits for the holder's "
                      "term, within the bound",
    "restart-host": "no fsynced or acknowledged write is lost; guests drop every cache",
    "fuzz": "malformed frames close one connection; the daemon does not crash",
    "failing-write": "a write failing (EFBIG) after its recall publishes the new generation "
                     "and the file leads back to CLEAN",
    "silent-holder": "a holder that heartbeats and never ACKs is fenced within the bound, "
                     "is never renewed while it owes an ACK, learns its fence from a "
                     "heartbeat, and no write lands while its lease is live",
    "silent-holders-many": "the same with 6 at once: fences run concurrently, the bound does "
                           "not grow with their number",
    "host-odirect": "no lease is granted while an O_DIRECT host write is in write(2); "
                    "no stale read after it lands",
    "host-buffered-long": "no lease is granted while a buffered host write stalled inside "
                          "write(2) (inode lock held) is under way",
    "restart-guest-write-in-flight": "a write the restart hid ends OutcomeUnknown (logged "
                                     "'uncertain'), is carried out at most once, loses "
                                     "nothing",
    "restart-host-write-in-flight": "a host write in write(2) across a daemon restart: the "
                                    "new daemon grants no lease that the write then makes "
                                    "stale",
    "namespace-churn": "concurrent creates, renames over a name and unlinks in leased "
                       "directories: no reader resolves a name to its old file; each "
                       "change waits within the bound",
}

HOST_LOCAL_FAULTS = ("host-odirect", "host-buffered-long", "restart-host-write-in-flight")
MANY_HOLDERS = 6
CHURN_DIR = "churn.d"
PEER_WRITER_BASE = 5000  # stamped writer ids of the peers (guests are 1.., host writers 1000..)
SIDE_FILE_BASE = 10_000  # file ids of the namespace churn's side files


@dataclass
class ChaosReport:
    seed: int
    duration: float
    detector: str = "none"
    faults: dict[str, int] = field(default_factory=dict)
    not_achieved: dict[str, int] = field(default_factory=dict)  # tried, condition not met
    skipped: dict[str, str] = field(default_factory=dict)  # class -> why it cannot run here
    reads: int = 0
    peer_reads: int = 0
    last_instant_reads: int = 0
    stale_reads: int = 0
    worst_stale_ms: float = 0.0
    stale_examples: list[str] = field(default_factory=list)
    # guests (the workload's), holders (silent holders: real and last-instant reads),
    # other peers (name readers, failing writers)
    stale_by_reader: dict[str, int] = field(default_factory=dict)
    # Stale reads whose overwrite was a host-local write the serving daemon could not
    # see: its fd was opened before that daemon started (docs/kernel.md), and it was
    # still in write(2) when the daemon came up.  Not held to the 0: shown, and why.
    stale_unheld: int = 0
    unheld_host_writes: int = 0
    unheld_examples: list[str] = field(default_factory=list)
    lost_writes: int = 0
    corrupt: int = 0  # corrupt, phantom or future blocks no host-side race explains
    torn_by_host_race: int = 0
    writes: int = 0
    worst_write_stall_ms: float = 0.0  # modifications with no restart or own fault in them
    worst_write_stall_what: str = ""
    worst_stall_context: str = ""  # the faults and host-local writes around it
    over_bound: int = 0
    starved_stalls: int = 0  # over the bound by no more than the daemon's silence meanwhile
    worst_starved: tuple[float, float] = (0.0, 0.0)  # (excess ms, the daemon's silence ms)
    heartbeat_p99_ms: float = 0.0  # the daemon's answers to a probe (a heartbeat every 50 ms)
    heartbeat_max_ms: float = 0.0
    load: float = 0.0  # the 1-minute load average when the run ended
    stall_bound_ms: float = 0.0  # ack timeout + lease term + clock margin
    peer_modifications: int = 0
    # Writes during which their own guest was stopped or had its connection cut:
    # the time it spent stopped or reconnecting is its own, not a stall another
    # guest imposed, so these are not held to the bound.
    own_fault_writes: int = 0
    worst_own_fault_ms: float = 0.0
    restart_writes: int = 0
    worst_restart_stall_ms: float = 0.0  # modifications that overlapped a host restart
    uncertain_writes: int = 0  # ended OutcomeUnknown (or a rename lost to a restart)
    holder_sessions: int = 0
    owed_sessions: int = 0
    fences_learned: int = 0
    lost_while_owed: int = 0
    never_fenced: int = 0
    fenced_unowed: int = 0
    renewed_while_owed: int = 0
    worst_fence_learned_ms: float = 0.0
    failing_writes: int = 0
    failing_efbig: int = 0
    failing_published: int = 0
    failing_clean_again: int = 0
    failing_interrupted: int = 0
    worst_clean_again_ms: float = 0.0
    host_writes: dict[str, int] = field(default_factory=dict)
    host_writes_stalled: int = 0
    worst_host_write_in_syscall_ms: float = 0.0
    renames: int = 0
    name_changes: int = 0
    name_reads: int = 0
    daemon_crashes: int = 0
    peer_failures: list[str] = field(default_factory=list)
    op_errors: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.broken()

    def broken(self) -> list[str]:
        """The promises this run broke, one line each (empty: all held)."""
        out = []
        across = self.stale_by_reader.get("holders across a restart", 0)
        if self.stale_reads - across:
            out.append(f"stale: {self.stale_reads - across} stale reads")
        if across:
            out.append(f"restart-grace: {across} last-instant reads of leases granted before a "
                       f"host restart, overwritten within their term on the new boot")
        if self.lost_writes:
            out.append(f"lost: {self.lost_writes} lost writes")
        if self.corrupt:
            out.append(f"corrupt: {self.corrupt} corrupt, phantom or future blocks")
        if self.daemon_crashes:
            out.append(f"crash: {self.daemon_crashes} daemon crashes")
        if self.worst_write_stall_ms > self.stall_bound_ms:
            out.append(f"stall: {self.worst_write_stall_ms:.0f} ms > "
                       f"{self.stall_bound_ms:.0f} ms ({self.worst_write_stall_what})")
        if self.renewed_while_owed:
            out.append(f"renewal: {self.renewed_while_owed} renewals while an ACK was owed")
        if self.never_fenced:
            out.append(f"fence: {self.never_fenced} silent sessions not fenced within the bound")
        if self.fenced_unowed:
            out.append(f"fence: {self.fenced_unowed} sessions fenced without an invalidation")
        done = self.failing_writes - self.failing_interrupted
        for what, n in (("EFBIG", self.failing_efbig), ("new generation", self.failing_published),
                        ("CLEAN again", self.failing_clean_again)):
            if n < done:
                out.append(f"failing-write: {done - n} of {done} without {what}")
        out += [f"peer: {p}" for p in self.peer_failures]
        return out


# --- peers ---------------------------------------------------------------------------------


class _Peer:
    """A fault peer process (workload/chaos_peers.py) and what it printed so far."""

    def __init__(self, fault: str, name: str, argv: list[str], run_dir: str, *,
                 watch: bool = False, stdin: bool = False):
        self.fault = fault
        self.name = name
        self.log = os.path.join(run_dir, f"{name}.log")
        self.stats = os.path.join(run_dir, f"{name}.json")
        self.err = os.path.join(run_dir, f"{name}.err")
        open(self.log, "w").close()
        self._stderr = open(self.err, "wb")
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "workload.chaos_peers", *argv, "--actor", name,
             "--log", self.log, "--stats", self.stats],
            stdout=subprocess.PIPE if watch else subprocess.DEVNULL, stderr=self._stderr,
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            env={**os.environ, "PYTHONUNBUFFERED": "1"})
        if watch:
            os.set_blocking(self.popen.stdout.fileno(), False)
        self.lines: list[str] = []
        self._partial = b""

    def poll_lines(self) -> list[str]:
        """Lines printed so far (read without blocking)."""
        out = self.popen.stdout
        if out is not None:
            try:
                chunk = os.read(out.fileno(), 65536)
            except BlockingIOError:
                chunk = b""
            if chunk:
                data = self._partial + chunk
                *whole, self._partial = data.split(b"\n")
                self.lines += [w.decode(errors="replace").strip() for w in whole]
        return self.lines

    def said(self, word: str) -> bool:
        return any(line == word or line.startswith(word + " ") for line in self.poll_lines())

    def tell(self, line: str) -> None:
        try:
            self.popen.stdin.write(line.encode() + b"\n")
            self.popen.stdin.flush()
        except (BrokenPipeError, ValueError, AttributeError):
            pass

    def finish(self, timeout: float) -> str | None:
        """Wait for it to exit; None if it did so cleanly, else why not."""
        if self.popen.stdin is not None:
            try:
                self.popen.stdin.close()  # a held writer takes EOF as its RELEASE
            except BrokenPipeError:
                pass
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()
            self._stderr.close()
            return f"{self.name} ({self.fault}) still running after {timeout:.0f} s{self.tail()}"
        self._stderr.close()
        if self.popen.returncode != 0 or not os.path.exists(self.stats):
            return f"{self.name} ({self.fault}) exited with {self.popen.returncode}{self.tail()}"
        return None

    def tail(self, lines: int = 8) -> str:
        try:
            with open(self.err, errors="replace") as f:
                text = f.read().strip().splitlines()[-lines:]
        except OSError:
            return ""
        return ("; stderr: " + " | ".join(text)) if text else ""

    def result(self) -> dict:
        with open(self.stats) as f:
            return json.load(f)


class _Machine:
    """A fault that takes several steps (a restart timed to a write in flight):
    `step(now)` runs on every tick of the injector until it returns True."""

    def __init__(self, fault: str, deadline: float, step):
        self.fault, self.deadline, self.step = fault, deadline, step


# --- the injector ----------------------------------------------------------------------------


class _Injector:
    """Runs the seeded fault schedule from the coordinator's wait loop."""

    def __init__(self, sim: Simulation, seed: int, duration: float, mean_gap_s: float,
                 classes: tuple[str, ...] = FAULTS, term_ms: int = 1000, ack_ms: int = 300):
        self.sim = sim
        self.rng = random.Random(seed)
        self.seed = seed
        self.duration = duration
        self.mean_gap_s = mean_gap_s
        self.classes = tuple(classes)
        self.bound_ms = 1000 * stall_bound_s(ack_ms / 1000, term_ms / 1000)
        self.faults = {name: 0 for name in self.classes}
        self.not_achieved: dict[str, int] = {}
        self.skipped: dict[str, str] = {}
        self.notes: list[str] = []
        self.crashes = 0
        self.schedule: list[tuple[float, str]] = []
        self._resume: list[tuple[float, object]] = []
        self.restarts: list[tuple[int, int]] = []  # (killed, ready again), monotonic ns
        self._fuzzers: list[threading.Thread] = []
        self.log: list[tuple[int, str, str]] = []  # (monotonic ns, fault, target), as injected
        self.peers: list[_Peer] = []
        self._machines: list[_Machine] = []
        self._restarting = False
        self._since = 0.0
        self._k = 0
        self.side_files: list[tuple[str, int]] = []  # (path, file_id) the churn renames over
        self.peer_dir = ""

    # --- the plan ---------------------------------------------------------------------

    def plan(self) -> None:
        """Seeded instants (a Poisson process), and for them the classes in blocks: each
        block a seeded permutation of every class that can run here, so that every class
        comes once in each len(classes) faults.  Call once the host is up (the detector
        decides whether host-local writes can be held)."""
        self.peer_dir = os.path.join(self.sim.run_dir, "peers")
        os.makedirs(self.peer_dir, exist_ok=True)
        if self.sim.detector != "fanotify":
            for name in HOST_LOCAL_FAULTS:
                if name in self.classes:
                    self.skipped[name] = (f"detector {self.sim.detector}: host-local writes "
                                          f"are not held before they land")
        if "failing-write" in self.classes:
            why = _efbig_probe(self.sim.run_dir)
            if why:
                self.skipped["failing-write"] = why
        usable = [c for c in self.classes if c not in self.skipped]
        for name in self.skipped:
            self.faults.pop(name, None)
        t = 0.3
        times = []
        while True:
            t += self.rng.expovariate(1.0 / self.mean_gap_s)
            if t > self.duration - 0.3:
                break
            times.append(t)
        kinds: list[str] = []
        while len(kinds) < len(times):
            block = list(usable)
            self.rng.shuffle(block)
            kinds += block
        self.schedule = list(zip(times, kinds))

    def start_probe(self) -> None:
        """Not a fault: a peer that measures how quickly the daemon answers, all run
        long (a heartbeat every 50 ms)."""
        self._peer("probe", "pr", ["probe", self.sim.address, *self._token(),
                                   "--for", f"{self.duration + 1:.1f}"])

    # --- every tick -------------------------------------------------------------------------

    def __call__(self, since: float) -> None:
        self._since = since
        host = self.sim.host
        if not self._restarting and host.popen.poll() is not None:  # nobody killed it: a crash
            self.crashes += 1
            self._event("crash", "host")
            self.sim.start_host()
        for due, proc in list(self._resume):
            if since >= due:
                self._continue(proc)
                self._resume.remove((due, proc))
        for machine in list(self._machines):
            if machine.step(time.monotonic()):
                self._machines.remove(machine)
            elif time.monotonic() > machine.deadline:
                self._machines.remove(machine)
                self._not_achieved(machine.fault, "timed out")
        while self.schedule and self.schedule[0][0] <= since:
            if self._machines and self.schedule[0][1].startswith("restart"):
                break  # one restart at a time: wait for the one under way
            _, fault = self.schedule.pop(0)
            self._inject(fault, since)

    def _event(self, fault: str, target: str) -> None:
        self.log.append((time.monotonic_ns(), fault, target))

    def _count(self, fault: str, target: str) -> None:
        self.faults[fault] += 1
        self._event(fault, target)

    def _not_achieved(self, fault: str, why: str) -> None:
        """A multi-step fault whose condition was not met: said, and tried again soon
        (at most 3 times per class), while the run lasts."""
        n = self.not_achieved[fault] = self.not_achieved.get(fault, 0) + 1
        self.notes.append(f"{fault}: not achieved ({why})")
        again = self._since + 0.2
        if n <= 3 and again < self.duration - 0.3:
            self.schedule.append((again, fault))
            self.schedule.sort()

    # --- the faults ---------------------------------------------------------------------------

    def _inject(self, fault: str, since: float) -> None:
        guests = [p for p in self.sim.guest_procs() if p.popen.poll() is None
                  and all(p is not q for _, q in self._resume)]
        if fault == "stop-guest" and guests:
            proc = self.rng.choice(guests)
            proc.popen.send_signal(signal.SIGSTOP)
            self._resume.append((since + self.rng.uniform(0.2, 1.5), proc))
            self._count(fault, proc.name)
        elif fault == "cut-connection" and guests:
            proc = self.rng.choice(guests)
            proc.popen.send_signal(signal.SIGUSR1)
            self._count(fault, proc.name)
        elif fault == "restart-host":
            self._restart()
            self._count(fault, "host")
        elif fault == "fuzz":
            thread = threading.Thread(target=_quiet_fuzz, daemon=True,
                                      args=(self.sim.address, 500, self.rng.randrange(1 << 30)))
            thread.start()
            self._fuzzers.append(thread)
            self._count(fault, "host")
        elif fault == "failing-write":
            f = self.rng.choice(self.sim.workload.files)
            peer = self._peer(fault, "fw", ["failing-write", self.sim.address, *self._token(),
                                            "--file", _file_arg(f), "--writer-id", str(self._writer())])
            self._count(fault, peer.name)
        elif fault in ("silent-holder", "silent-holders-many"):
            count = 1 if fault == "silent-holder" else MANY_HOLDERS
            peer = self._holders(fault, count, self.sim.workload.files, self.rng.uniform(1.5, 3.0))
            self._count(fault, peer.name)
        elif fault in ("host-odirect", "host-buffered-long"):
            # A silent holder of the files written: the write waits in the pre-content
            # hook until it is fenced; fenced, it leases them again as soon as it may,
            # so a lease granted while the write is still in write(2) shows up as its
            # last-instant read being stale.
            mode = "direct" if fault == "host-odirect" else "buffered"
            files = self.rng.sample(self.sim.workload.files, 2)
            self._holders(fault, 1, files, 3.0)
            peer = self._peer(fault, "hw", [
                "host-write", self.sim.export, "--mode", mode, "--writes", "3",
                "--files", ",".join(_file_arg(f) for f in files),
                "--writer-id", str(self._writer()), "--seed", str(self.rng.randrange(1 << 30)),
                "--stall-min-ms", "50", "--stall-max-ms", "900"])
            self._count(fault, peer.name)
        elif fault == "restart-guest-write-in-flight":
            self._restart_with_guest_write(fault)
        elif fault == "restart-host-write-in-flight":
            self._restart_with_host_write(fault)
        elif fault == "namespace-churn":
            self._churn(fault, self.rng.uniform(1.5, 3.0))

    def _writer(self) -> int:
        self._k += 1
        return PEER_WRITER_BASE + self._k

    def _token(self) -> list[str]:
        return list(self.sim.token_args)

    def _peer(self, fault: str, short: str, argv: list[str], **kw) -> _Peer:
        self._k += 1
        peer = _Peer(fault, f"{short}{self._k}", argv, self.peer_dir, **kw)
        self.peers.append(peer)
        return peer

    def _holders(self, fault: str, count: int, files, for_s: float, signal_: bool = False) -> _Peer:
        argv = ["silent-holders", self.sim.address, *self._token(), "--count", str(count),
                "--for", f"{for_s:.2f}", "--files", ",".join(_file_arg(f) for f in files),
                "--bound-ms", f"{self.bound_ms:.0f}"]
        return self._peer(fault, "sh", argv + (["--signal"] if signal_ else []), watch=signal_)

    def _churn(self, fault: str, for_s: float) -> None:
        k = self._k + 1
        side = f"side-{k}.dat"
        ids = f"{SIDE_FILE_BASE + 2 * k},{SIDE_FILE_BASE + 2 * k + 1}"
        dirs = f".,{CHURN_DIR}"
        common = ["--for", f"{for_s:.2f}", "--dirs", dirs, "--file-ids", ids, "--side", side]
        changer = self._peer(fault, "nc", ["namespace-churn", self.sim.address, *self._token(),
                                           *common, "--writer-id", str(self._writer()),
                                           "--seed", str(self.rng.randrange(1 << 30))])
        self._peer(fault, "nr", ["name-reader", self.sim.address, *self._token(), *common])
        self.side_files += [(side, SIDE_FILE_BASE + 2 * k),
                            (f"{CHURN_DIR}/{side}", SIDE_FILE_BASE + 2 * k + 1)]
        self._count(fault, changer.name)

    def _restart(self) -> None:
        """Kill the host (SIGKILL) and start it again on the same export."""
        killed = time.monotonic_ns()
        self._restarting = True
        self._event("kill", self.sim.host.name)
        try:
            self.sim.host.stop(signal.SIGKILL)
            _unmount_leftover_binds(self.sim.export)
            self.sim.start_host()
        finally:
            self._restarting = False
        self._event("ready", self.sim.host.name)
        self.restarts.append((killed, time.monotonic_ns()))

    def _restart_with_guest_write(self, fault: str) -> None:
        """A silent holder leases a file; a library guest writes it (the write waits
        for the recall); while that write is in flight, restart the host."""
        f = self.rng.choice(self.sim.workload.files)
        holder = self._holders(fault, 1, [f], 3.0, signal_=True)
        writer = self._peer(fault, "iw", ["inflight-writes", self.sim.address, *self._token(),
                                          "--file", _file_arg(f), "--writes", "2",
                                          "--writer-id", str(self._writer())],
                            watch=True, stdin=True)
        state = {"go": False, "inflight_at": None}

        def step(now: float) -> bool:
            if not state["go"]:
                if holder.said("HOLDING") and writer.said("READY"):
                    writer.tell("GO")
                    state["go"] = True
                return False
            if writer.said("DONE 1"):
                self._not_achieved(fault, "the write finished before the restart")
                return True
            if state["inflight_at"] is None:
                if writer.said("INFLIGHT 1"):
                    state["inflight_at"] = now
                return False
            if now - state["inflight_at"] < 0.15:  # surely at the host, waiting for the recall
                return False
            self._restart()
            self._count(fault, writer.name)
            return True

        self._machines.append(_Machine(fault, time.monotonic() + 10.0, step))

    def _restart_with_host_write(self, fault: str) -> None:
        """A host-local write stalled inside write(2) (userfaultfd), the host killed and
        restarted while it is; the write lands a second after the new host is up."""
        # One of the least read files: a guest writing it while the write holds its
        # inode lock would stall the daemon itself (its pwrite waits for the lock),
        # and a daemon stuck so cannot die until the lock is let go.
        f = self.rng.choice(self.sim.workload.files[-6:])
        mode = self.rng.choice(("buffered", "direct"))
        # A silent holder of the file: it leases it again from the new host, and its
        # last-instant read is stale if the write lands while that lease is live.
        self._holders(fault, 1, [f], 5.0)
        writer = self._peer(fault, "hw", [
            "host-write", self.sim.export, "--mode", mode, "--writes", "1", "--hold",
            "--files", _file_arg(f), "--writer-id", str(self._writer()),
            "--seed", str(self.rng.randrange(1 << 30))], watch=True, stdin=True)
        state = {"killed": None, "ready": None, "released": False}

        def step(now: float) -> bool:
            if state["killed"] is None:
                if writer.popen.poll() is not None:
                    self._not_achieved(fault, "the writer exited (no userfaultfd?)")
                    return True
                if not writer.said("INSIDE"):
                    return False
                state["killed"] = now
                self._restarting = True
                self._event("kill", self.sim.host.name)
                self.sim.host.popen.send_signal(signal.SIGKILL)
                return False
            if state["ready"] is None:
                if self.sim.host.popen.poll() is None:
                    if now - state["killed"] > 2.0 and not state["released"]:
                        # The dying daemon waits for the inode lock the writer holds.
                        self.notes.append(f"{fault}: the killed daemon could not exit while "
                                          f"{writer.name} held the inode lock; released it")
                        writer.tell("RELEASE")
                        state["released"] = True
                    return False
                killed_ns = int(state["killed"] * 1e9)
                try:
                    self.sim.host.stop(signal.SIGKILL)
                    _unmount_leftover_binds(self.sim.export)
                    self.sim.start_host()
                finally:
                    self._restarting = False
                self._event("ready", self.sim.host.name)
                self.restarts.append((killed_ns, time.monotonic_ns()))
                state["ready"] = time.monotonic()
                if state["released"]:
                    self._not_achieved(fault, "the write had landed before the new host was up")
                    return True
                self._count(fault, writer.name)
                return False
            if now - state["ready"] < 1.0:  # the fault's length: guests lease again meanwhile
                return False
            writer.tell("RELEASE")
            self._event(fault + ": write released", writer.name)
            return True

        self._machines.append(_Machine(fault, time.monotonic() + 20.0, step))

    def _continue(self, proc) -> None:
        proc.popen.send_signal(signal.SIGCONT)
        self._event("resume-guest", proc.name)

    def settle(self, timeout: float = 60.0) -> list[str]:
        """Resume every stopped guest, finish the multi-step faults, wait for the
        fuzzers and the peers; returns why any peer failed."""
        for _, proc in self._resume:
            self._continue(proc)
        self._resume.clear()
        deadline = time.monotonic() + timeout
        for _, fault in self.schedule:
            self.notes.append(f"{fault}: not injected (due after a restart under way, "
                              f"when the run had ended)")
        self.schedule.clear()
        while self._machines and time.monotonic() < deadline:
            self(self.duration)  # their steps need no schedule
            time.sleep(0.05)  # a poll, like the coordinator's loop
        for machine in self._machines:
            self._not_achieved(machine.fault, "the run ended first")
        self._machines.clear()
        for thread in self._fuzzers:
            thread.join(30)
        failures = []
        for peer in self.peers:
            why = peer.finish(max(1.0, deadline - time.monotonic()))
            if why:
                failures.append(why)
        return failures


def _file_arg(spec) -> str:
    return f"{spec.path}:{spec.file_id}:{spec.blocks}"


def _efbig_probe(run_dir: str) -> str | None:
    """None if a write at the failing peer's offset fails with EFBIG on this file
    system (ext4 does), else why the failing-write class cannot run here."""
    from workload.chaos_peers import FAILING_OFFSET

    path = os.path.join(run_dir, "efbig-probe")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        os.pwrite(fd, b"x", FAILING_OFFSET)
        return f"this file system accepts a write at offset {FAILING_OFFSET}"
    except OSError as exc:
        if exc.errno == 27:  # EFBIG
            return None
        return f"a write at offset {FAILING_OFFSET} fails with {exc.strerror}, not EFBIG"
    finally:
        os.close(fd)
        os.unlink(path)


def _unmount_leftover_binds(export: str) -> None:
    """A host killed with SIGKILL leaves its private bind of the export (fanotify
    detector) behind; detach it, so the next host binds the export and not a stack."""
    from host import bindmount

    for _ in range(8):
        try:
            if bindmount.find_mount(export).mount_point != os.path.realpath(export):
                return
            bindmount.unmount(export)
        except OSError:
            return


def _quiet_fuzz(address: str, frames: int, seed: int) -> None:
    try:
        fuzz.fuzz(address, frames, seed)
    except OSError:
        pass  # the host was being restarted: the frames had nowhere to go


def final_reads(sim: Simulation, extra: list[tuple[str, int]] = ()) -> list[ReadRecord]:
    """Every block of every file (the workload's and `extra`: (path, file_id)), read
    directly from the export after the run."""
    records = []
    files = [(spec.path, spec.file_id) for spec in sim.workload.files] + list(extra)
    for path, file_id in files:
        try:
            with open(os.path.join(sim.export, path), "rb") as f:
                data = f.read()
        except FileNotFoundError:
            continue  # a side file whose first rename never happened
        now = time.monotonic_ns()
        for block in range(len(data) // stamps.BLOCK_SIZE):
            chunk = data[block * stamps.BLOCK_SIZE:(block + 1) * stamps.BLOCK_SIZE]
            try:
                s = stamps.parse_block(chunk)
                records.append(ReadRecord("final", file_id, block, s.writer, s.seq, now, now,
                                          False, block, None))
            except stamps.CorruptBlock as exc:
                records.append(ReadRecord("final", file_id, block, -1, -1, now, now, False,
                                          block, exc.kind))
    return records


# --- one run ------------------------------------------------------------------------------------


def run_one(args, console: Console | None = None) -> ChaosReport:
    """One seeded chaos run (args as `cleanlease chaos` parses them); prints its table."""
    console = console or Console()
    detector = getattr(args, "detector", "auto")
    classes = tuple(getattr(args, "faults", None) or FAULTS)
    opts = SimOptions(workload=args.workload, guests=args.guests, duration=args.duration,
                      seed=args.seed, lease_term_ms=args.lease_term, ack_timeout_ms=args.ack_timeout,
                      detector=detector, keep=args.keep, tcp=args.tcp)
    workload = make_workload(args.workload, opts.guests)
    sim = Simulation(workload, args.policy, opts, args.workdir)
    injector = _Injector(sim, args.seed, args.duration, args.mean_gap, classes,
                         args.lease_term, args.ack_timeout)
    try:
        sim.start()
        injector.plan()
        injector.start_probe()
        sim.go()
        with console.status(f"chaos, seed {args.seed}: {len(injector.schedule)} faults over "
                            f"{args.duration:.0f} s"):
            sim.wait_done(during=injector)
            peer_failures = injector.settle()
        finals = final_reads(sim, injector.side_files)
        peer_records = read_logs([p.log for p in injector.peers])
        peer_stats = [(p, p.result()) for p in injector.peers if os.path.exists(p.stats)]
    except BaseException:
        injector.settle(timeout=10)
        sim.abort()
        _unmount_leftover_binds(sim.export)
        raise
    records = sim.records()
    try:
        run = sim.finish(extra_records=finals + peer_records)
    finally:
        _unmount_leftover_binds(sim.export)
        if not args.keep:
            shutil.rmtree(sim.run_dir, ignore_errors=True)
    report = _report(args, injector, run, records + peer_records, finals, peer_stats,
                     peer_failures, sim.detector)
    _print(console, report)
    broken = report.broken()
    if broken:
        console.print(f"[red]chaos, seed {args.seed}: a promise broke:[/red]")
        for line in broken:
            console.print(f"  broken: {line}")
        if report.worst_write_stall_ms > report.stall_bound_ms:
            console.print(f"  worst stall: {report.worst_write_stall_what}, "
                          f"{report.worst_stall_context}")
        for line in dict.fromkeys(report.stale_examples):
            console.print("  " + line)
    else:
        console.print(f"[green]chaos, seed {args.seed}: all promises held[/green]")
    for line in dict.fromkeys(report.unheld_examples):
        console.print("  not held (documented): " + line)
    return report


def run(args) -> int:
    """`cleanlease chaos`: one seed (or `args.seeds`), exit status 1 if a promise broke."""
    seeds = getattr(args, "seeds", None) or [args.seed]
    console = Console()
    if not console.is_terminal:
        console = Console(width=110)
    reports = []
    for seed in seeds:
        args.seed = seed
        reports.append(run_one(args, console))
    if len(reports) > 1:
        _print_summary(console, reports)
    ok = all(r.ok for r in reports)
    console.print("[green]chaos: all promises held[/green]" if ok
                  else "[red]chaos: a promise broke[/red]")
    return 0 if ok else 1


# --- the report -------------------------------------------------------------------------------


def _unheld_host_writes(peer_stats, restarts) -> set[tuple[int, int, int, int]]:
    """(file, block, writer, seq) of the host-local writes whose fd was opened before
    the daemon serving when they landed had started, and that were still in write(2)
    when it came up: such a write raises no event for that daemon (docs/kernel.md,
    "write through an fd opened before the daemon started": not held, IN_MODIFY
    recalls it after the fact)."""
    unheld = set()
    for peer, st in peer_stats:
        if st.get("kind") != "host-write":
            continue
        for file_id, block, seq, opened, _, end in st.get("detail", ()):
            if any(opened < ready and end > killed for killed, ready in restarts):
                unheld.add((file_id, block, st["writer"], seq))
    return unheld


def _held_check(records, unheld):
    """The checker's verdict with the `unheld` writes' versions possible (as for an
    'uncertain' write) but never a reason to call another read stale."""
    import dataclasses

    from workload.checker import check

    return check([dataclasses.replace(r, via="uncertain")
                  if isinstance(r, WriteRecord) and r.via == "host-local"
                  and (r.file_id, r.block, r.writer, r.seq) in unheld else r
                  for r in records])


def _report(args, injector: _Injector, run, records, finals, peer_stats, peer_failures,
            detector: str) -> ChaosReport:
    unheld = _unheld_host_writes(peer_stats, injector.restarts)
    held = _held_check(records + finals, unheld) if unheld else run.check
    final = held.per_actor.get("final")
    lost = final.stale_reads if final else 0
    stale = held.stale_ops - (final.stale_ops if final else 0)
    by_kind = {"guests": 0, "holders": 0, "holders across a restart": 0, "other peers": 0}
    for actor, counts in held.per_actor.items():
        if actor == "final":
            continue
        kind = ("holders across a restart" if actor.endswith("+restart") else
                "holders" if actor.startswith("sh") else
                "guests" if actor in {a.name for a in injector.sim.workload.guests}
                else "other peers")
        by_kind[kind] += counts.stale_ops
    every_final = run.check.per_actor.get("final")
    stale_unheld = (run.check.stale_ops - (every_final.stale_ops if every_final else 0)) - stale
    writes = [r for r in records if isinstance(r, WriteRecord)]
    # One entry per guest write operation: (start, end) of the whole call.
    guests = {a.name for a in injector.sim.workload.guests}
    ops = {(r.actor, r.start_ns, r.end_ns, f"{r.actor} write of file {r.file_id}")
           for r in writes if r.via == "guest" and r.actor in guests}
    for peer, st in peer_stats:
        for start, end in st.get("modifications", ()):
            ops.add((peer.name, start, end, f"{peer.name} ({peer.fault})"))
    own = _own_fault_intervals(injector.log)
    calm, across_restart, own_fault = [], [], []
    # A restarted daemon lets no modification land for one term after it is
    # ready (host/boot.py): that wait is the restart's, like the reconnect.
    grace_ns = int(1e9 * term_end(0.0, args.lease_term / 1000))
    for actor, start, end, what in ops:
        if any(start < ready + grace_ns and end > killed for killed, ready in injector.restarts):
            across_restart.append(end - start)
        elif any(start <= until and end >= since for since, until in own.get(actor, ())):
            own_fault.append(end - start)
        else:
            calm.append((end - start, what, start))
    uncertain = {(r.actor, r.start_ns) for r in writes if r.via == "uncertain"}
    errors: dict[str, int] = {}
    for a in run.actors:
        for key, n in a.get("errors", {}).items():
            kind = key.split(":")[0]
            errors[kind] = errors.get(kind, 0) + n
    torn, unexplained = corrupt_reads(records, writes)
    # A stall over the bound by no more than the daemon's own silence meanwhile (its
    # slowest answer to the probe's heartbeats), with no host-local write inside
    # write(2) to block it, was the daemon not being run (CPU), not the protocol
    # waiting: reported on its own row.  Every other one breaks the promise.
    starved, held_to_bound = [], []
    for item in calm:
        duration, _, start = item
        excess_ms = duration / 1e6 - injector.bound_ms
        if excess_ms > 0:
            lag, blocked = _daemon_lag(start, start + duration, peer_stats)
            if lag is not None and excess_ms <= lag and not blocked:
                starved.append((excess_ms, lag))
                continue
        held_to_bound.append(item)
    worst = max(held_to_bound, default=(0, "", 0))
    t0 = injector.sim.t0
    worst_context = _stall_context(worst, injector.log, peer_stats, t0) if calm else ""
    r = ChaosReport(
        seed=args.seed, duration=args.duration, detector=detector, faults=dict(injector.faults),
        not_achieved=dict(injector.not_achieved), skipped=dict(injector.skipped),
        reads=sum(a.get("reads", 0) for a in run.actors),
        stale_reads=stale, stale_by_reader=by_kind,
        worst_stale_ms=held.worst_stale_age_ns / 1e6 if stale else 0.0,
        stale_examples=[_describe(e, injector.log, t0) for e in held.examples[:5]],
        stale_unheld=stale_unheld, unheld_host_writes=len(unheld),
        unheld_examples=[_describe(e, injector.log, t0) for e in run.check.examples
                         if (e.overwrite.file_id, e.overwrite.block, e.overwrite.writer,
                             e.overwrite.seq) in unheld][:3],
        lost_writes=lost, corrupt=unexplained + held.phantom + held.future,
        torn_by_host_race=torn,
        writes=len(calm), worst_write_stall_ms=worst[0] / 1e6,
        worst_write_stall_what=(f"{worst[1]} at +{(worst[2] - t0) / 1e9:.2f} s" if calm else ""),
        worst_stall_context=worst_context,
        over_bound=sum(1 for d, _, _ in held_to_bound if d / 1e6 > injector.bound_ms),
        starved_stalls=len(starved),
        worst_starved=(max(starved) if starved else (0.0, 0.0)),
        stall_bound_ms=injector.bound_ms,
        own_fault_writes=len(own_fault), worst_own_fault_ms=max(own_fault, default=0) / 1e6,
        restart_writes=len(across_restart),
        worst_restart_stall_ms=max(across_restart, default=0) / 1e6,
        uncertain_writes=len(uncertain),
        daemon_crashes=injector.crashes, peer_failures=list(peer_failures), op_errors=errors,
        notes=list(injector.notes))
    r.peer_modifications = sum(len(st.get("modifications", ())) for _, st in peer_stats)
    lags = sorted(ms for _, st in peer_stats if st.get("kind") == "probe" for _, ms in st["samples"])
    if lags:
        r.heartbeat_p99_ms = lags[int(0.99 * (len(lags) - 1))]
        r.heartbeat_max_ms = lags[-1]
    r.load = os.getloadavg()[0]
    for peer, st in peer_stats:
        kind = st.get("kind")
        if kind == "silent-holders":
            r.holder_sessions += st["sessions"]
            r.owed_sessions += st["owed_sessions"]
            r.fences_learned += st["fences_learned"]
            r.lost_while_owed += st["lost_while_owed"]
            r.never_fenced += st["never_fenced"]
            r.fenced_unowed += st["fenced_unowed"]
            r.renewed_while_owed += st["renewed_while_owed"]
            r.last_instant_reads += st["last_instant_reads"]
            r.worst_fence_learned_ms = max([r.worst_fence_learned_ms, *st["fence_learned_ms"]])
        elif kind == "failing-write":
            r.failing_writes += 1
            if st["interrupted"] and not st["done"]:
                r.failing_interrupted += 1
                continue
            r.failing_efbig += st["efbig"]
            r.failing_published += st["generation_published"]
            r.failing_clean_again += st["clean_again"]
            if st["clean_ms"] is not None:
                r.worst_clean_again_ms = max(r.worst_clean_again_ms, st["clean_ms"])
        elif kind == "host-write":
            r.host_writes[st["mode"]] = r.host_writes.get(st["mode"], 0) + st["writes"]
            r.host_writes_stalled += st["stalled"]
            r.worst_host_write_in_syscall_ms = max([r.worst_host_write_in_syscall_ms,
                                                    *st["in_syscall_ms"]])
            if st["uffd"] != "ok":
                r.notes.append(f"{peer.name}: userfaultfd {st['uffd']}: writes not stalled")
        elif kind == "namespace-churn":
            r.renames += st["renames"]
            r.name_changes += st["renames"] + st["creates"] + st["unlinks"]
        elif kind == "name-reader":
            r.name_reads += st["reads"]
    r.peer_reads = sum(1 for x in records if isinstance(x, ReadRecord)
                       and x.actor[:2] in ("sh", "fw", "nr")) - r.last_instant_reads
    return r


def _daemon_lag(start: int, end: int, peer_stats) -> tuple[float | None, bool]:
    """(the probe's slowest heartbeat reply sent in [start, end], in ms, or None;
    whether a host-local write was inside write(2) meanwhile)."""
    lag = max((ms for _, st in peer_stats if st.get("kind") == "probe"
               for sent, ms in st["samples"] if start <= sent <= end), default=None)
    blocked = any(pw < end and e > start for _, st in peer_stats if st.get("kind") == "host-write"
                  for _, _, _, _, pw, e in st.get("detail", ()))
    return lag, blocked


def _stall_context(worst, log, peer_stats, t0: int) -> str:
    """What else went on while the worst stall lasted: the faults injected from a
    second before it to its end, and the host-local writes inside write(2) meanwhile
    (a guest WRITE to a file such a write holds the inode lock of waits in the
    daemon's pwrite)."""
    duration, _, start = worst
    end = start + duration

    def at(ns: int) -> str:
        return f"+{(ns - t0) / 1e9:.3f}s"

    near = [f"{fault} {target} {at(t)}" for t, fault, target in log
            if start - 1_000_000_000 <= t <= end]
    writes = [f"{peer.name} file {file_id} in write(2) {at(pw)}..{at(e)}"
              for peer, st in peer_stats if st.get("kind") == "host-write"
              for file_id, _, _, _, pw, e in st.get("detail", ()) if pw < end and e > start]
    lag = max((ms for peer, st in peer_stats if st.get("kind") == "probe"
               for sent, ms in st["samples"] if start <= sent <= end), default=None)
    return (f"from {at(start)} to {at(end)}; faults: {', '.join(near) or 'none'}; host-local "
            f"writes in write(2) meanwhile: {', '.join(writes) or 'none'}; the daemon's slowest "
            f"heartbeat reply meanwhile: "
            f"{'none measured' if lag is None else f'{lag:.0f} ms'}")


def _describe(example, log, t0: int) -> str:
    """One stale read as a trace: what was read, what had replaced it, and the faults
    injected around it (times relative to the first record)."""
    def at(ns: int) -> str:
        return f"+{(ns - t0) / 1e9:.3f}s"

    read, version, overwrite = example.read, example.version, example.overwrite
    v = (f"written by {version.actor} ({version.via}) {at(version.start_ns)}..{at(version.end_ns)}"
         if version else "the initial content")
    near = [f"{fault} {target} {at(t)}" for t, fault, target in log
            if abs(t - read.start_ns) < 3e9]
    return (f"stale: {read.actor} read file {read.file_id} block {read.block} "
            f"{at(read.start_ns)}..{at(read.end_ns)} (hit={read.hit}) returned "
            f"{read.writer}/{read.seq}, {v}; replaced by {overwrite.writer}/{overwrite.seq} "
            f"from {overwrite.actor} ({overwrite.via}) {at(overwrite.start_ns)}.."
            f"{at(overwrite.end_ns)}, {example.age_ns / 1e6:.1f} ms before the read; "
            f"faults nearby: {', '.join(near) or 'none'}")


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
    table = Table(title=f"chaos, seed {r.seed}, {r.duration:.0f} s, detector {r.detector}",
                  title_justify="left")
    table.add_column("what")
    table.add_column("count", justify="right")
    for name in FAULTS:
        if name in r.skipped:
            table.add_row(f"faults injected: {name}", "skipped")
        elif name in r.faults:
            extra = f" (+{r.not_achieved[name]} not achieved)" if r.not_achieved.get(name) else ""
            table.add_row(f"faults injected: {name}", f"{r.faults[name]}{extra}")
    table.add_row("guest reads checked", str(r.reads))
    table.add_row("peer reads checked (+ silent holders' last-instant reads)",
                  f"{r.peer_reads} (+{r.last_instant_reads})")
    k = r.stale_by_reader
    table.add_row("stale reads (guests / silent holders / other peers)",
                  f"{r.stale_reads - k.get('holders across a restart', 0)} ({k.get('guests', 0)}"
                  f" / {k.get('holders', 0)} / {k.get('other peers', 0)})")
    table.add_row("stale reads of a lease granted before a host restart, within its term",
                  str(k.get("holders across a restart", 0)))
    table.add_row("host writes opened before the daemon came up (not held, docs/kernel.md) "
                  "/ stale after them",
                  f"{r.unheld_host_writes} / {r.stale_unheld}")
    table.add_row("lost writes (final read stale)", str(r.lost_writes))
    table.add_row("corrupt, phantom or future blocks", str(r.corrupt))
    table.add_row("torn blocks a host-local write overlapped (ext4 pread; allowed)",
                  str(r.torn_by_host_race))
    table.add_row("modifications held to the bound (guest writes, peers' changes)",
                  f"{r.writes}")
    table.add_row("worst stall (ms); stalls over the bound",
                  f"{r.worst_write_stall_ms:.0f}; {r.over_bound}")
    table.add_row("over the bound by less than the daemon's own silence then (CPU): n; "
                  "worst excess / silence (ms)",
                  f"{r.starved_stalls}; {r.worst_starved[0]:.0f} / {r.worst_starved[1]:.0f}")
    table.add_row("bound: ack timeout + lease term + clock margin (ms)", f"{r.stall_bound_ms:.0f}")
    table.add_row("guest writes whose own guest was stopped or cut", str(r.own_fault_writes))
    table.add_row("worst of those (ms, its own stop or reconnect included)",
                  f"{r.worst_own_fault_ms:.0f}")
    table.add_row("modifications across a host restart (or its one-term grace)",
                  str(r.restart_writes))
    table.add_row("worst of those (ms, restart and reconnect included)",
                  f"{r.worst_restart_stall_ms:.0f}")
    table.add_row("writes that ended OutcomeUnknown ('uncertain')", str(r.uncertain_writes))
    table.add_row("silent sessions owing an ACK / fence learned by heartbeat / lost in restart",
                  f"{r.owed_sessions} / {r.fences_learned} / {r.lost_while_owed}")
    table.add_row("worst invalidation -> fence learned (ms)", f"{r.worst_fence_learned_ms:.0f}")
    table.add_row("renewals while an ACK was owed; sessions never fenced",
                  f"{r.renewed_while_owed}; {r.never_fenced + r.fenced_unowed}")
    done = r.failing_writes - r.failing_interrupted
    table.add_row("failing writes: EFBIG / new generation / CLEAN again (of done)",
                  f"{r.failing_efbig} / {r.failing_published} / {r.failing_clean_again} "
                  f"(of {done})")
    table.add_row("host-local writes: O_DIRECT / buffered (stalled in write(2))",
                  f"{r.host_writes.get('direct', 0)} / {r.host_writes.get('buffered', 0)} "
                  f"({r.host_writes_stalled})")
    table.add_row("worst host-local write in write(2) (ms)",
                  f"{r.worst_host_write_in_syscall_ms:.0f}")
    table.add_row("namespace changes (renames over a name) / name reads",
                  f"{r.name_changes} ({r.renames}) / {r.name_reads}")
    table.add_row("the daemon's heartbeat replies: p99 / max (ms); load average at the end",
                  f"{r.heartbeat_p99_ms:.0f} / {r.heartbeat_max_ms:.0f}; {r.load:.1f}")
    table.add_row("daemon crashes", str(r.daemon_crashes))
    table.add_row("peer failures", str(len(r.peer_failures)))
    for kind, n in sorted(r.op_errors.items()):
        table.add_row(f"operations failed ({kind}, reported to the caller)", str(n))
    console.print(table)
    for note in r.notes:
        console.print(f"  note: {note}")
    for failure in r.peer_failures:
        console.print(f"  [red]peer failure:[/red] {failure}")


def _print_summary(console: Console, reports: list[ChaosReport]) -> None:
    table = Table(title=f"chaos: {len(reports)} seeds", title_justify="left")
    table.add_column("")
    for r in reports:
        table.add_column(f"seed {r.seed}", justify="right")

    def row(label, value):
        table.add_row(label, *(value(r) for r in reports))

    for name in FAULTS:
        row(name, lambda r, n=name: "skipped" if n in r.skipped else str(r.faults.get(n, 0)))
    row("stale reads", lambda r: str(r.stale_reads
                                     - r.stale_by_reader.get("holders across a restart", 0)))
    row("stale: lease from before a restart",
        lambda r: str(r.stale_by_reader.get("holders across a restart", 0)))
    row("stale after unheld host writes (documented)", lambda r: str(r.stale_unheld))
    row("lost writes", lambda r: str(r.lost_writes))
    row("corrupt / phantom", lambda r: str(r.corrupt))
    row("worst stall / bound (ms)",
        lambda r: f"{r.worst_write_stall_ms:.0f} / {r.stall_bound_ms:.0f}")
    row("uncertain writes", lambda r: str(r.uncertain_writes))
    row("daemon crashes", lambda r: str(r.daemon_crashes))
    row("promises", lambda r: "held" if r.ok else "BROKEN")
    console.print(table)


# --- python -m workload.chaos --seeds 1,2,3 ---------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """`cleanlease chaos`'s options, and --seeds LIST (one table per seed and a summary),
    --faults LIST (a subset of the classes) and --detector."""
    from workload.cli import build_parser

    extra = argparse.ArgumentParser(add_help=False)
    extra.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",") if x])
    extra.add_argument("--faults", type=lambda s: tuple(x for x in s.split(",") if x))
    extra.add_argument("--detector", default="auto",
                       choices=("auto", "none", "fanotify", "inotify"))
    known, rest = extra.parse_known_args(argv)
    for name in known.faults or ():
        if name not in FAULTS:
            raise SystemExit(f"unknown fault class {name!r}; choose from: {', '.join(FAULTS)}")
    args = build_parser().parse_args(["chaos", *rest])
    args.seeds, args.faults, args.detector = known.seeds, known.faults, known.detector
    args.workdir = args.workdir or tempfile.mkdtemp(prefix="cleanlease-chaos-")
    os.makedirs(args.workdir, exist_ok=True)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
