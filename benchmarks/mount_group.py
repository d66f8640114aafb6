"""`make bench`'s "mount" group: plain ext4, libfuse's C `passthrough_ll` and a
clean-lease mount, side by side in one run (issue 17, docs/performance.md).

    python -m benchmarks.mount_group            # about 4 minutes
    python -m benchmarks.mount_group --quick    # a smoke run: smaller, shorter, noisier
    python -m benchmarks.mount_group --json out.json

What runs, on the same ext4 (under /tmp), one file system after the other:

* fio, short jobs on one file (256 MiB; 64 MiB with --quick), psync:
  cold 4 KiB random reads with one job and with 16 jobs, cold sequential
  1 MiB reads, 4 KiB random writes with an fsync every 32, and 4 KiB random
  reads of the file once it is cached.  "Cold" is fio's own
  `invalidate=1` (POSIX_FADV_DONTNEED on the file before the job): on a FUSE
  mount that empties the mount's page cache, and the backing file stays in
  the host's page cache (read once before), as virtiofsd's would; on plain
  ext4 it empties ext4's, so ext4's cold rows read the disk.
* a generated tree (2,000 small files in 100 directories; 600 with --quick)
  committed to a git repository on ext4: `git clone --no-hardlinks` of it
  onto each file system, `tar -x` of it, and a warm `git status` in the
  clone, timed after the lease term has passed (so that a timeout capped by
  the term shows), with the kernel requests the guest received and the
  requests it sent to the host during that status;
* the warm `git status` again on a clean-lease host of every policy, with
  its requests (after two warm-up runs: see `warm_status`).

Every ratio is against passthrough_ll measured in the same run.  The
clean-lease side is a real `cleanlease host` and `cleanlease guest --mount`
process pair.  passthrough_ll is built from Debian's libfuse3-dev examples
(installed with apt-get where missing); where it cannot be built or mounted,
or /dev/fuse or root is missing, the group is skipped with the reason.
Needs fio (skipped with the reason where missing) and git.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

from workload.bench import Row, machine

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILD = os.path.join(ROOT, "build", "bench")
PASSTHROUGH_SRC = "/usr/share/doc/libfuse3-dev/examples/passthrough_ll.c"
POLICIES = ("never", "ttl", "always", "open-lease", "clean-lease")
LEASE_TERM_MS = 2000  # the host's default; the warm status waits past it
# The host's default descriptor budget gives one guest a sixteenth of its
# descriptors as node ids (host/limits.py): 1,221 with this machine's 20,000,
# and a mount's kernel keeps a node id for every name it has looked up until
# memory pressure makes it FORGET, so a clone of a 2,000-file tree gets
# EMFILE.  The mount here is the host's only guest: it may take the whole
# node-id budget (4,887 here).
HOST_NODEIDS = 1 << 20


# --- the file systems ----------------------------------------------------------------------


def build_passthrough() -> tuple[str | None, str]:
    """(path of passthrough_ll, "") or (None, why it is not there)."""
    binary = os.path.join(BUILD, "passthrough_ll")
    if os.path.exists(binary):
        return binary, ""
    if not os.path.exists(PASSTHROUGH_SRC) and shutil.which("apt-get") and os.geteuid() == 0:
        print("mount bench: installing libfuse3-dev (apt-get)", file=sys.stderr, flush=True)
        subprocess.run("apt-get install -y -qq libfuse3-dev >/dev/null 2>&1 || "
                       "(apt-get update -qq && apt-get install -y -qq libfuse3-dev >/dev/null)",
                       shell=True)
    if not os.path.exists(PASSTHROUGH_SRC):
        return None, f"{PASSTHROUGH_SRC} missing (apt-get install libfuse3-dev)"
    flags = subprocess.run(["pkg-config", "--cflags", "--libs", "fuse3"], capture_output=True,
                           text=True)
    if flags.returncode != 0 or not shutil.which("gcc"):
        return None, "gcc or pkg-config fuse3 missing"
    os.makedirs(BUILD, exist_ok=True)
    built = subprocess.run(["gcc", "-O2", "-o", binary, PASSTHROUGH_SRC] + flags.stdout.split(),
                           capture_output=True, text=True)
    if built.returncode != 0:
        return None, f"passthrough_ll did not build: {built.stderr[-300:]}"
    return binary, ""


def _wait_mounted(mountpoint: str, proc: subprocess.Popen, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.ismount(mountpoint):
            return
        if proc.poll() is not None:
            raise RuntimeError(f"the server of {mountpoint} exited ({proc.returncode})")
        time.sleep(0.02)
    raise RuntimeError(f"{mountpoint} was not mounted within {timeout:.0f} s")


class Ext4:
    name = "ext4"

    def __init__(self, base: str):
        self.root = self.backing = os.path.join(base, "ext4")
        os.makedirs(self.root)

    def stats(self) -> dict | None:
        return None

    def close(self) -> None:
        pass


class Passthrough:
    """libfuse's passthrough_ll (C, multi-threaded, its default cache: 1 s timeouts)."""

    name = "passthrough_ll"

    def __init__(self, base: str, binary: str):
        self.backing = os.path.join(base, "pll-src")
        self.root = os.path.join(base, "pll-mnt")
        os.makedirs(self.backing)
        os.makedirs(self.root)
        self.log = open(os.path.join(base, "pll.log"), "w")
        self.proc = subprocess.Popen([binary, "-f", "-o", f"source={self.backing}", self.root],
                                     stdout=self.log, stderr=self.log)
        _wait_mounted(self.root, self.proc)

    def stats(self) -> dict | None:
        return None

    def close(self) -> None:
        subprocess.run(["umount", self.root], capture_output=True)
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        subprocess.run(["umount", "-l", self.root], capture_output=True)
        self.log.close()


