"""`make seeds`: the figures of docs/seeds.md (issue 16), with real processes.

A `cleanlease host` (fanotify detector) on an ext4 export under /tmp, host-local
writer processes, a scripted guest process, and the control socket:

1. freeze latency (the FREEZE round trip) against writers busy on the file
   and the file's size, next to a STATUS round trip (the baseline);
2. thaw: how long letting N held writers go takes (one at a time, in order);
3. backup: full and incremental (1 %, 10 %, 50 % of the file changed) next to
   a plain copy of the whole file without the daemon (the baseline);
4. an incremental backup of the file under concurrent host-local and guest
   writers, checked byte for byte against a reference snapshot taken at the
   freeze instant, with the journal's coverage and excess;
5. stores through a shared writable mapping made before a freeze.

    python -m benchmarks.seeds [--size-mib 1024] [--quick] [--json out.json]

Prints progress on stderr and a Markdown report on stdout.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import random
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from host.control.backup import backup
from host.control.client import ControlClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGE = 4096
CHUNK = 64 << 10

LOOPER = r"""
import os, random, sys, threading
path, seed, span = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rng = random.Random(seed)
fd = os.open(path, os.O_RDWR)
stop = threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
print("ready", flush=True)
n = 0
while not stop.is_set():
    os.pwrite(fd, bytes([rng.randrange(256)]) * rng.randrange(1, 4096), rng.randrange(0, span))
    n += 1
print(n, flush=True)
"""


def progress(text: str) -> None:
    print(f"seeds: {text}", file=sys.stderr, flush=True)


class Daemon:
    def __init__(self, export: str, sock: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "workload.cli", "host", "--export", export, "--listen",
             f"unix:{sock}", "--detector", "fanotify"], cwd=ROOT, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL)
        line = self.proc.stdout.readline().decode()
        if not line.startswith("READY"):
            raise SystemExit(f"seeds: the daemon did not start: {line!r}")
        self.address = f"unix:{sock}"
        self.control = sock + ".control"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def make_file(path: str, size: int, seed: int = 1) -> None:
    rng = random.Random(seed)
    with open(path, "wb") as out:
        left = size
        while left:
            n = min(left, 16 << 20)
            out.write(rng.randbytes(n))
            left -= n


def loopers(path: str, n: int, span: int) -> list[subprocess.Popen]:
    procs = []
    for i in range(n):
        p = subprocess.Popen([sys.executable, "-c", LOOPER, path, str(i), str(span)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert p.stdout.readline().strip() == b"ready"
        procs.append(p)
    return procs


def stop_all(procs) -> None:
    for p in procs:
        try:
            p.stdin.close()
        except OSError:
            pass
    for p in procs:
        p.wait(30)


def until(predicate, timeout=30.0, what="") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"seeds: timed out waiting for {what}")
        time.sleep(0.001)


def ms(ns: float) -> str:
    return f"{ns / 1e6:.3f}"


def freeze_latency(c: ControlClient, path: str, writers: int, reps: int) -> dict:
    """FREEZE round trip with `writers` processes writing the file, then THAW
    and the time until every held writer was let go."""
    procs = loopers(path, writers, min(os.path.getsize(path) - 5000, 64 << 20))
    try:
        freeze, thaw, status = [], [], []
        for _ in range(reps):
            t = time.monotonic_ns()
            c.status(path)
            status.append(time.monotonic_ns() - t)
            t = time.monotonic_ns()
            c.freeze(path)
            freeze.append(time.monotonic_ns() - t)
            until(lambda: c.status(path).waiting >= writers, what="writers to be held")
            before = c.status(path).released
            t = time.monotonic_ns()
            c.thaw(path)
            until(lambda: c.status(path).released >= before + writers, what="writers to go")
            thaw.append(time.monotonic_ns() - t)
    finally:
        stop_all(procs)
    return dict(writers=writers, freeze_ns=statistics.median(freeze), freeze_max_ns=max(freeze),
                status_ns=statistics.median(status), thaw_ns=statistics.median(thaw))


def plain_copy(src: str, dest: str) -> int:
    t = time.monotonic_ns()
    with open(src, "rb") as a, open(dest, "wb") as b:
        left = os.fstat(a.fileno()).st_size
        while left:
            left -= os.copy_file_range(a.fileno(), b.fileno(), min(left, 64 << 20))
    return time.monotonic_ns() - t


def change(path: str, fraction: float, seed: int) -> int:
    """Overwrite `fraction` of the file in random 64 KiB chunks; bytes changed."""
    size = os.path.getsize(path)
    chunks = list(range(0, size // CHUNK))
    rng = random.Random(seed)
    picked = rng.sample(chunks, max(1, int(len(chunks) * fraction)))
    fd = os.open(path, os.O_RDWR)
    try:
        for k in picked:
            os.pwrite(fd, rng.randbytes(CHUNK), k * CHUNK)
    finally:
        os.close(fd)
    return len(picked) * CHUNK


def compare_pages(a: str, b: str) -> set[int]:
    """Pages that differ between files `a` and `b`."""
    out = set()
    with open(a, "rb") as fa, open(b, "rb") as fb:
        page = 0
        while True:
            x, y = fa.read(1 << 20), fb.read(1 << 20)
            if not x and not y:
                return out
            for k in range(0, max(len(x), len(y)), PAGE):
                if x[k:k + PAGE] != y[k:k + PAGE]:
                    out.add(page + k // PAGE)
            page += (1 << 20) // PAGE


def mmap_stores(c: ControlClient, export: str) -> list[dict]:
    f = os.path.join(export, "mapped")
    with open(f, "wb") as out:
        out.write(b"o" * 3 * PAGE)
    mapper = subprocess.Popen([sys.executable, "-c", r"""
