"""`cleanlease mount ADDR MNT`: the command people use (workload/mount_command.py).

A real host process; the command backgrounds a real mount process, which
findmnt and df describe, and which unmounts cleanly on SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from guest.fuse_device import is_mountpoint_of_fuse, umount, unavailable_reason
from tests.conftest import ROOT, wait_until

_why = unavailable_reason()
pytestmark = pytest.mark.skipif(_why is not None, reason=f"FUSE mount not possible: {_why}")

CLI = [sys.executable, "-m", "workload.cli", "mount"]


def test_mount_in_the_background_then_a_clean_unmount_on_sigterm(export, start_host, tmp_path):
    _, address = start_host(export, "--detector", "none")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    done = subprocess.run(CLI + [address, str(mnt)], capture_output=True, text=True,
                          timeout=60, cwd=ROOT)
    try:
        assert done.returncode == 0, done.stderr
        assert "policy clean-lease" in done.stdout and is_mountpoint_of_fuse(str(mnt))
        pid = int(done.stdout.split("pid ")[1].split(")")[0])
        found = subprocess.run(["findmnt", "-n", "-o", "SOURCE,FSTYPE", str(mnt)],
                               capture_output=True, text=True, timeout=10).stdout.split()
        assert found == [address, "fuse.cleanlease"]
        (mnt / "f").write_bytes(b"through the mount")
        assert (export / "f").read_bytes() == b"through the mount"
        os.kill(pid, signal.SIGTERM)
        wait_until(lambda: not is_mountpoint_of_fuse(str(mnt)), 10, "the unmount")
    finally:
        if is_mountpoint_of_fuse(str(mnt)):
            umount(str(mnt))


def test_a_host_that_is_not_there_is_a_clear_error(tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    done = subprocess.run(CLI + [f"unix:{tmp_path}/none.sock", str(mnt)], capture_output=True,
                          text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 1 and "Is a host serving there" in done.stderr, done.stderr
    assert not is_mountpoint_of_fuse(str(mnt))
    missing = subprocess.run(CLI + ["unix:/x", str(tmp_path / "nodir")], capture_output=True,
                             text=True, timeout=60, cwd=ROOT)
    assert missing.returncode != 0 and "mkdir -p" in missing.stderr
