"""`cleanlease simulate --mount`: every guest actor through its own FUSE mount.

Each guest actor is one `cleanlease guest --mount` process
(workload/mount_agent.py): its event loop serves /dev/fuse, and an actor
thread runs the workload as system calls on files under the mountpoint.  A
read op is a hit when the mount answered no READ from its open to the end of
its pread.  Every test checks that no mount is left behind, also when a run
fails (the host goes away, an actor is killed).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from guest.fuse_device import unavailable_reason
from tests.conftest import unmount_binds_under
from workload.simulate import SimOptions, Simulation, SimulationError, run_policy
from workload.workloads import make_workload

_why = unavailable_reason()
pytestmark = pytest.mark.skipif(_why is not None, reason=f"FUSE mount not possible: {_why}")

STATS_KEYS = {"actor", "policy", "ops", "elapsed_ns", "errors", "latencies", "reads", "hits",
              "misses", "invalidations", "inval_entries", "acks", "app_read_bytes",
              "byte_hit_rate", "mount"}


def fuse_mounts_under(root) -> list[str]:
    root = os.path.realpath(root)
    with open("/proc/self/mounts") as f:
        return [parts[1] for parts in (line.split() for line in f)
                if parts[2].startswith("fuse") and parts[1].startswith(root + os.sep)]


@pytest.fixture
def workdir(tmp_path):
    """Where the runs go; whatever a failing test left mounted there comes off."""
    yield tmp_path
    unmount_binds_under(tmp_path)


def simulate(workdir, workload: str, policy: str, duration: float = 1.5, **extra):
    opts = SimOptions(workload=workload, duration=duration, seed=1, mount=True, **extra)
    wl = make_workload(workload, opts.guests, opts.host_writers)
    return run_policy(wl, policy, opts, str(workdir))


def _guests(run) -> list[dict]:
    return [a for a in run.actors if "reads" in a]


def _coherent(run) -> None:
    assert run.check.reads > 0
    assert sum(run.check.corrupt.values()) == 0 and run.check.phantom == 0
    assert run.check.future == 0
    assert run.check.stale_ops == 0, run.check.examples
    for a in _guests(run):
        assert STATS_KEYS <= set(a), STATS_KEYS - set(a)
        assert a["errors"] == {}, a["errors"]
        assert a["hits"] + a["misses"] == a["reads"] > 0
        # Hits and misses are timed apart, like agent.py's.
        assert len(a["latencies"]["read_hit"]) == a["hits"]
        assert len(a["latencies"]["read_miss"]) == a["misses"]
        # A system call cannot tell a first dirtying write: every write is "other".
        assert a["latencies"]["write_first"] == []
        # Every miss is at least one READ the kernel sent this guest's mount.
        assert a["misses"] <= a["mount"]["kernel_reads"]


@pytest.mark.parametrize("workload", ["read-mostly", "ping-pong"])
def test_simulate_mount_clean_lease_hits_and_never_does_not(workdir, workload):
    clean = simulate(workdir, workload, "clean-lease")
    _coherent(clean)
    assert sum(a["hits"] for a in _guests(clean)) > 0
    if workload == "ping-pong":  # writes through one mount recall the other's pages
        assert sum(a["invalidations"] for a in _guests(clean)) > 0
    assert fuse_mounts_under(workdir) == []

    never = simulate(workdir, workload, "never")
    _coherent(never)
    # Under `never` the mount opens every file FOPEN_DIRECT_IO (guest/mount/,
    # _open_flags) and keeps attributes and entries for 0 s: read(2) on a
    # DIRECT_IO file bypasses the page cache, even within one open, so every
    # read op sends a READ and none can hit.
    for a in _guests(never):
        m = a["mount"]
        assert a["hits"] == 0 and a["misses"] == a["reads"]
        assert m["opens_cached"] == 0 and m["cached_reads"] == 0
        assert m["direct_reads"] >= a["reads"]
    assert fuse_mounts_under(workdir) == []
    # The same schedule ran under both policies.
    assert never.check.reads == clean.check.reads


def test_simulate_mount_cli_prints_the_table(workdir):
    proc = subprocess.run(
        [sys.executable, "-m", "workload.cli", "simulate", "--mount", "--workload", "read-mostly",
         "--guests", "2", "--policies", "clean-lease", "--duration", "1",
         "--workdir", str(workdir / "work")],
        capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "caching and coherence per policy" in proc.stdout
    assert "clean-lease" in proc.stdout
    assert fuse_mounts_under(workdir) == []


@pytest.mark.parametrize("fault", ["host stops", "actor killed"])
def test_a_failed_mount_run_raises_and_leaves_no_mount(workdir, fault):
    """The host going away: every guest unmounts itself and exits 1.  An actor
    killed mid-run cannot unmount; if a thread of it was waiting on its own
    mount, or it had files open there, it cannot even finish dying (its serving
    thread is gone).  Either way the run fails promptly and abort() leaves no
    mount behind."""
    opts = SimOptions(workload="read-mostly", guests=2, duration=30.0, seed=1, mount=True)
    wl = make_workload("read-mostly", opts.guests, opts.host_writers)
    sim = Simulation(wl, "clean-lease", opts, str(workdir))
    try:
        sim.start()
        assert len(fuse_mounts_under(workdir)) == 2
        sim.go()
        time.sleep(0.5)  # well into the run: requests on the mounts are in flight
        if fault == "host stops":
            sim.host.stop()
        else:
            sim.procs[0].popen.send_signal(signal.SIGKILL)
        started = time.monotonic()
        with pytest.raises(SimulationError):
            sim.wait_done()
        assert time.monotonic() - started < 20  # not the 150 s deadline
        if fault == "actor killed":
            # g0 could not unmount itself; its watchdog detaches its mount once
            # it sees g0 die, which may or may not have happened yet.
            assert len(fuse_mounts_under(workdir)) in (1, 2)
    finally:
        sim.abort()
    assert fuse_mounts_under(workdir) == []
    assert all(p.popen.returncode is not None for p in sim.procs)
    if fault == "host stops":
        # Each actor failed: by itself (exit 1, it noticed the host was gone)
        # or stopped by abort() after the first one's failure ended the run.
        assert all(p.popen.returncode != 0 for p in sim.procs)
        assert any(p.popen.returncode == 1 for p in sim.procs)


def test_simulate_mount_without_fuse_is_a_clear_error(workdir, monkeypatch):
    import guest.fuse_device

    monkeypatch.setattr(guest.fuse_device, "unavailable_reason", lambda: "no /dev/fuse here")
    opts = SimOptions(workload="read-mostly", duration=1.0, mount=True)
    with pytest.raises(SimulationError, match="--mount: cannot mount: no /dev/fuse here"):
        Simulation(make_workload("read-mostly", 3, 0), "clean-lease", opts, str(workdir))
    assert os.listdir(workdir) == []  # nothing was created