class CleanLease:
    """A `cleanlease host` and a `cleanlease guest --mount` of its export."""

    def __init__(self, base: str, policy: str = "clean-lease", tag: str = "",
                 backing: str | None = None):
        self.name = f"clean-lease mount ({policy})" if policy != "clean-lease" else "clean-lease"
        tag = tag or policy
        self.backing = backing or os.path.join(base, f"export-{tag}")
        self.root = os.path.join(base, f"mnt-{tag}")
        os.makedirs(self.backing, exist_ok=True)
        os.makedirs(self.root)
        os.chmod(self.backing, 0o755)
        self.stats_path = os.path.join(base, f"guest-{tag}.json")
        sock = os.path.join(base, f"host-{tag}.sock")
        py = [sys.executable, "-m", "workload.cli"]
        self.host = self._start(py + ["host", "--export", self.backing, "--listen",
                                      f"unix:{sock}", "--policy", policy,
                                      "--lease-term", str(LEASE_TERM_MS),
                                      "--max-nodeids-per-guest", str(HOST_NODEIDS)],
                                os.path.join(base, f"host-{tag}.log"))
        self.guest = self._start(py + ["guest", "--connect", f"unix:{sock}", "--mount",
                                       self.root, "--stats", self.stats_path],
                                 os.path.join(base, f"guest-{tag}.log"))

    @staticmethod
    def _start(argv: list[str], log: str) -> subprocess.Popen:
        with open(log, "w") as err:
            proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err, text=True, cwd=ROOT)
        line = proc.stdout.readline()
        if not line.startswith("READY"):
            proc.kill()
            with open(log) as f:
                raise RuntimeError(f"{argv[3]} did not start (said {line!r}): {f.read()[-1500:]}")
        return proc

    def stats(self) -> dict:
        """A snapshot of the guest's counters taken after this call began."""
        asked = time.monotonic_ns()
        deadline = time.monotonic() + 5
        while True:
            try:
                with open(self.stats_path) as f:
                    snap = json.load(f)
                if snap["t_ns"] > asked:
                    return snap
            except (OSError, ValueError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the guest's stats file is not being rewritten")
            time.sleep(0.01)

    def close(self) -> None:
        for proc in (self.guest, self.host):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        subprocess.run(["umount", "-l", self.root], capture_output=True)


# --- fio --------------------------------------------------------------------------------------

FIO_JOBS = {
    # name: (fio arguments, what the row reports)
    "cold 4 KiB random reads, 1 job": (["--rw=randread", "--bs=4k", "--numjobs=1"], "read_iops"),
    # each job its own sixteenth of the file: cold until it has read it all
    "cold 4 KiB random reads, 16 jobs": (["--rw=randread", "--bs=4k", "--numjobs=16",
                                          "--offset_increment={sixteenth}"], "read_iops"),
    "cold sequential 1 MiB reads": (["--rw=read", "--bs=1m", "--numjobs=1"], "read_MBps"),
    "4 KiB random writes, fsync every 32": (["--rw=randwrite", "--bs=4k", "--numjobs=1",
                                             "--fsync=32"], "write_iops"),
    "cached 4 KiB random reads, 1 job": (["--rw=randread", "--bs=4k", "--numjobs=1",
                                          "--invalidate=0"], "read_iops"),
}


def fio(path: str, args: list[str], seconds: float, size: int) -> dict:
    sequential = "--rw=read" in args
    timing = [] if sequential else ["--time_based", f"--runtime={seconds}"]
    if "--numjobs=16" in args:
        size //= 16
        args = [a.format(sixteenth=size) for a in args]
    out = subprocess.run(["fio", "--name=job", f"--filename={path}", f"--size={size}",
                          "--ioengine=psync", "--group_reporting", "--output-format=json"]
                         + timing + args, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"fio {' '.join(args)} on {path}: {out.stderr[-500:]}")
    job = json.loads(out.stdout)["jobs"][0]
    return {"read_iops": job["read"]["iops"], "write_iops": job["write"]["iops"],
            "read_MBps": job["read"]["bw_bytes"] / 1e6, "write_MBps": job["write"]["bw_bytes"] / 1e6,
            "read_p50_us": job["read"]["clat_ns"]["percentile"].get("50.000000", 0) / 1000
            if job["read"]["io_bytes"] else 0.0}


def fio_rows(fs, seconds: float, size: int, data: bytes) -> dict:
    backing = os.path.join(fs.backing, "fio.dat")
    with open(backing, "wb") as f:  # laid out on the host side: the jobs measure the mount
        for _ in range(size // len(data)):
            f.write(data)
    with open(backing, "rb") as f:  # the host's page cache holds it (as virtiofsd's would)
        while f.read(1 << 20):
            pass
    path = os.path.join(fs.root, "fio.dat")
    out = {}
    for name, (args, _) in FIO_JOBS.items():
        if name.startswith("cached"):
            fio(path, ["--rw=read", "--bs=1m", "--numjobs=1", "--invalidate=0"], seconds, size)
        before = fs.stats()
        out[name] = fio(path, args, seconds, size)
        after = fs.stats()
        if before is not None:
            out[name]["host_requests"] = after["host_requests"] - before["host_requests"]
        print(f"mount bench: {fs.name}: {name}: {out[name]}", file=sys.stderr, flush=True)
    os.unlink(backing)
    return out


# --- git and tar -----------------------------------------------------------------------------


def make_tree(base: str, files: int) -> tuple[str, str]:
    """A git repository of `files` small files in directories of 20, and a tar of its tree."""
    repo = os.path.join(base, "tree")
    per_dir = 20
    for i in range(files):
        d = os.path.join(repo, f"d{i // (per_dir * 10):02d}", f"s{(i // per_dir) % 10}")
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, f"f{i}.txt"), "w") as f:
            f.write(f"file {i}\n" * (1 + i % 40))
    git = ["git", "-c", "user.email=b@b", "-c", "user.name=b", "-C", repo]
    subprocess.run(["git", "init", "-q", repo], check=True)
    subprocess.run(git + ["add", "-A"], check=True)
    subprocess.run(git + ["commit", "-qm", "tree"], check=True)
    # one pack: a clone copies two object files, not one per blob
    subprocess.run(git + ["repack", "-adq"], check=True)
    subprocess.run(git + ["prune-packed"], check=True)
    tar = os.path.join(base, "tree.tar")
    subprocess.run(["tar", "-cf", tar, "--exclude=.git", "-C", repo, "."], check=True)
    return repo, tar


