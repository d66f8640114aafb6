"""pjdfstest on plain ext4 and on a clean-lease mount, side by side (`make posix`).

    python -m workload.posix                 # every test file, both file systems
    python -m workload.posix --subset        # the short subset `make test` runs
    python -m workload.posix --only chmod/00.t rename

Builds pjdfstest from ../shared/thirdparty (its build.sh, out of tree under
build/thirdparty) unless it is built already, then runs each test file (a
TAP-speaking shell script) in a fresh directory on each file system: a
directory under /tmp (ext4 here) and a FUSE mount served by a real
`cleanlease host` and `cleanlease guest --mount` process pair.  Prints, per
file system, files / tests / failed, and the test files that fail only on
the mount.  Each file runs with a timeout, so a request stuck on the mount
shows as a failed file, not as a hung run.  Needs root (pjdfstest changes
owners) and /dev/fuse.

A case counts as failed when its line is `not ok` without `# TODO`, and a
file counts every planned case it never reached as failed too (as prove
does).  Exit status 0 if every file that passes on ext4 passes on the mount.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
THIRDPARTY = os.path.join(os.path.dirname(ROOT), "shared", "thirdparty")
BUILD = os.path.join(ROOT, "build", "thirdparty")
TESTS = os.path.join(BUILD, "pjdfstest-src", "tests")
LOGS = os.path.join(ROOT, "build", "posix-logs")

# A few hundred cases across every syscall family, for `make test` (tests/test_posix.py).
# (Most files sleep to see a ctime move; these do little of that: ~15 s on the mount.)
SUBSET = (
    "chmod/11.t", "chmod/12.t", "chown/05.t", "link/02.t", "link/17.t", "mkdir/00.t",
    "mkfifo/00.t", "mknod/00.t", "open/02.t", "posix_fallocate/00.t", "rename/21.t",
    "rmdir/00.t", "symlink/00.t", "truncate/00.t", "unlink/11.t", "utimensat/06.t",
)

_PLAN = re.compile(r"^1\.\.(\d+)")
_CASE = re.compile(r"^(not ok|ok)\b(.*)")


@dataclass
class FileResult:
    """One test file's outcome on one file system."""

    name: str
    planned: int = 0
    failed: int = 0
    timed_out: bool = False
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.failed == 0 and not self.timed_out and self.planned > 0


def parse_tap(name: str, text: str) -> FileResult:
    """Count the planned and failed cases of one file's TAP output."""
    result = FileResult(name)
    seen = 0
    for line in text.splitlines():
        if m := _PLAN.match(line):
            result.planned = int(m.group(1))
        elif m := _CASE.match(line):
            seen += 1
            if m.group(1) == "not ok" and "# TODO" not in m.group(2):
                result.failed += 1
                result.failures.append(line.strip())
    missing = max(0, result.planned - seen)
    result.failed += missing
    if missing:
        result.failures.append(f"{missing} planned case(s) never ran")
    return result


def run_file(test: str, where: str, timeout: float) -> FileResult:
    """Run one test file in a fresh directory under `where`."""
    cwd = tempfile.mkdtemp(prefix="pjd.", dir=where)
    os.chmod(cwd, 0o755)  # the tests act as other users too: they must reach it
    try:
        done = subprocess.run(["sh", os.path.join(TESTS, test)], cwd=cwd, capture_output=True,
                              timeout=timeout, text=True, errors="replace")
        return parse_tap(test, done.stdout)
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else ""
        result = parse_tap(test, out or "")
        result.timed_out = True
        result.failures.append(f"timed out after {timeout:.0f} s")
        return result
    finally:
        shutil.rmtree(cwd, ignore_errors=True)


def run_suite(tests: list[str], where: str, label: str, jobs: int, timeout: float,
              progress: bool = True) -> dict[str, FileResult]:
    results: dict[str, FileResult] = {}
    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
        futures = {pool.submit(run_file, t, where, timeout): t for t in tests}
        for n, future in enumerate(concurrent.futures.as_completed(futures), 1):
            r = future.result()
            results[r.name] = r
            if progress and (n % 20 == 0 or n == len(tests)):
                print(f"  {label}: {n}/{len(tests)} files, {time.monotonic() - started:.0f} s",
                      file=sys.stderr, flush=True)
    return results


def all_tests() -> list[str]:
    found = []
    for dirpath, _, files in os.walk(TESTS):
        found += [os.path.relpath(os.path.join(dirpath, f), TESTS) for f in files
                  if f.endswith(".t")]
    return sorted(found)


def ensure_built(also: str | None = None) -> None:
    """Build the tools (pjdfstest, fsx) under BUILD unless they are there (and `also`)."""
    if (os.path.exists(os.path.join(BUILD, "pjdfstest")) and os.path.isdir(TESTS)
            and (also is None or os.path.exists(also))):
        return
    script = os.path.join(THIRDPARTY, "build.sh")
    if not os.path.exists(script):
        raise SystemExit(f"posix: {script} not found: pjdfstest lives in ../shared/thirdparty "
                         "next to this checkout")
    print(f"posix: building pjdfstest into {BUILD}", file=sys.stderr, flush=True)
    subprocess.run(["bash", script, BUILD], check=True)


