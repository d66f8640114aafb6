"""What keeping a DIRTY inode's pre-content events on costs host-local writers.

`python -m workload.host_write_cost [--ops N] [--rounds R]` (root, ext4 under
/tmp, Linux 6.14+).  docs/kernel.md, "Re-arming while a host write is in
flight", explains why the events stay on and quotes a run of this.

A real `cleanlease host --detector fanotify` serves a temporary export; a
guest (a GuestClient in this process) leases `export/dirty`, and a host-local
write then recalls the lease: the inode is DIRTY and stays so for the whole
run (`--clean-after` 10 minutes, so no flush re-arms it).  One writer process
then times N `pwrite`s and N `pread`s per round, each of them the same call
on three files, one after the other in the same round:

* `dirty`: the DIRTY inode.  Every call raises a pre-content event that the
  daemon answers at once (recording the thread for a write).  This is the
  cost of the fix.
* `marked`: `export/cooled`, an inode no guest knows, which carries the
  daemon's ignore mark after its first access.  The kernel path is the one a
  DIRTY inode took before the fix (mount mark + ignore mark: no event).
* `unmarked`: a file next to the export, not under the marked bind mount at
  all (no fanotify on the way).

It prints the mean µs per call of each (the median over the rounds), the
ratio dirty / marked (what the fix costs against the old behaviour), and
dirty / unmarked.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import statistics
import sys
import tempfile

from guest.client import GuestClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Reads "PATH OP SIZE N" lines; for each, opens PATH, makes the call once
# (the first call on an inode no guest knows cools it; on the leased one it
# recalls), then times N more and prints the mean ns per call.
TIMER = r"""
import os, sys, time
for line in sys.stdin:
    path, op, size, n = line.split()
    size, n = int(size), int(n)
    fd = os.open(path, os.O_RDWR)
    span = max(os.fstat(fd).st_size // size, 1)
    buf = b"w" * size
    call = (lambda off: os.pwrite(fd, buf, off)) if op == "pwrite" else (lambda off: os.pread(fd, size, off))
    call(0)
    t0 = time.perf_counter_ns()
    for i in range(n):
        call((i % span) * size)
    t1 = time.perf_counter_ns()
    os.close(fd)
    print((t1 - t0) / n, flush=True)
"""


async def run(ops: int, rounds: int) -> int:
    base = tempfile.mkdtemp(prefix="cleanlease-cost-", dir="/tmp")
    export = os.path.join(base, "export")
    os.mkdir(export)
    files = {"dirty": os.path.join(export, "dirty"), "marked": os.path.join(export, "cooled"),
             "unmarked": os.path.join(base, "unmarked")}
    for path in files.values():
        with open(path, "wb") as f:
            f.write(b"o" * (1 << 20))
    sock = os.path.join(base, "host.sock")
    host = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "workload.cli", "host", "--export", export, "--listen",
        f"unix:{sock}", "--detector", "fanotify", "--clean-after", "600000", cwd=ROOT,
        stdout=asyncio.subprocess.PIPE)
    timer = guest = None
    try:
        ready = (await asyncio.wait_for(host.stdout.readline(), 30)).decode()
        if not ready.startswith("READY"):
            print(f"host did not start: {ready!r}", file=sys.stderr)
            return 1
        guest = await GuestClient.connect(f"unix:{sock}", name="cost")
        await guest.lease_root()
        handle = await guest.open("dirty")
        await guest.read(handle, 0, 4096)
        if not (await guest.read(handle, 0, 4096)).hit:
            print("the guest holds no lease on export/dirty", file=sys.stderr)
            return 1
        timer = await asyncio.create_subprocess_exec(
            sys.executable, "-c", TIMER, cwd="/", stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE)

        async def mean_ns(path: str, op: str, size: int, n: int) -> float:
            timer.stdin.write(f"{path} {op} {size} {n}\n".encode())
            await timer.stdin.drain()  # the loop keeps running: the guest ACKs the recall
            return float(await asyncio.wait_for(timer.stdout.readline(), 600))

        await mean_ns(files["dirty"], "pwrite", 4096, 1)  # the recall: DIRTY from now on
        if (await guest.read(handle, 0, 4096)).hit:
            print("export/dirty was not recalled", file=sys.stderr)
            return 1
        cases = [("pwrite", 4096, ops), ("pread", 4096, ops), ("pwrite", 1 << 20, max(ops // 64, 8))]
        results: dict[tuple, list[float]] = {}
        for _ in range(rounds):
            for op, size, n in cases:
                for kind, path in files.items():
                    results.setdefault((op, size, kind), []).append(
                        await mean_ns(path, op, size, n))
        if (await guest.read(handle, 0, 4096)).hit:
            print("export/dirty was re-armed during the run: figures are void", file=sys.stderr)
            return 1
        print(f"{ops} calls per 4 KiB case, {max(ops // 64, 8)} per 1 MiB case, {rounds} rounds; "
              "mean us per call, median over the rounds")
        print(f"{'call':16} {'dirty (events on)':>18} {'marked (before)':>16} {'unmarked':>9} "
              f"{'dirty/marked':>13} {'dirty/unmarked':>15}")
        for op, size, _ in cases:
            us = {kind: statistics.median(results[(op, size, kind)]) / 1000 for kind in files}
            label = f"{op} {size // 1024} KiB" if size < 1 << 20 else f"{op} {size >> 20} MiB"
            print(f"{label:16} {us['dirty']:18.2f} {us['marked']:16.2f} {us['unmarked']:9.2f} "
                  f"{us['dirty'] / us['marked']:13.2f} {us['dirty'] / us['unmarked']:15.2f}")
        return 0
    finally:
        if timer is not None:
            timer.stdin.close()
            await timer.wait()
        if guest is not None:
            await guest.close()
        if host.returncode is None:
            host.send_signal(signal.SIGTERM)
            await host.wait()
        shutil.rmtree(base, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ops", type=int, default=20000, help="calls per 4 KiB case and round")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    return asyncio.run(run(args.ops, args.rounds))


if __name__ == "__main__":
    sys.exit(main())
