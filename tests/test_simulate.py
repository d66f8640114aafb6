"""Whole simulations with real processes: the checker's verdicts per policy.

Short runs (about a second of workload each), so the suite stays fast; the
figures in docs/results.md come from `make results`, not from here.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from protocol.messages import Policy
from workload.simulate import SimOptions, run_policy
from workload.workloads import make_workload

COHERENT = ("never", "open-lease", "clean-lease")
GUEST_WRITERS_ONLY = ("read-mostly", "held-open-writer", "log-append", "ping-pong", "build")


def simulate(tmp_path, workload: str, policy: str, duration: float = 1.0, **extra):
    opts = SimOptions(workload=workload, duration=duration, seed=1, **extra)
    wl = make_workload(workload, opts.guests, opts.host_writers)
    return run_policy(wl, policy, opts, str(tmp_path))


@pytest.mark.parametrize("workload", GUEST_WRITERS_ONLY)
@pytest.mark.parametrize("policy", COHERENT)
def test_coherent_policies_have_no_stale_reads_with_guest_writers(tmp_path, workload, policy):
    run = simulate(tmp_path, workload, policy)
    assert run.check.reads > 0
    assert sum(run.check.corrupt.values()) == 0 and run.check.phantom == 0
    assert run.check.stale_ops == 0, run.check.examples
    if policy == "never":
        assert all(a["hits"] == 0 for a in run.actors if "hits" in a)


@pytest.mark.parametrize("workload", ["read-mostly", "host-edit"])
@pytest.mark.parametrize("policy", ["ttl", "always"])
def test_checker_catches_staleness_of_ttl_and_always(tmp_path, workload, policy):
    """The positive control: policies that do not invalidate are caught serving stale data."""
    run = simulate(tmp_path, workload, policy, duration=2.0)
    assert run.check.stale_ops > 0
    assert run.check.worst_stale_age_ns > 0


def test_simulate_cli_prints_tables_and_writes_json_and_plot(tmp_path):
    out = tmp_path / "out.json"
    png = tmp_path / "out.png"
    proc = subprocess.run(
        [sys.executable, "-m", "workload.cli", "simulate", "--workload", "read-mostly",
         "--policies", "never,clean-lease", "--duration", "1", "--json", str(out),
         "--plot", str(png), "--workdir", str(tmp_path / "work")],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "caching and coherence per policy" in proc.stdout
    data = json.loads(out.read_text())
    policies = {p["summary"]["policy"]: p["summary"] for p in data["policies"]}
    assert set(policies) == {"never", "clean-lease"}
    assert policies["clean-lease"]["hit_rate"] > 0
    assert policies["never"]["hit_rate"] == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_simulate_over_tcp_with_a_token(tmp_path):
    """The same guests over loopback TCP, each authenticating with a fresh token."""
    proc = subprocess.run(
        [sys.executable, "-m", "workload.cli", "simulate", "--workload", "ping-pong",
         "--duration", "1", "--tcp", "--workdir", str(tmp_path / "work"), "--keep",
         "--json", str(tmp_path / "out.json")],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "guests connect over: loopback TCP, token-authenticated" in proc.stdout
    (summary,) = [p["summary"] for p in json.loads((tmp_path / "out.json").read_text())["policies"]]
    assert summary["reads"] > 0 and summary["stale_reads"] == 0
    (run_dir,) = (tmp_path / "work").iterdir()
    host = json.loads((run_dir / "host1.json").read_text())
    assert host["sessions"] >= 2 and host["auth_failures"] == 0 and host["requests"] > 0
    assert (run_dir / "token").stat().st_mode & 0o777 == 0o600


def test_simulate_refuses_unknown_workload_and_policy_with_the_choices():
    for args, word in ((["--workload", "nope"], "read-mostly"), (["--policy", "nope"], "clean-lease")):
        proc = subprocess.run([sys.executable, "-m", "workload.cli", "simulate", *args],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode != 0
        assert word in proc.stderr


def test_trace_replay(tmp_path):
    trace = tmp_path / "t.jsonl"
    lines = [{"files": [{"path": "a.dat", "blocks": 2}]}]
    for i in range(20):
        lines.append({"t_ms": i * 5, "actor": "g0", "op": "read", "file": 0, "block": 0, "nblocks": 2})
        lines.append({"t_ms": i * 5 + 2, "actor": "g1", "op": "read", "file": 0, "block": 0,
                      "nblocks": 2})
    lines.append({"t_ms": 50, "actor": "g0", "op": "write", "file": 0, "block": 1})
    trace.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    opts = SimOptions(workload="trace", trace=str(trace), duration=1.0)
    wl = make_workload("trace", 2, trace=str(trace))
    assert [a.name for a in wl.actors] == ["g0", "g1"]
    run = run_policy(wl, Policy.CLEAN_LEASE.label, opts, str(tmp_path))
    assert run.check.reads == 80
    assert run.check.stale_ops == 0
    assert sum(a["hits"] for a in run.actors) > 0


def test_trace_errors_name_the_line(tmp_path):
    trace = tmp_path / "bad.jsonl"
    trace.write_text('{"files": [{"path": "a", "blocks": 1}]}\n{"t_ms": 1, "actor": "x1", "op": "read", "file": 0}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: actor must be"):
        make_workload("trace", 1, trace=str(trace))


def test_workload_schedules_are_seeded_and_repeatable():
    wl = make_workload("read-mostly", 3)
    a = wl.schedule(wl.actors[0], 7, 1.0)
    assert a == wl.schedule(wl.actors[0], 7, 1.0)
    assert a != wl.schedule(wl.actors[0], 8, 1.0)
    assert a != wl.schedule(wl.actors[1], 7, 1.0)
