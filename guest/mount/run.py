"""Running a mount from the command line, and measuring one."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time

from guest.mount.core import GuestMount
from guest.mount.state import MountClient


async def open_mount(address: str, mountpoint: str, *, name: str, token: bytes | None = None,
                     request_timeout: float = 30.0, **options) -> GuestMount:
    """Connect to the host as `name`, mount the export at `mountpoint` (GuestMount
    `options`), and let SIGTERM/SIGINT stop the mount.  Returns the started mount;
    its client is `mount.client`.  Raises what MountClient.connect and
    GuestMount.start raise; the connection is closed then."""
    client = await MountClient.connect(address, name=name, request_timeout=request_timeout,
                                       reconnect=False, token=token)
    mount = GuestMount(client, mountpoint, **options)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, mount.request_stop, f"signal {signum}")
    try:
        await mount.start()
    except BaseException:
        await client.close()
        raise
    return mount


async def run_mount(address: str, mountpoint: str, *, name: str = "mount",
                    stats_path: str | None = None, request_timeout: float = 30.0,
                    token: bytes | None = None, source: str = "cleanlease") -> int:
    """Connect, mount, print `READY <mountpoint> ...`, serve until SIGINT/SIGTERM or
    until the host goes away; then unmount.  Returns the exit status."""
    if not os.path.isdir(mountpoint):
        raise SystemExit(f"cleanlease guest: --mount {mountpoint!r} is not a directory")
    # Fault injection for tests: hold every READ reply (an INVALIDATE then
    # arrives while the kernel still waits for the READ of the same pages).
    delay = float(os.environ.get("CLEANLEASE_MOUNT_READ_DELAY_MS", "0")) / 1000.0
    # ... and leave tainted pages for the next GETATTR to drop (docs/mount.md, R4).
    hold_purges = os.environ.get("CLEANLEASE_MOUNT_HOLD_PURGES") == "1"
    mount = await open_mount(address, mountpoint, name=name, token=token,
                             request_timeout=request_timeout, stats_path=stats_path,
                             read_delay=delay, hold_purges=hold_purges, source=source)
    client = mount.client
    print(f"READY {mount.mountpoint} policy={client.policy.label} guest={client.hello.guest_id}",
          flush=True)
    await mount.stop_requested.wait()
    reason = mount.stop_reason
    await mount.stop()
    await client.close()
    if mount.watchdog_fired:  # (it may have looked like the kernel ending the connection)
        reason = mount.watchdog_fired
    print(f"cleanlease guest: unmounted {mount.mountpoint}: {reason}", file=sys.stderr, flush=True)
    return 0 if reason.startswith(("signal", "the kernel")) else 1


# --- measuring -------------------------------------------------------------------------------


def cached_read_throughput(mount_file: str, host_file: str, *, rounds: int = 5,
                           chunk: int = 1 << 20) -> dict:
    """Cached-read throughput through a mount against reading the host file directly.

    Both files are read once to warm the caches (the guest's kernel page cache
    through the mount, the host's page cache directly); then each is read
    whole `rounds` times, opening it each time.  Returns MB/s for both and
    their ratio.  For `cleanlease bench` to wire in.
    """

    def read_all(path: str) -> int:
        total = 0
        fd = os.open(path, os.O_RDONLY)
        try:
            while True:
                data = os.read(fd, chunk)
                if not data:
                    return total
                total += len(data)
        finally:
            os.close(fd)

    def measure(path: str) -> tuple[float, int]:
        read_all(path)
        started = time.perf_counter()
        total = sum(read_all(path) for _ in range(rounds))
        return time.perf_counter() - started, total

    mount_s, mount_bytes = measure(mount_file)
    host_s, host_bytes = measure(host_file)
    size = os.stat(host_file).st_size
    mount_mbps = mount_bytes / mount_s / 1e6 if mount_s else 0.0
    host_mbps = host_bytes / host_s / 1e6 if host_s else 0.0
    return {"file_bytes": size, "rounds": rounds, "chunk": chunk,
            "mount_MBps": round(mount_mbps, 1), "host_MBps": round(host_mbps, 1),
            "mount_vs_host": round(mount_mbps / host_mbps, 3) if host_mbps else 0.0}