def _timed(argv: list[str], **kw) -> float:
    started = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, **kw)
    return time.perf_counter() - started


def warm_status(fs, clone: str, runs: int) -> dict:
    """`git status` twice to warm the caches, then `runs` times, each after the
    lease term has passed; the median time and the requests of each run.

    Twice: the host answers the first request on an inode it has not armed
    its detector for without a lease (`Coherence.lease_for` arms it then), so
    under the lease policies only the second warm-up leaves everything leased."""
    status = ["git", "-C", clone, "status", "--porcelain"]
    _timed(status)
    _timed(status)
    times, kernel, host = [], [], []
    for _ in range(runs):
        time.sleep(LEASE_TERM_MS / 1000 + 0.3)
        before = fs.stats()
        times.append(_timed(status))
        after = fs.stats()
        if before is not None:
            kernel.append(after["requests"] - before["requests"])
            host.append(after["host_requests"] - before["host_requests"])
            ops = {k: v - before["by_opcode"].get(k, 0) for k, v in after["by_opcode"].items()}
    out = {"status_s": statistics.median(times), "status_runs_s": times}
    if kernel:
        out.update(kernel_requests=kernel, host_requests=host,
                   kernel_by_opcode={k: v for k, v in ops.items() if v})
    return out


def tree_rows(fs, repo: str, tar: str, runs: int) -> dict:
    clone = os.path.join(fs.root, "clone")
    out = {"clone_s": _timed(["git", "clone", "-q", "--no-hardlinks", repo, clone])}
    untar = os.path.join(fs.root, "untar")
    os.makedirs(untar)
    out["untar_s"] = _timed(["tar", "-xf", tar, "-C", untar])
    out.update(warm_status(fs, clone, runs))
    print(f"mount bench: {fs.name}: {out}", file=sys.stderr, flush=True)
    return out


