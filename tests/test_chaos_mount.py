"""A short `cleanlease chaos-mount` run (workload/chaos_mount.py): one seed, real processes.

A host, three mounted guests, and per mount applications reading through
pread(2), a shared and a private read-only mapping, and writing; a host-local
writer.  Mount guests get their connection cut, are stopped and resumed, and
are killed, at seeded instants.  Each test below checks one of the promises
on the same run (made once for the module).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from guest.fuse_device import unavailable_reason
from tests.conftest import ROOT, unmount_binds_under

_why = unavailable_reason()
pytestmark = pytest.mark.skipif(_why is not None, reason=f"FUSE mount not possible: {_why}")

SEED, DURATION_S = 4, 12


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The report of one seeded run, as the command wrote it (--json)."""
    workdir = tmp_path_factory.mktemp("chaos-mount")
    out = workdir / "report.json"
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "workload.cli", "chaos-mount", "--seeds", str(SEED),
             "--duration", str(DURATION_S), "--workdir", str(workdir), "--json", str(out)],
            cwd=ROOT, capture_output=True, text=True, timeout=150)
    finally:
        unmount_binds_under(workdir)  # the command leaves none; if it crashed, neither do we
    assert out.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    [report] = json.loads(out.read_text())
    report["output"] = proc.stdout
    report["returncode"] = proc.returncode
    return report


def _why_not(report) -> str:
    return "\n".join(report["broken"]) + "\n" + report["output"][-4000:]


def test_every_fault_class_was_injected(run):
    for fault, n in run["faults"].items():
        assert n >= 1, f"{fault} was never injected\n{run['output'][-3000:]}"
    assert run["incarnations"] > 3  # the guests that ended were replaced
    for kind, n in run["reads"].items():
        assert n > 500, f"only {n} {kind} reads\n{run['output'][-3000:]}"


def test_no_read_through_read2_is_stale_and_no_write_is_lost(run):
    assert run["stale"]["pread"] == 0, _why_not(run)
    assert run["final_blocks"] == 24 and run["lost_writes"] == 0, _why_not(run)
    assert run["corrupt"] == 0, _why_not(run)


def test_every_writer_stall_is_within_the_bound_and_nothing_is_left_blocked(run):
    assert run["calm_writes"] > 50
    assert run["worst_stall_ms"] <= run["bound_ms"], _why_not(run)
    assert not run["stuck_apps"], _why_not(run)
    assert not run["app_failures"], _why_not(run)
    assert not run["host_crashed"], _why_not(run)


def test_no_application_read_stale_bytes_after_the_watchdog_fired(run):
    """The fault model's promise for stopped and dead guests: once the term has
    run out (the watchdog fired), no mapping serves old bytes."""
    assert run["mapping_stale"].get("after-watchdog", 0) == 0, _why_not(run)


@pytest.mark.xfail(reason="a window remains for host-local writes: a mount that read the "
                          "inode while the write's recall ran is recalled again only once the "
                          "kernel landed the write (docs/design.md, tainted holders); the "
                          "DIRECT_IO and guest-write windows this test found are closed",
                   strict=False)
def test_no_read_through_a_mapping_is_stale(run):
    assert run["stale"]["mmap-shared"] == 0 and run["stale"]["mmap-private"] == 0, _why_not(run)


def test_every_promise_held_but_the_mapping_finding(run):
    """What the command's exit status says, less the stale mapping reads (xfail above)."""
    mappings_only = run["stale"]["pread"] == 0
    others = [b for b in run["broken"] if not (mappings_only and " stale reads (" in b)]
    assert others == [], _why_not(run)


# --- the finding, on its own ---------------------------------------------------------------

from tests.conftest import Child, wait_until  # noqa: E402
from tests.test_mount import mount_guest, pwrite  # noqa: E402,F401  (a fixture)

_MAPPER = """
import mmap, os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
m = mmap.mmap(fd, 4096, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ)
print("OPEN", flush=True)
for line in sys.stdin:
    print((m[:16] if line.strip() == "map" else os.pread(fd, 16, 0)).hex(), flush=True)
"""


def test_a_private_mapping_of_a_file_opened_without_a_lease_sees_a_later_write(
        export, start_host, mount_guest):  # noqa: F811
    """What the chaos run's stale mapping reads come down to (seeds 2 and 3 at 20 s,
    docs/reliability.md).  A file opened while its inode is DIRTY gets no grant, so
    the mount opens it FOPEN_DIRECT_IO; a MAP_PRIVATE mapping of it still faults its
    pages in through the page cache, with a READ on that handle whose reply is
    unleased.  The guest marks the inode tainted but drops nothing, and a later write
    to the DIRTY inode lands without a recall: read(2) on the same descriptor sees
    it, the mapping keeps the old bytes (measured: still after 3 s, three terms).
    Fixed: the guest drops a tainted inode's pages after an unleased READ on a
    DIRECT_IO handle too (this test was a strict xfail before the fix)."""
    (export / "f").write_bytes(b"A" * 4096)
    _, address = start_host(export, "--clean-after", "600000", "--lease-term", "1000",
                            "--ack-timeout", "300")
    a, w = mount_guest(address, "a"), mount_guest(address, "w")
    # DIRTY from now on (no fsync, no idle flush for 10 min): no lease.
    pwrite(w.path("f"), 0, b"B" * 4096, fsync=False)
    mapper = Child([sys.executable, "-c", _MAPPER, a.path("f")], "mapper")
    try:
        assert mapper.line().strip() == "OPEN"

        def ask(what: str) -> bytes:
            mapper.proc.stdin.write(what.encode() + b"\n")
            mapper.proc.stdin.flush()
            return bytes.fromhex(mapper.line().strip())

        assert ask("map") == b"B" * 16  # faulted in: a READ on the DIRECT_IO handle
        stats = a.stats()
        assert stats["opens_direct"] >= 1 and stats["opens_cached"] == 0
        pwrite(w.path("f"), 0, b"C" * 4096, fsync=False)  # DIRTY: nothing is recalled
        assert ask("pread") == b"C" * 16  # read(2) through the same descriptor sees it
        wait_until(lambda: ask("map") == b"C" * 16, timeout=3.0,
                   what="the private mapping to show the completed write")
    finally:
        mapper.stop()