class MountedExport:
    """A `cleanlease host` on a fresh export and one `cleanlease guest --mount` of it."""

    def __init__(self, base: str, policy: str = "clean-lease", detector: str = "auto"):
        self.export = os.path.join(base, "export")
        self.mountpoint = os.path.join(base, "mnt")
        os.makedirs(self.export)
        os.makedirs(self.mountpoint)
        os.chmod(self.export, 0o755)
        sock = os.path.join(base, "host.sock")
        py = [sys.executable, "-m", "workload.cli"]
        self.logs = {}
        self.host = self._start("host", py + ["host", "--export", self.export, "--listen",
                                              f"unix:{sock}", "--policy", policy,
                                              "--detector", detector], base)
        self.guest = self._start("guest", py + ["guest", "--connect", f"unix:{sock}", "--mount",
                                                self.mountpoint, "--actor", "posix"], base)

    def _start(self, what: str, argv: list[str], base: str) -> subprocess.Popen:
        """Start one process (its stderr in BASE/WHAT.log) and wait for its READY line."""
        log = self.logs[what] = os.path.join(base, f"{what}.log")
        with open(log, "w") as err:
            proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err, text=True,
                                    cwd=ROOT)
        line = proc.stdout.readline()
        if not line.startswith("READY"):
            proc.kill()
            with open(log) as f:
                tail = f.read()[-2000:]
            raise SystemExit(f"posix: the {what} did not start (said {line!r}):\n{tail}")
        return proc

    def close(self) -> None:
        for proc in (self.guest, self.host):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        subprocess.run(["umount", "-l", self.mountpoint], capture_output=True)


def summary(results: dict[str, FileResult]) -> tuple[int, int, int, int]:
    """(files, tests, failed cases, failed files)."""
    return (len(results), sum(r.planned for r in results.values()),
            sum(r.failed for r in results.values()), sum(not r.ok for r in results.values()))


def compare(tests: list[str], jobs: int, timeout: float, policy: str,
            progress: bool = True, detector: str = "auto") -> tuple[dict, dict]:
    """Run `tests` on ext4 and on a mount; returns (ext4 results, mount results)."""
    ensure_built()
    base = tempfile.mkdtemp(prefix="cleanlease-posix.", dir="/tmp")
    os.chmod(base, 0o755)
    try:
        plain = os.path.join(base, "ext4")
        os.makedirs(plain)
        ext4 = run_suite(tests, plain, "ext4", jobs, timeout, progress)
        mounted = MountedExport(base, policy, detector)
        try:
            mount = run_suite(tests, mounted.mountpoint, "mount", jobs, timeout, progress)
        finally:
            mounted.close()
        if any(not r.ok for r in mount.values()):  # keep the daemons' logs for a look
            os.makedirs(LOGS, exist_ok=True)
            for what, log in mounted.logs.items():
                shutil.copy(log, os.path.join(LOGS, f"{what}.log"))
            print(f"posix: the host's and the guest's logs are in {LOGS}", file=sys.stderr)
        return ext4, mount
    finally:
        shutil.rmtree(base, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m workload.posix", description=__doc__.split("\n\n")[0],
        epilog="Prints files/tests/failed on ext4 and on the mount, and the files failing "
               "only on the mount.", formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subset", action="store_true", help="the short subset of make test")
    parser.add_argument("--only", nargs="+", metavar="TEST",
                        help="test files (chmod/00.t) or directories (rename) to run")
    parser.add_argument("--jobs", type=int, default=2, help="files run at once (default: 2)")
    parser.add_argument("--timeout", type=float, default=120.0,
                        help="seconds one file may take (default: 120)")
    parser.add_argument("--policy", default="clean-lease", help="the host's policy")
    parser.add_argument("--detector", default="auto", help="the host's detector (default: auto)")
    parser.add_argument("--verbose", action="store_true",
                        help="print every failed case of the files failing only on the mount")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("posix: pjdfstest needs root (it changes owners and modes)")
    ensure_built()
    tests = all_tests()
    if args.subset:
        tests = list(SUBSET)
    elif args.only:
        tests = [t for t in tests if any(t == o or t.startswith(o.rstrip("/") + "/")
                                         for o in args.only)]
        if not tests:
            raise SystemExit(f"posix: no test file matches {args.only}")
    ext4, mount = compare(tests, args.jobs, args.timeout, args.policy, detector=args.detector)
    print(f"{'':8} {'files':>6} {'tests':>6} {'failed':>7} {'failed files':>13}")
    for label, results in (("ext4", ext4), ("mount", mount)):
        files, cases, failed, bad = summary(results)
        print(f"{label:8} {files:>6} {cases:>6} {failed:>7} {bad:>13}")
    only_mount = sorted(t for t in tests if ext4[t].ok and not mount[t].ok)
    print(f"failing only on the mount: {len(only_mount)}")
    for t in only_mount:
        r = mount[t]
        print(f"  {t}: {r.failed}/{r.planned} failed{' (timed out)' if r.timed_out else ''}")
        for line in r.failures[: None if args.verbose else 3]:
            print(f"      {line if len(line) <= 160 else line[:157] + '...'}")
    return 1 if only_mount else 0


if __name__ == "__main__":
    sys.exit(main())
