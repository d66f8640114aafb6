"""An ACK from a mount means the kernel dropped its copy (issue 11, item 4).

The mount here runs in the test process (guest/mount/core.py's GuestMount on a
real /dev/fuse, against a real `cleanlease host` process), so that a test can
put it into the states a stopping mount goes through: its notifier threads
busy and then shut down, its /dev/fuse closed.  Every file access on the
mount happens in child processes, served by the test's event loop.  The
writer is a scripted guest process: its WRITE returns only once the host has
either an ACK from the mount or has fenced it.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import threading
import time

import pytest

from guest.fuse_device import unavailable_reason
from guest.mount import NOTIFIER_THREADS, GuestMount, MountClient

_why = unavailable_reason()
pytestmark = pytest.mark.skipif(_why is not None, reason=f"FUSE mount not possible: {_why}")

WAIT = 10.0
ACK_TIMEOUT_MS, TERM_MS = 300, 1000


async def _until(predicate, what: str, timeout: float = WAIT) -> None:
    """Wait, serving the mount meanwhile, until `predicate()` (state only seen by polling)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


async def _cat(path: str) -> bytes:
    proc = await asyncio.create_subprocess_exec("cat", path, stdout=subprocess.PIPE,
                                                stderr=subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), WAIT)
    assert proc.returncode == 0, err
    return out


class _Mounted:
    """A GuestMount in this process; `close` takes it down whatever state it is in."""

    def __init__(self, address: str, mountpoint):
        self.address, self.mountpoint = address, str(mountpoint)
        os.makedirs(self.mountpoint, exist_ok=True)

    async def __aenter__(self) -> GuestMount:
        client = await MountClient.connect(self.address, name="m", reconnect=False,
                                           request_timeout=WAIT)
        self.mount = GuestMount(client, self.mountpoint)
        await self.mount.start()
        return self.mount

    async def __aexit__(self, *exc) -> None:
        mount = self.mount
        if mount.connection is not None and not mount.dev.closed:
            mount.dev.abort(mount.connection)  # nothing may wait on us after this
        await asyncio.wait_for(mount.stop(timeout=1.0), WAIT)
        await mount.client.close()


def _leased_file(export, start_host, start_guest):
    (export / "f").write_bytes(b"old " * 256)
    _, address = start_host(export, "--ack-timeout", str(ACK_TIMEOUT_MS),
                            "--lease-term", str(TERM_MS))
    writer = start_guest(address, "W")
    writer.do(op="open", path="f", mode="rw")
    return address, writer


async def _lease(mount: GuestMount) -> None:
    path = os.path.join(mount.mountpoint, "f")
    assert await _cat(path) == b"old " * 256
    assert await _cat(path) == b"old " * 256
    assert mount.stats.opens_cached >= 1  # the kernel caches f under a lease


def test_a_notification_cancelled_while_the_mount_stops_is_not_acked(export, start_host,
                                                                     start_guest, tmp_path):
    """stop() shuts the notifier down with cancel_futures: a notification still
    queued then never reaches the kernel, whose pages stay.  Forced here: every
    notifier thread is busy when the recall arrives, so its notification waits
    in the queue, and the shutdown cancels it.  Failed before the fix: the
    cancelled notification was ACKed, and the write went ahead at once."""
    address, writer = _leased_file(export, start_host, start_guest)

    async def scenario():
        async with _Mounted(address, tmp_path / "mnt") as mount:
            await _lease(mount)
            release = threading.Event()
            busy = [mount.notifier.submit(release.wait) for _ in range(NOTIFIER_THREADS)]
            loop = asyncio.get_running_loop()
            started = time.monotonic()
            write = loop.run_in_executor(None, lambda: writer.do(op="write", path="f",
                                                                 data="NEW!"))
            try:
                await _until(lambda: mount.stats.invalidations == 1, "the recall")
                mount.notifier.shutdown(wait=False, cancel_futures=True)  # as stop() does
            finally:
                release.set()
            await asyncio.wait_for(write, WAIT)
            waited = time.monotonic() - started
            assert all(f.done() for f in busy)
            assert mount.client.acks_sent == 0, "a cancelled notification was ACKed"
            assert mount.stats.acks_withheld == 1 and mount.stats.notify_errors == 1
            # The host fenced the mount instead (ack timeout, then its term).
            assert waited >= ACK_TIMEOUT_MS / 1000.0, waited

    asyncio.run(scenario())


def test_an_invalidation_after_the_mount_stopped_is_not_acked(export, start_host, start_guest,
                                                              tmp_path):
    """Between GuestMount.stop() and the client's close (run_mount) the session
    is still up.  An INVALIDATE then finds the notifier shut down and /dev/fuse
    closed: no notification can be written, so no ACK, and the session carries
    on.  Failed before the fix: submitting to the shut-down notifier raised
    inside the client's data_received, which killed the session."""
    address, writer = _leased_file(export, start_host, start_guest)

    async def scenario():
        async with _Mounted(address, tmp_path / "mnt") as mount:
            await _lease(mount)
            await mount.stop()
            session = mount.client.session
            loop = asyncio.get_running_loop()
            await asyncio.wait_for(loop.run_in_executor(
                None, lambda: writer.do(op="write", path="f", data="NEW!")), WAIT)
            assert not session.lost, "the INVALIDATE broke the session"
            assert mount.stats.invalidations == 1
            assert mount.client.acks_sent == 0 and mount.stats.acks_withheld == 1

    asyncio.run(scenario())


def test_enoent_from_the_kernel_is_a_successful_purge_and_is_acked(export, start_host,
                                                                   start_guest, tmp_path):
    """FUSE_NOTIFY_INVAL_ENTRY for a name the kernel never looked up answers
    ENOENT (fuse_reverse_inval_entry finds no dentry): nothing is cached, and
    that is an ACK.  Here: the mount lists the root (a lease on it, no dentry
    for the new name), then a host-local process creates a file there."""
    address, _ = _leased_file(export, start_host, start_guest)

    async def scenario():
        async with _Mounted(address, tmp_path / "mnt") as mount:
            proc = await asyncio.create_subprocess_exec("ls", mount.mountpoint,
                                                        stdout=subprocess.PIPE)
            assert (await asyncio.wait_for(proc.communicate(), WAIT))[0] == b"f\n"
            acks = mount.client.acks_sent
            (export / "new").write_bytes(b"n")
            await _until(lambda: mount.client.acks_sent > acks, "the ACK of INVAL_ENTRY")
            assert mount.stats.inval_entries >= 1
            assert mount.stats.notify_nothing_cached >= 1
            assert mount.stats.acks_withheld == 0 and mount.stats.notify_errors == 0

    asyncio.run(scenario())
