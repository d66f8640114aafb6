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
    loop: str = "uvloop"
    trace: str | None = None
    workdir: str | None = None  # where exports and logs go (a real file system)
    keep: bool = False


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


def run_policy(workload: Workload, policy: str, opts: SimOptions, workdir: str,
               progress=None) -> PolicyRun:
    """Run `workload` under `policy` with real processes; return the checked figures.

    Raises SimulationError if any process fails; every process is stopped.
    """
    run_dir = tempfile.mkdtemp(prefix=f"{policy}-", dir=workdir)
    export = os.path.join(run_dir, "export")
    os.mkdir(export)
    populate(export, workload)
    sock = os.path.join(run_dir, "host.sock")
    host_stats = os.path.join(run_dir, "host.json")
    common = ["--loop", opts.loop]
    workload_args = ["--workload", opts.workload, "--guests", str(opts.guests),
                     "--host-writers", str(opts.host_writers), "--seed", str(opts.seed),
                     "--duration", str(opts.duration)]
    if opts.trace:
        workload_args += ["--trace", opts.trace]
    procs: list[ChildProcess] = []
    host = ChildProcess("host", _command("host", "--export", export, "--listen", f"unix:{sock}",
                                  "--policy", policy, "--stats", host_stats,
                                  "--lease-term", str(opts.lease_term_ms),
                                  "--ack-timeout", str(opts.ack_timeout_ms),
                                  "--clean-after", str(opts.clean_after_ms),
                                  "--detector", opts.detector, *common),
                 os.path.join(run_dir, "host.err"), stdin=False)
    try:
        ready = host.wait_for_line("READY", 30)
        detector = ready.rpartition("detector=")[2] or "none"
        actors = []
        for actor in workload.actors:
            log = os.path.join(run_dir, f"{actor.name}.log")
            stats = os.path.join(run_dir, f"{actor.name}.json")
            if actor.host_local:
                argv = _command("writer", "--export", export, "--actor", actor.name,
                                "--log", log, "--stats", stats, *workload_args, *common)
            else:
                argv = _command("guest", "--connect", f"unix:{sock}", "--actor", actor.name,
                                "--log", log, "--stats", stats,
                                "--cache-bytes", str(opts.cache_bytes), *workload_args, *common)
            procs.append(ChildProcess(actor.name, argv, os.path.join(run_dir, f"{actor.name}.err"),
                               stdin=True))
            actors.append((actor, log, stats))
        for proc in procs:
            proc.wait_for_line("READY", 60)
        t0 = time.monotonic_ns() + 50_000_000
        for proc in procs:
            proc.tell(f"GO {t0}")
        deadline = time.monotonic() + opts.duration + 120
        waiting = list(procs)
        while waiting:
            if time.monotonic() > deadline:
                names = ", ".join(p.name for p in waiting)
                raise SimulationError(f"{names} still running 120 s after the workload's end")
            if progress:
                progress(min(1.0, (time.monotonic_ns() - t0) / 1e9 / opts.duration))
            # Wait (a tenth of a second at most, for the progress bar) for DONE lines.
            for proc in _readable(waiting, 0.1):
                proc.wait_for_line("DONE", 1)
                waiting.remove(proc)
        elapsed = (time.monotonic_ns() - t0) / 1e9  # GO to the last DONE
        for proc in procs:
            proc.tell("EXIT")
        for proc in procs:
            try:
                proc.popen.wait(30)
            except subprocess.TimeoutExpired:
                raise SimulationError(f"{proc.name} did not exit after EXIT{proc.tail()}") from None
        for proc in procs:
            if proc.popen.returncode != 0:
                raise SimulationError(f"{proc.name} exited with {proc.popen.returncode}{proc.tail()}")
    finally:
        for proc in procs:
            proc.stop(signal.SIGKILL if proc.popen.poll() is None else signal.SIGTERM)
        code = host.stop()
    if code != 0:
        raise SimulationError(f"host exited with {code}{host.tail()}")
    records = read_logs([log for _, log, _ in actors])
    guest_names = [a.name for a, _, _ in actors if not a.host_local]
    result = PolicyRun(
        policy=policy, workload=workload.name,
        check=check(records),
        oracle=oracle(records, opts.cache_bytes, actors=guest_names),
        host=json.load(open(host_stats)),
        actors=[json.load(open(stats)) for _, _, stats in actors],
        elapsed_s=elapsed, detector=detector)
    if not opts.keep:
        shutil.rmtree(run_dir, ignore_errors=True)
    return result
