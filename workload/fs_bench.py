"""Real programs on plain ext4 and on a clean-lease mount, timed side by side.

    python -m workload.fs_bench              # git clone (3 runs) and fio randrw
    python -m workload.fs_bench --fio-seconds 0

A figure, not a target (docs/performance.md).  git clone: a local clone (no
hard links) of a repository made from this checkout's files, the median of
three runs.  fio: 4 KiB random reads and writes, half each, on a 64 MiB file
through one job for --fio-seconds; IOPS.  The mount is a real `cleanlease
host` and `cleanlease guest --mount` process pair (workload/posix.py's
MountedExport), on the same ext4 as the plain runs.  Needs root and /dev/fuse.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from workload.posix import ROOT, MountedExport


def _make_repo(where: str) -> str:
    repo = os.path.join(where, "repo")
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.split()
    for name in files:
        os.makedirs(os.path.join(repo, os.path.dirname(name)), exist_ok=True)
        shutil.copy2(os.path.join(ROOT, name), os.path.join(repo, name))
    git = ["git", "-c", "user.email=b@b", "-c", "user.name=b"]
    subprocess.run(["git", "init", "-q", repo], check=True)
    subprocess.run(git + ["-C", repo, "add", "-A"], check=True)
    subprocess.run(git + ["-C", repo, "commit", "-qm", "bench"], check=True)
    return repo


def git_clone_s(repo: str, into: str, runs: int = 3) -> float:
    times = []
    for i in range(runs):
        target = os.path.join(into, f"clone{i}")
        started = time.perf_counter()
        subprocess.run(["git", "clone", "-q", "--no-hardlinks", repo, target], check=True)
        times.append(time.perf_counter() - started)
        shutil.rmtree(target)
    return statistics.median(times)


def fio_iops(where: str, seconds: int) -> dict:
    out = subprocess.run(["fio", "--name=randrw", f"--directory={where}", "--rw=randrw",
                          "--bs=4k", "--size=64m", "--numjobs=1", "--time_based",
                          f"--runtime={seconds}", "--ioengine=psync", "--output-format=json"],
                         capture_output=True, text=True, check=True).stdout
    job = json.loads(out)["jobs"][0]
    return {"read_iops": round(job["read"]["iops"]), "write_iops": round(job["write"]["iops"])}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workload.fs_bench",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--fio-seconds", type=int, default=20, help="0 skips fio (default: 20)")
    parser.add_argument("--policy", default="clean-lease")
    args = parser.parse_args(argv)
    base = tempfile.mkdtemp(prefix="cleanlease-bench.", dir="/tmp")
    os.chmod(base, 0o755)
    try:
        repo = _make_repo(base)
        plain = os.path.join(base, "ext4")
        os.makedirs(plain)
        rows = {"ext4": {"git_clone_s": round(git_clone_s(repo, plain), 2)}}
        mounted = MountedExport(base, args.policy)
        try:
            rows["mount"] = {"git_clone_s": round(git_clone_s(repo, mounted.mountpoint), 2)}
            if args.fio_seconds and shutil.which("fio"):
                rows["mount"].update(fio_iops(mounted.mountpoint, args.fio_seconds))
        finally:
            mounted.close()
        if args.fio_seconds and shutil.which("fio"):
            rows["ext4"].update(fio_iops(plain, args.fio_seconds))
        print(json.dumps(rows, indent=1))
        return 0
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
