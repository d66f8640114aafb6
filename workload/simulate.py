"""`cleanlease simulate`: real processes, one workload, one or more policies.

For each policy: a fresh export directory on a real file system, filled with
stamped initial blocks; one `cleanlease host` process; one `cleanlease guest`
process per guest actor and one `cleanlease writer` process per host-local
actor.  Every process says READY when prepared; then all are told GO with the
same start instant.  When the actors are done the host is stopped, the
operation logs are merged, the checker and the oracle run, and the figures
go into a `PolicyRun` for the report.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

from protocol.auth import write_token_file
from workload import stamp as stamps
from workload.checker import check
from workload.oplog import read_logs
from workload.oracle import oracle
from workload.workloads import Workload


class SimulationError(RuntimeError):
    """A process of the simulation failed; the message says which and what it printed."""


@dataclass
class SimOptions:
    workload: str
    guests: int = 3
    host_writers: int = 0
    duration: float = 5.0
    seed: int = 1
    cache_bytes: int = 64 << 20
    lease_term_ms: int = 2000
    ack_timeout_ms: int = 500
    clean_after_ms: int = 20
    detector: str = "auto"
    granularity: str = "range"  # the host's --granularity
    loop: str = "uvloop"
    trace: str | None = None
    workdir: str | None = None  # where exports and logs go (a real file system)
    keep: bool = False
    mount: bool = False  # each guest actor through its own FUSE mount (workload/mount_agent.py)
    tcp: bool = False  # loopback TCP with a token (protocol/auth.py) instead of a Unix socket


@dataclass
class PolicyRun:
    policy: str
    workload: str
    check: object
    oracle: object
    host: dict
    actors: list[dict]
    elapsed_s: float
    detector: str = "none"
    notes: list[str] = field(default_factory=list)


def _command(*args: str) -> list[str]:
    return [sys.executable, "-m", "workload.cli", *args]


def populate(export: str, workload: Workload) -> None:
    """Write every file's initial content (writer 0, seq 0) and flush it, so the
    run starts from clean inodes."""
    for spec in workload.files:
        path = os.path.join(export, spec.path)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        data = b"".join(stamps.make_block(stamps.Stamp.initial(spec.file_id, b))
                        for b in range(spec.blocks))
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)


class ChildProcess:
    """A child process whose stdout we read line by line, and stderr goes to a file."""

    def __init__(self, name: str, argv: list[str], stderr_path: str, stdin: bool):
        self.name = name
        self.stderr_path = stderr_path
        self._stderr = open(stderr_path, "wb")
        self.popen = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=self._stderr,
                                      stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                                      env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def wait_for_line(self, prefix: str, timeout: float) -> str:
        """Return the first stdout line starting with `prefix`; raise SimulationError
        if the process exits or says nothing of the kind within `timeout`."""
        deadline = time.monotonic() + timeout
        out = self.popen.stdout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise SimulationError(f"{self.name} did not print {prefix!r} within {timeout:.0f}s"
                                      f"{self.tail()}")
            ready, _, _ = select.select([out], [], [], remaining)
            if ready:
                line = out.readline().decode(errors="replace")
                if not line:
                    self.popen.wait()
                    raise SimulationError(f"{self.name} exited with {self.popen.returncode} "
                                          f"before {prefix!r}{self.tail()}")
                if line.startswith(prefix):
                    return line.strip()

    def tell(self, line: str) -> None:
        self.popen.stdin.write(line.encode() + b"\n")
        self.popen.stdin.flush()

    def tail(self, lines: int = 15) -> str:
        self._stderr.flush()
        try:
            with open(self.stderr_path, errors="replace") as f:
                text = f.read().strip().splitlines()[-lines:]
        except OSError:
            return ""
        return ("; its stderr ends:\n    " + "\n    ".join(text)) if text else ""

    def stop(self, sig=signal.SIGTERM, timeout: float = 10.0) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self._stderr.close()
        return self.popen.returncode


def _readable(procs: list[ChildProcess], timeout: float) -> list[ChildProcess]:
    ready, _, _ = select.select([p.popen.stdout for p in procs], [], [], timeout)
    return [p for p in procs if p.popen.stdout in ready]


class Simulation:
    """One workload under one policy, step by step (for `run_policy` and for chaos).

    start() -> go() -> wait_done() -> finish(); `restart_host()` may be called
    while the actors run.  Every process is stopped by finish() or abort().
    """

    def __init__(self, workload: Workload, policy: str, opts: SimOptions, workdir: str):
        if opts.mount:
            from guest.fuse_device import unavailable_reason

            why = unavailable_reason()
            if why:
                raise SimulationError(f"--mount: cannot mount: {why}")
        self.workload, self.policy, self.opts = workload, policy, opts
        self.run_dir = tempfile.mkdtemp(prefix=f"{policy}-", dir=workdir)
        self.export = os.path.join(self.run_dir, "export")
        os.mkdir(self.export)
        populate(self.export, workload)
        self.address = f"unix:{os.path.join(self.run_dir, 'host.sock')}"
        self.token_args: list[str] = []
        if opts.tcp:
            # Port 0 the first time; a restarted host takes the port the first one bound.
            self.address = "tcp:127.0.0.1:0"
            token_file = os.path.join(self.run_dir, "token")
            write_token_file(token_file)
            self.token_args = ["--token-file", token_file]
        self.host: ChildProcess | None = None
        self.hosts = 0
        self.detector = "none"
        self.procs: list[ChildProcess] = []
        self.actors: list[tuple] = []
        self.mountpoints: dict[str, str] = {}  # with opts.mount: actor name -> its mountpoint
        self.t0 = 0
        self.elapsed = 0.0

    def _host_stats(self, incarnation: int) -> str:
        return os.path.join(self.run_dir, f"host{incarnation}.json")

    def start_host(self) -> ChildProcess:
        """Start a host on the simulation's socket (again, after a crash) and wait for READY."""
        o = self.opts
        self.hosts += 1
        self.host = ChildProcess(
            f"host{self.hosts}",
            _command("host", "--export", self.export, "--listen", self.address,
                     "--policy", self.policy, "--stats", self._host_stats(self.hosts),
                     "--lease-term", str(o.lease_term_ms), "--ack-timeout", str(o.ack_timeout_ms),
                     "--clean-after", str(o.clean_after_ms), "--detector", o.detector,
                     "--granularity", o.granularity,
                     "--loop", o.loop, *self.token_args),
            os.path.join(self.run_dir, f"host{self.hosts}.err"), stdin=False)
        ready = self.host.wait_for_line("READY", 30)
        self.address = ready.split()[1]
        said = dict(word.split("=", 1) for word in ready.split() if "=" in word)
        self.detector = said.get("detector", "none")
        return self.host

    def start(self) -> None:
        """Start the host and every actor; return when all are READY."""
        o = self.opts
        self.start_host()
        workload_args = ["--workload", o.workload, "--guests", str(o.guests),
                         "--host-writers", str(o.host_writers), "--seed", str(o.seed),
                         "--duration", str(o.duration), "--loop", o.loop]
        if o.trace:
            workload_args += ["--trace", o.trace]
        for actor in self.workload.actors:
            log = os.path.join(self.run_dir, f"{actor.name}.log")
            stats = os.path.join(self.run_dir, f"{actor.name}.json")
            if actor.host_local:
                argv = _command("writer", "--export", self.export, "--actor", actor.name,
                                "--log", log, "--stats", stats, *workload_args)
            else:
                mount = []
                if o.mount:
                    # A private mountpoint: the actor's system calls go to files under it.
                    mountpoint = os.path.join(self.run_dir, f"mnt-{actor.name}")
                    os.mkdir(mountpoint)
                    self.mountpoints[actor.name] = mountpoint
                    mount = ["--mount", mountpoint]
                argv = _command("guest", "--connect", self.address, *self.token_args, *mount,
                                "--actor", actor.name, "--log", log, "--stats", stats,
                                "--cache-bytes", str(o.cache_bytes), *workload_args)
            self.procs.append(ChildProcess(actor.name, argv,
                                           os.path.join(self.run_dir, f"{actor.name}.err"),
                                           stdin=True))
            self.actors.append((actor, log, stats))
        for proc in self.procs:
            proc.wait_for_line("READY", 60)

    def go(self) -> None:
        self.t0 = time.monotonic_ns() + 50_000_000
        for proc in self.procs:
            proc.tell(f"GO {self.t0}")

    def guest_procs(self) -> list[ChildProcess]:
        return [p for p, (a, _, _) in zip(self.procs, self.actors) if not a.host_local]

    def wait_done(self, progress=None, during=None) -> None:
        """Wait for every actor's DONE (`during(seconds_since_go)` runs every 0.1 s at most)."""
        deadline = time.monotonic() + self.opts.duration + 120
        waiting = list(self.procs)
        while waiting:
            if time.monotonic() > deadline:
                names = ", ".join(p.name for p in waiting)
                raise SimulationError(f"{names} still running 120 s after the workload's end")
            since = (time.monotonic_ns() - self.t0) / 1e9
            if progress:
                progress(min(1.0, since / self.opts.duration))
            if during:
                during(since)
            for proc in _readable(waiting, 0.1):
                proc.wait_for_line("DONE", 1)
                waiting.remove(proc)
            if self.mountpoints:
                self._check_mount_actors(waiting)
        self.elapsed = (time.monotonic_ns() - self.t0) / 1e9  # GO to the last DONE

    def finish(self, extra_records=()) -> PolicyRun:
        """Let the actors exit, stop the host, check the logs (and `extra_records`, such
        as chaos's final reads); raise SimulationError on failure."""
        try:
            for proc in self.procs:
                proc.tell("EXIT")
            for proc in self.procs:
                try:
                    proc.popen.wait(30)
                except subprocess.TimeoutExpired:
                    raise SimulationError(f"{proc.name} did not exit after EXIT{proc.tail()}") from None
            for proc in self.procs:
                if proc.popen.returncode != 0:
                    raise SimulationError(
                        f"{proc.name} exited with {proc.popen.returncode}{proc.tail()}")
        finally:
            self.abort()
        if self.host.popen.returncode != 0:
            raise SimulationError(f"host exited with {self.host.popen.returncode}{self.host.tail()}")
        return self.collect(self.records() + list(extra_records))

    def abort(self) -> None:
        if self.mountpoints:
            self._stop_mount_actors()
        for proc in self.procs:
            proc.stop(signal.SIGKILL if proc.popen.poll() is None else signal.SIGTERM)
        if self.host is not None:
            self.host.stop()

    def _check_mount_actors(self, waiting: list[ChildProcess]) -> None:
        """A mount actor killed while its actor thread waited on its own mount cannot
        finish dying (workload/mount_agent.py): say so now, not at the deadline."""
        from workload.mount_agent import leader_is_dead

        for proc in waiting:
            if (proc.name in self.mountpoints and leader_is_dead(proc.popen.pid)
                    and proc.popen.poll() is None):  # poll() reaps one that did exit
                raise SimulationError(f"{proc.name} died mid-run (killed?); a thread of it may "
                                      f"wait on its own mount{proc.tail()}")

    def _stop_mount_actors(self) -> None:
        """SIGTERM (each unmounts itself), then abort and detach what is left."""
        from workload.mount_agent import stop_mount_actors

        stop_mount_actors([(p.popen, self.mountpoints[p.name]) for p in self.procs
                           if p.name in self.mountpoints])

    def records(self) -> list:
        return read_logs([log for _, log, _ in self.actors])

    def collect(self, records=None) -> PolicyRun:
        records = self.records() if records is None else records
        guest_names = [a.name for a, _, _ in self.actors if not a.host_local]
        result = PolicyRun(
            policy=self.policy, workload=self.workload.name,
            check=check(records),
            oracle=oracle(records, self.opts.cache_bytes, actors=guest_names),
            host=json.load(open(self._host_stats(self.hosts))),
            actors=[json.load(open(stats)) for _, _, stats in self.actors],
            elapsed_s=self.elapsed, detector=self.detector)
        if not self.opts.keep:
            shutil.rmtree(self.run_dir, ignore_errors=True)
        return result


def run_policy(workload: Workload, policy: str, opts: SimOptions, workdir: str,
               progress=None) -> PolicyRun:
    """Run `workload` under `policy` with real processes; return the checked figures.

    Raises SimulationError if any process fails; every process is stopped.
    """
    sim = Simulation(workload, policy, opts, workdir)
    try:
        sim.start()
        sim.go()
        sim.wait_done(progress)
    except BaseException:
        sim.abort()
        raise
    return sim.finish()
