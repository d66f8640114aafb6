"""A restarted daemon holds host-local writes to inodes its own guests do not
know until its predecessor's leases have run out (found by `cleanlease dst`,
seed 11 of its first 600: a guest of the closed daemon, cut off and not yet
aware, served its cached copy of a file a host-local process had rewritten
through the new daemon's fanotify mark; the new daemon held guests'
modifications for the grace (host/boot.py), but its detector let a write to
an inode no guest of *this* daemon had looked up through at once).

The daemon runs in this process with the real fanotify detector on a real
bind mount; the writer is a separate process that reports CLOCK_MONOTONIC
right after its pwrite(2) returned.  No sleep decides anything: the
assertion compares that instant with the grace's end."""

from __future__ import annotations

import asyncio
import sys

import pytest

from host.boot import BootMarker

WAIT = 20.0
TERM_MS = 3000

WRITER = r"""
import os, sys, time
fd = os.open(sys.argv[1], os.O_WRONLY)
print("ready", flush=True)
sys.stdin.readline()
os.pwrite(fd, b"new", 0)
print(time.monotonic_ns(), flush=True)
"""


async def test_a_host_write_to_an_inode_no_guest_knows_waits_out_the_restart_grace(
        export, tmp_path):
    from host.fanotify_detector import FanotifyDetector
    from host.server import HostConfig, HostDaemon

    ok, why = FanotifyDetector.usable(str(export))
    if not ok:
        pytest.skip(f"fanotify detector unavailable: {why}")
    f = export / "f"
    f.write_bytes(b"old")
    marker = tmp_path / "boot"
    marker.write_text(f"running {TERM_MS}\n")  # the predecessor died with leases out
    daemon = HostDaemon(HostConfig(str(export), lease_term_ms=TERM_MS), FanotifyDetector(),
                        boot_marker=BootMarker(str(export), TERM_MS, path=str(marker)))
    await daemon.start(f"unix:{tmp_path / 'host.sock'}")
    writer = None
    try:
        assert daemon.restart_grace_left() > 0
        writer = await asyncio.create_subprocess_exec(
            sys.executable, "-c", WRITER, str(f), cwd="/", stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE)
        assert (await asyncio.wait_for(writer.stdout.readline(), WAIT)).strip() == b"ready"
        writer.stdin.write(b"go\n")
        await writer.stdin.drain()
        sent_while_in_grace = daemon.restart_grace_left() > 0
        landed_ns = int(await asyncio.wait_for(writer.stdout.readline(), WAIT))
        if not sent_while_in_grace:
            pytest.skip("this machine took the whole grace to start the writer")
        assert landed_ns / 1e9 >= daemon._grace_until, (
            "a host-local write landed while the predecessor's leases may still have been live")
        assert daemon.detector.counters["held_for_restart"] == 1
        await writer.wait()
    finally:
        if writer is not None and writer.returncode is None:
            writer.kill()
            await writer.wait()
        await daemon.close()
