"""fsx in its default mode (mapped reads and writes on) on the mount (`make fsx`).

    python -m workload.fsx                              # 100,000 ops x seeds 1 2 3, clean-lease
    python -m workload.fsx --ops 20000 --seeds 7 --policies never,always,clean-lease

Builds fsx from ../shared/thirdparty (its build.sh, out of tree under
build/thirdparty) unless it is built already.  For each policy and seed it
starts a real `cleanlease host` on a fresh export and one `cleanlease guest
--mount` of it (workload/posix.py's MountedExport), runs fsx on a file of the
mount, and stops both; plain ext4 (a directory under /tmp) runs the same
seeds first as a control.  fsx checks every read, mapped read and the file's
size against its in-memory model after random reads, writes, mapped writes
(stores then msync), truncates, fallocate modes, punch hole, zero range and
copy_file_range; it disables by itself what a file system refuses.  Prints
one row per run as it ends: file system, policy, seed, operations, result,
seconds.
Needs root and /dev/fuse.  Exit status 0 if every run passed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from workload import posix

FSX = os.path.join(posix.BUILD, "fsx")


def run_fsx(directory: str, ops: int, seed: int, label: str, timeout: float,
            extra: tuple[str, ...] = ()) -> tuple[bool, float, str]:
    """Run fsx on DIRECTORY/fsx.file; returns (passed, seconds, its last lines)."""
    started = time.monotonic()
    argv = [FSX, "-N", str(ops), "-S", str(seed), "-p", str(max(1, ops // 10)), *extra,
            "-P", directory, os.path.join(directory, "fsx.file")]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            errors="replace")
    tail: list[str] = []
    deadline = started + timeout
    try:
        for line in proc.stdout:
            tail = (tail + [line.rstrip()])[-40:]
            if line[:1].isdigit():  # fsx's progress line: "<op number> <op> ..."
                print(f"  {label}: op {line.split()[0]}, {time.monotonic() - started:.0f} s",
                      file=sys.stderr, flush=True)
            if time.monotonic() > deadline:
                proc.kill()
                tail.append(f"timed out after {timeout:.0f} s")
                break
    except BaseException:
        proc.kill()  # interrupted (SIGINT, SIGTERM): fsx must not outlive the run
        raise
    finally:
        proc.wait()
    seconds = time.monotonic() - started
    passed = proc.returncode == 0 and any("A-OK" in line for line in tail)
    return passed, seconds, "\n".join(tail)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m workload.fsx", description=__doc__.split("\n\n")[2],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ops", type=int, default=100_000, help="operations per run (default: "
                   "100000)")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3],
                   help="fsx seeds, one run each (default: 1 2 3)")
    p.add_argument("--policies", default="clean-lease",
                   help="comma-separated host policies to mount under (default: clean-lease)")
    p.add_argument("--timeout", type=float, default=1800.0,
                   help="seconds one run may take before it counts as failed (default: 1800)")
    p.add_argument("--no-ext4", action="store_true", help="skip the plain ext4 control runs")
    args = p.parse_args(argv)
    # SIGTERM unwinds like SIGINT: each run's host and guest are stopped on the way.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if os.geteuid() != 0:
        p.error("needs root (a raw FUSE mount)")
    posix.ensure_built(FSX)
    rows = []
    print(f"{'fs':6} {'policy':12} {'seed':>5} {'ops':>8} {'result':7} {'seconds':>8} {'ops/s':>7}",
          flush=True)

    def row(fs, policy, seed, passed, seconds, tail):
        rows.append((fs, policy, seed, passed, seconds, tail))
        print(f"{fs:6} {policy:12} {seed:>5} {args.ops:>8} {'A-OK' if passed else 'FAILED':7} "
              f"{seconds:>8.1f} {args.ops / seconds:>7.0f}", flush=True)

    if not args.no_ext4:
        for seed in args.seeds:
            where = tempfile.mkdtemp(prefix="fsx-ext4.", dir="/tmp")
            try:
                row("ext4", "-", seed, *run_fsx(where, args.ops, seed, f"ext4 seed {seed}",
                                                args.timeout))
            finally:
                shutil.rmtree(where, ignore_errors=True)
    for policy in args.policies.split(","):
        for seed in args.seeds:
            base = tempfile.mkdtemp(prefix="fsx-mount.", dir="/tmp")
            mounted = posix.MountedExport(base, policy)
            try:
                row("mount", policy, seed, *run_fsx(mounted.mountpoint, args.ops, seed,
                                                    f"{policy} seed {seed}", args.timeout))
            finally:
                mounted.close()
                if not rows[-1][3]:  # keep the daemons' logs of a failed run
                    os.makedirs(posix.LOGS, exist_ok=True)
                    for what, log in mounted.logs.items():
                        shutil.copy(log, os.path.join(posix.LOGS, f"fsx-{policy}-{seed}-{what}.log"))
                shutil.rmtree(base, ignore_errors=True)
    failed = [r for r in rows if not r[3]]
    for fs, policy, seed, _, _, tail in failed:
        print(f"\n{fs} {policy} seed {seed} failed; fsx said:\n{tail}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