# --- the group -------------------------------------------------------------------------------


def unavailable() -> str:
    from guest.fuse_device import unavailable_reason

    return unavailable_reason() or ("" if shutil.which("git") else "git missing")


def run(quick: bool, seconds: float | None = None, files: int | None = None,
        keep: str | None = None) -> tuple[list[Row], dict]:
    """Rows (ratios against passthrough_ll) and the raw figures; no rows, and the
    reason in raw["skipped"], where the group cannot run here."""
    why = unavailable()
    binary, why_pll = build_passthrough()
    why = why or why_pll
    if why:
        print(f"mount bench: skipped: {why}", file=sys.stderr)
        return [], {"skipped": why}
    has_fio = shutil.which("fio") is not None
    seconds = seconds or (2 if quick else 5)
    size = (64 if quick else 256) << 20
    files = files or (600 if quick else 2000)
    runs = 2 if quick else 3
    base = tempfile.mkdtemp(prefix="cleanlease-mount-bench.", dir="/tmp")
    os.chmod(base, 0o755)
    raw: dict = {"fio_seconds": seconds, "fio_file_bytes": size, "tree_files": files,
                 "fio": {}, "tree": {}, "status_by_policy": {}}
    if not has_fio:
        raw["fio_skipped"] = "fio missing (apt-get install fio)"
    data = os.urandom(1 << 20)
    try:
        repo, tar = make_tree(base, files)
        for make in (lambda: Ext4(base), lambda: Passthrough(base, binary),
                     lambda: CleanLease(base)):
            fs = make()
            try:
                if has_fio:
                    raw["fio"][fs.name] = fio_rows(fs, seconds, size, data)
                raw["tree"][fs.name] = tree_rows(fs, repo, tar, runs)
            finally:
                fs.close()
        for policy in POLICIES:  # the same warm status, on a host-local clone, per policy
            export = os.path.join(base, f"export-status-{policy}")
            os.makedirs(export)
            subprocess.run(["git", "clone", "-q", "--no-hardlinks", repo,
                            os.path.join(export, "clone")], check=True)
            # Written back first: clean-lease leases only inodes without dirty pages,
            # so a tree just written on the host would be unleased at first.
            os.sync()
            fs = CleanLease(base, policy, tag=f"status-{policy}", backing=export)
            try:
                raw["status_by_policy"][policy] = warm_status(fs, os.path.join(fs.root, "clone"),
                                                              runs)
                print(f"mount bench: warm git status under {policy}: "
                      f"{raw['status_by_policy'][policy]}", file=sys.stderr, flush=True)
            finally:
                fs.close()
    finally:
        if keep:
            shutil.copytree(base, keep, symlinks=True, dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns("*.sock", "mnt-*", "pll-mnt"))
        shutil.rmtree(base, ignore_errors=True)
    return rows_of(raw), raw