import mmap, os, sys, time
m = mmap.mmap(os.open(sys.argv[1], os.O_RDWR), 3 * 4096)
m[0:1] = b"A"
_ = m[4096]
print("mapped", flush=True)
for line in sys.stdin:
    page = int(line)
    m[page * 4096:page * 4096 + 1] = b"S"
    print("stored", flush=True)
""", f], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert mapper.stdout.readline().strip() == b"mapped"
    rows = []
    for page, evict, what in ((0, False, "mapped, dirty"), (1, False, "mapped, clean"),
                              (2, False, "cached, not mapped by the writer"),
                              (0, True, "mapped, flushed and fadvise(DONTNEED)"),
                              (2, True, "not mapped, flushed and fadvise(DONTNEED)")):
        if evict:
            c.flush(f)
            fd = os.open(f, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)
        c.freeze(f)
        mapper.stdin.write(f"{page}\n".encode())
        mapper.stdin.flush()
        returned = bool(select.select([mapper.stdout], [], [], 1.0)[0])
        with open(f, "rb") as r:
            visible = r.read()[page * PAGE:page * PAGE + 1] == b"S"
        held = c.status(f).waiting
        c.thaw(f)
        if not returned:
            mapper.stdout.readline()
        else:
            mapper.stdout.readline()
        rows.append(dict(page=what, store_returned_while_frozen=returned,
                         visible_while_frozen=visible, held=held))
    mapper.stdin.close()
    mapper.wait(10)
    # A new shared writable mapping made while frozen: its mmap() raises an event.
    c.freeze(f)
    late = subprocess.Popen([sys.executable, "-c", "import mmap, os, sys; m = mmap.mmap(os.open("
                             "sys.argv[1], os.O_RDWR), 4096); m[0:1] = b'L'; print('stored', "
                             "flush=True)", f], stdout=subprocess.PIPE)
    returned = bool(select.select([late.stdout], [], [], 1.0)[0])
    with open(f, "rb") as r:
        visible = r.read(1) == b"L"
    held = c.status(f).waiting
    c.thaw(f)
    late.stdout.readline()
    late.wait(10)
    rows.append(dict(page="a new mapping, mmap() called while frozen",
                     store_returned_while_frozen=returned, visible_while_frozen=visible,
                     held=held))
    return rows


def under_writers(c: ControlClient, daemon: Daemon, export: str, path: str, work: str) -> dict:
    """Incremental backup under a host-local writer and a guest writer."""
    size = os.path.getsize(path)
    dest, ref0, ref1 = (os.path.join(work, n) for n in ("bk", "ref0", "ref1"))
    first = backup(c, path, dest, after_freeze=lambda: shutil.copyfile(path, ref0))
    procs = loopers(path, 1, size // 8)
    guest = subprocess.Popen([sys.executable, os.path.join(ROOT, "tests", "scripted_guest.py"),
                              daemon.address, "G"], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, cwd=ROOT)
    assert b"ready" in guest.stdout.readline()
    name = os.path.relpath(path, export)
    guest.stdin.write(json.dumps(dict(op="open", path=name, mode="rw")).encode() + b"\n")
    rng = random.Random(3)
    for _ in range(200):
        guest.stdin.write(json.dumps(dict(op="write", path=name, offset=rng.randrange(0, size - 9000),
                                          data="q" * rng.randrange(1, 9000))).encode() + b"\n")
    guest.stdin.flush()
    time.sleep(1.0)  # let them write for a while (a benchmark's duration, not an ordering)

    def at_freeze():
        until(lambda: c.status(path).waiting >= 1, what="a writer to be held")
        shutil.copyfile(path, ref1)

    second = backup(c, path, dest, first.mark, after_freeze=at_freeze)
    stop_all(procs)
    guest.stdin.close()
    guest.wait(60)
    same = compare_pages(dest, ref1) == set()
    changed = compare_pages(ref0, ref1)
    reported = {p for o, n in second.ranges for p in range(o // PAGE, (o + n) // PAGE)}
    return dict(size=size, identical_to_snapshot=same, changed_pages=len(changed),
                reported_pages=len(reported), missed_pages=len(changed - reported),
                excess_pages=len(reported - changed), bytes_copied=second.bytes_copied,
                frozen_ns=second.frozen_ns, incremental=second.incremental)


def run(args) -> dict:
    work = tempfile.mkdtemp(prefix="cleanlease-seeds-", dir="/tmp")
    export = os.path.join(work, "export")
    os.mkdir(export)
    daemon = Daemon(export, os.path.join(work, "host.sock"))
    out: dict = dict(size_mib=args.size_mib)
    try:
        c = ControlClient(daemon.control)
        reps = 5 if args.quick else 20
        sizes = [1, 64] + ([args.size_mib] if args.size_mib > 64 else [])
        out["freeze"] = []
        for size in sizes:
            f = os.path.join(export, f"f{size}")
            progress(f"making a {size} MiB file")
            make_file(f, size << 20)
            for writers in ((0, 1, 4) if args.quick else (0, 1, 4, 16)):
                progress(f"freeze latency: {size} MiB, {writers} writers")
                row = freeze_latency(c, f, writers, reps)
                row["size_mib"] = size
                out["freeze"].append(row)
            if size != sizes[-1]:
                os.unlink(f)
        big = os.path.join(export, f"f{sizes[-1]}")
        out["backup"] = []
        dest = os.path.join(work, "backup")
        progress("baseline: a plain copy without the daemon")
        out["plain_copy_ns"] = min(plain_copy(big, os.path.join(work, "plain")) for _ in range(2))
        os.unlink(os.path.join(work, "plain"))
        for fraction in (0.01, 0.10, 0.50):
            progress(f"backup: full, then {fraction:.0%} changed, incremental")
            full = backup(c, big, dest)
            changed = change(big, fraction, seed=int(fraction * 100))
            inc = backup(c, big, dest, full.mark)
            full2 = backup(c, big, dest)
            out["backup"].append(dict(fraction=fraction, changed_bytes=changed,
                                      full_frozen_ns=full2.frozen_ns,
                                      full_bytes=full2.bytes_copied,
                                      inc_frozen_ns=inc.frozen_ns, inc_bytes=inc.bytes_copied))
        progress("incremental backup under concurrent host-local and guest writers")
        out["under_writers"] = under_writers(c, daemon, export, big, work)
        progress("stores through a shared writable mapping made before a freeze")
        out["mmap"] = mmap_stores(c, export)
        c.close()
    finally:
        daemon.stop()
        shutil.rmtree(work, ignore_errors=True)
    return out


def report(r: dict) -> str:
    lines = ["### Freeze latency", "",
             "| file | writers busy on it | FREEZE round trip p50 (ms) | max (ms) | STATUS round "
             "trip p50 (ms, baseline) | ratio | THAW until all held writers went (ms) |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for f in r["freeze"]:
        lines.append(f"| {f['size_mib']} MiB | {f['writers']} | {ms(f['freeze_ns'])} | "
                     f"{ms(f['freeze_max_ns'])} | {ms(f['status_ns'])} | "
                     f"{f['freeze_ns'] / f['status_ns']:.1f} | {ms(f['thaw_ns'])} |")
    lines += ["", f"### Backup of a {r['size_mib']} MiB file", "",
              f"Baseline: a plain copy_file_range of the whole file without the daemon: "
              f"{ms(r['plain_copy_ns'])} ms.", "",
              "| changed | full: frozen (ms) | bytes | incremental: frozen (ms) | bytes | "
              "incremental / full | full / plain copy |", "|---:|---:|---:|---:|---:|---:|---:|"]
    for b in r["backup"]:
        lines.append(f"| {b['fraction']:.0%} | {ms(b['full_frozen_ns'])} | {b['full_bytes']} | "
                     f"{ms(b['inc_frozen_ns'])} | {b['inc_bytes']} | "
                     f"{b['inc_frozen_ns'] / b['full_frozen_ns']:.2f} | "
                     f"{b['full_frozen_ns'] / r['plain_copy_ns']:.2f} |")
    u = r["under_writers"]
    lines += ["", "### Incremental backup under concurrent writers", "",
              f"{u['size'] >> 20} MiB file, one host-local writer (random pwrites in the first "
              "eighth) and one guest (200 writes anywhere): backup identical to the snapshot "
              f"taken at the freeze: **{u['identical_to_snapshot']}**; changed pages "
              f"{u['changed_pages']}, reported {u['reported_pages']}, missed "
              f"{u['missed_pages']}, excess {u['excess_pages']} "
              f"({u['excess_pages'] / max(1, u['reported_pages']):.1%}); copied "
              f"{u['bytes_copied']} bytes, frozen {ms(u['frozen_ns'])} ms.", "",
              "### Stores through a shared writable mapping made before the freeze", "",
              "| page | store returned while frozen | visible in the file while frozen | "
              "held by the daemon |", "|---|---|---|---:|"]
    for m in r["mmap"]:
        lines.append(f"| {m['page']} | {m['store_returned_while_frozen']} | "
                     f"{m['visible_while_frozen']} | {m['held']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.seeds", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=int, default=1024,
                        help="the large file's size (default: %(default)s, the issue's 1 GiB)")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions and writers")
    parser.add_argument("--json", metavar="PATH", help="also write every figure as JSON")
    args = parser.parse_args(argv)
    result = run(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    print(report(result))
    return 0 if result["under_writers"]["identical_to_snapshot"] and \
        result["under_writers"]["missed_pages"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