def rows_of(raw: dict) -> list[Row]:
    rows = []
    pll, cl = "passthrough_ll", "clean-lease"
    for name, (_, key) in FIO_JOBS.items():
        if not raw["fio"]:
            break
        unit = "MB/s" if key.endswith("MBps") else "ops/s"
        value, baseline = raw["fio"][cl][name][key], raw["fio"][pll][name][key]
        ext4 = raw["fio"]["ext4"][name][key]
        base_label, other = "passthrough_ll, same run", f"ext4 {ext4:,.0f} {unit}"
        if name.startswith("cached"):
            # passthrough_ll's default (cache=normal) opens without KEEP_CACHE: the
            # kernel may drop its pages at fio's open, so page-cache speed is ext4's.
            baseline, base_label = ext4, "ext4, same run"
            other = f"passthrough_ll {raw['fio'][pll][name][key]:,.0f} {unit}"
        target = {"cold 4 KiB random reads, 1 job": 0.25, "cold 4 KiB random reads, 16 jobs": 0.5,
                  "cold sequential 1 MiB reads": 0.9,
                  "4 KiB random writes, fsync every 32": 0.5}.get(name)
        rows.append(Row("mount", f"fio {name}", value, unit, baseline, base_label,
                        higher_is_better=True, min_ratio=target,
                        note=f"{other}; host requests "
                             f"{raw['fio'][cl][name].get('host_requests', '-')}"))
    tree = raw["tree"]
    for key, label, target in (("clone_s", "git clone", 2.0), ("untar_s", "tar -x", 2.0),
                               ("status_s", "warm git status", 1.0)):
        note = f"ext4 {tree['ext4'][key]:.3f} s"
        if key == "status_s":
            note += (f"; kernel requests {tree[cl]['kernel_requests']}, host requests "
                     f"{tree[cl]['host_requests']}")
        rows.append(Row("mount", f"{label} of a {raw['tree_files']}-file tree", tree[cl][key], "s",
                        tree[pll][key], "passthrough_ll, same run", max_ratio=target, note=note))
    by_policy = raw["status_by_policy"]
    ttl_host = statistics.median(by_policy["ttl"]["host_requests"]) or 1
    for policy in POLICIES:
        result = by_policy[policy]
        host = statistics.median(result["host_requests"])
        rows.append(Row("mount", f"host requests per warm git status, {policy}", host, "requests",
                        ttl_host, "ttl, same run",
                        max_ratio=0.01 if policy == "clean-lease" else None,
                        note=f"kernel requests {result['kernel_requests']}; "
                             f"{result['status_s']:.3f} s"))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.mount_group",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller file and tree, 2 s jobs")
    parser.add_argument("--seconds", type=float, help="seconds per fio job (default 5; 2 quick)")
    parser.add_argument("--files", type=int, help="files in the generated tree (default 2000; more than the host's node-id "
                        "budget per guest gets EMFILE)")
    parser.add_argument("--json", metavar="PATH", help="also write every figure as JSON")
    parser.add_argument("--keep", metavar="DIR", help="copy the logs and stats here")
    parser.add_argument("--from-json", metavar="PATH",
                        help="print the table of an earlier --json run instead of measuring")
    args = parser.parse_args(argv)
    from rich.console import Console
    from rich.table import Table

    if args.from_json:
        with open(args.from_json) as f:
            earlier = json.load(f)
        info, raw, elapsed = earlier["machine"], earlier["raw"], earlier["elapsed_s"]
        rows = rows_of(raw) if "skipped" not in raw else []
    else:
        info = machine()
        started = time.monotonic()
        rows, raw = run(args.quick, args.seconds, args.files, args.keep)
        elapsed = time.monotonic() - started
    table = Table(title=f"cleanlease mount bench ({info['nproc']} CPUs, Linux {info['kernel']}; "
                        f"{elapsed:.0f} s)",
                  caption=f"load average at start: "
                          f"{' '.join(f'{x:.2f}' for x in info['loadavg_at_start'])}.  "
                          f"Every value and baseline was measured in this run.")
    for column in ("metric", "value", "baseline", "ratio", "target", "met?"):
        table.add_column(column, justify="left" if column == "metric" else "right")
    for row in rows:
        met = {True: "[green]yes[/green]", False: "[red]no[/red]", None: "-"}[row.met]
        table.add_row(row.metric + (f" [dim]({row.note})[/dim]" if row.note else ""),
                      f"{row.value:,.3g} {row.unit}",
                      f"{row.baseline:,.3g} {row.unit} [dim]{row.baseline_label}[/dim]",
                      f"{row.ratio:.2f}×", row.target, met)
    Console(width=None if sys.stdout.isatty() else 160).print(table)
    if args.json and not args.from_json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "elapsed_s": elapsed, "loadavg_at_end": os.getloadavg(),
                       "rows": [r.as_dict() for r in rows], "raw": raw}, f, indent=2, default=str)
    return 0 if "skipped" in raw or rows else 1


if __name__ == "__main__":
    sys.exit(main())
