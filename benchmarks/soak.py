"""`make soak`: each attack of issue 13 against a real daemon while good guests work.

    python -m benchmarks.soak [--duration 8] [--attacks a,b,...] [--json PATH]

For a baseline run and then one run per attack, a fresh `cleanlease host`
process (TCP on loopback with a token, RLIMIT_NOFILE 1024 as Debian's
default, the best detector here) serves 3 well-behaved guests, separate
processes with the library client (benchmarks/soak_guest.py), that read
stamped blocks and write their own, while a host-local process
(benchmarks/soak_writer.py) writes stamped blocks into a data file every
100 ms.  During the attack the
harness samples the daemon's RSS and open descriptors every 50 ms.

A baseline runs first and last; each attack's p99 is judged against the
lower of the two (the stricter: other load on the machine varies).
Printed per run: daemon RSS before / peak / after, descriptors in use
(peak) / limit, good-guest read p50 / p99 (and the ratio of p99 to the
baseline's), the longest good write, newcomers' longest lock-out (where the
attack is about slots), and what the daemon did (its counters and its log
lines, counted).  Exit 1 if any promise breaks: RSS peak <= 256 MiB, the
descriptors never exhausted (peak < limit, no event the detector could not
get an fd for, no host-local write refused), good-guest p99 under attack
<= 5x the baseline's, no newcomer locked out longer than the handshake
timeout by unauthenticated peers (by silent sessions: longer than the idle
timeout and one sweep), every good read and write correct, the daemon alive.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import select
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

from workload import attacks
from workload.stamp import BLOCK_SIZE, Stamp, make_block

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GUESTS = 3
FD_LIMIT = 1024
HANDSHAKE_TIMEOUT_MS = 2000
IDLE_TIMEOUT_MS = 3000
HOST_ARGS = ["--fd-limit", str(FD_LIMIT), "--handshake-timeout", str(HANDSHAKE_TIMEOUT_MS),
             "--idle-timeout", str(IDLE_TIMEOUT_MS), "--frame-timeout", "2000",
             "--output-timeout", "2000", "--lease-term", "2000"]
RSS_LIMIT = 256 << 20
P99_RATIO = 5.0


# --- the daemon and the good guests ----------------------------------------------------------

@dataclass
class Daemon:
    proc: subprocess.Popen
    address: str
    stats_path: str
    log: list[str] = field(default_factory=list)

    def rss(self) -> int:
        try:
            with open(f"/proc/{self.proc.pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return 0

    def fds(self) -> int:
        try:
            return len(os.listdir(f"/proc/{self.proc.pid}/fd"))
        except OSError:
            return 0

    def stop(self) -> dict:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log = self.proc.stderr.read().decode(errors="replace").splitlines()
        try:
            with open(self.stats_path) as f:
                return json.load(f)
        except (OSError, ValueError):
            return {}


def start_daemon(work: str, export: str, token_file: str, tag: str) -> Daemon:
    stats = os.path.join(work, f"stats-{tag}.json")
    proc = subprocess.Popen(
        [sys.executable, "-m", "workload.cli", "host", "--export", export, "--listen",
         "tcp:127.0.0.1:0", "--token-file", token_file, "--stats", stats, *HOST_ARGS],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    ready, _, _ = select.select([proc.stdout], [], [], 30)
    line = proc.stdout.readline().decode() if ready else ""
    if not line.startswith("READY"):
        proc.kill()
        raise SystemExit(f"soak: the host did not start: {line!r} "
                         f"{proc.stderr.read().decode(errors='replace')[-2000:]}")
    return Daemon(proc, line.split()[1], stats)


def start_guests(address: str, token_file: str, duration: float) -> list[subprocess.Popen]:
    guests = [subprocess.Popen([sys.executable, "-m", "benchmarks.soak_guest", address, f"good{i}",
                                str(i), str(duration), token_file],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
              for i in range(GUESTS)]
    for g in guests:
        ready, _, _ = select.select([g.stdout], [], [], 30)
        line = g.stdout.readline().decode() if ready else ""
        if line.strip() != "ready":
            raise SystemExit(f"soak: a good guest did not start: {line!r} "
                             f"{g.stderr.read().decode(errors='replace')[-2000:]}")
    return guests


def collect(guests: list[subprocess.Popen]) -> list[dict]:
    out = []
    for g in guests:
        try:
            stdout, stderr = g.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            g.kill()
            stdout, stderr = g.communicate()
        lines = stdout.decode().strip().splitlines()
        try:
            out.append(json.loads(lines[-1]))
        except (IndexError, ValueError):
            out.append({"reads": [], "writes": [], "failures": [stderr.decode()[-500:]],
                        "failure_count": 1})
    return out


def start_writer(export: str, duration: float) -> subprocess.Popen:
    """A host-local writer process (benchmarks/soak_writer.py) on data-0."""
    return subprocess.Popen([sys.executable, "-m", "benchmarks.soak_writer",
                             os.path.join(export, "data-0"), str(duration)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)


def writer_result(writer: subprocess.Popen) -> dict:
    try:
        stdout, stderr = writer.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        writer.kill()
        writer.communicate()
        return {"writes": 0, "error_count": 1, "errors": ["hung in a write"], "took": []}
    try:
        return json.loads(stdout.decode().strip().splitlines()[-1])
    except (IndexError, ValueError):
        return {"writes": 0, "error_count": 1, "errors": [stderr.decode()[-300:]], "took": []}


# --- the attacks -------------------------------------------------------------------------------

@dataclass
class Context:
    address: str
    token: bytes
    export: str
    stop: threading.Event
    saw: dict = field(default_factory=dict)
    lockouts: list[float] = field(default_factory=list)


def _newcomers(ctx: Context) -> None:
    """Every 0.5 s a newcomer with the token tries to get in, retrying every
    50 ms; the time until it is in is its lock-out."""
    while not ctx.stop.wait(0.5):
        start = time.monotonic()
        while not ctx.stop.is_set():
            peer = None
            try:
                peer = attacks.Peer(ctx.address, timeout=5.0)
                if peer.handshake("newcomer", ctx.token) == 0:
                    break
            except (OSError, attacks.PeerClosed, AssertionError):
                pass
            finally:
                if peer is not None:
                    peer.close()
            time.sleep(0.05)
        ctx.lockouts.append(time.monotonic() - start)


def attack_pipelined_reads(ctx: Context) -> None:
    """4 peers pipeline 256 READs of 1 MiB each and never read; replaced when cut."""
    peers: list[attacks.Peer] = []
    started = 0
    while not ctx.stop.is_set():
        for p in [p for p in peers if p.closed_by_daemon(0)]:
            p.close()
            peers.remove(p)
        while len(peers) < 4:
            peers.append(attacks.pipelined_reads(ctx.address, "big", token=ctx.token))
            started += 1
        ctx.stop.wait(0.2)
    for p in peers:
        p.close()
    ctx.saw["attackers started"] = started


def attack_descriptor_hog(ctx: Context) -> None:
    """8 peers LOOKUP and OPEN 400 files each and hold them."""
    names = [f"hog-{i:04d}" for i in range(3200)]
    results = [None] * 8

    def hog(i):
        results[i] = attacks.descriptor_hog(ctx.address, names[i * 400:(i + 1) * 400], ctx.token)

    threads = [threading.Thread(target=hog, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    refused = Counter()
    got = 0
    for peer, n, r in results:
        got += n
        refused.update({os.strerror(e): c for e, c in r.items()})
    ctx.saw["fds taken"] = got
    ctx.saw["refused"] = dict(refused)
    ctx.stop.wait()
    for peer, _, _ in results:
        peer.close()


def attack_handshake_flood(ctx: Context) -> None:
    """10 connections from each of 10 loopback addresses that never say HELLO,
    replaced as the daemon closes them; newcomers measure their lock-out."""
    flood = attacks.Flood(ctx.address, [f"127.0.0.{i}" for i in range(2, 12)], per_source=10)
    prober = threading.Thread(target=_newcomers, args=(ctx,))
    prober.start()
    opened = 0
    while not ctx.stop.is_set():
        before = len(flood.peers)
        flood.fill(deadline=time.monotonic() + 0.5)
        opened += max(0, len(flood.peers) - before)
        ctx.stop.wait(0.25)
    prober.join()
    flood.close()
    ctx.saw["connections kept open"] = opened


def attack_silent_sessions(ctx: Context) -> None:
    """Sessions that say HELLO and AUTH and then nothing, until the daemon is full
    (EUSERS); newcomers measure how long they are locked out."""
    peers = []
    while len(peers) < 64:
        try:
            peers.append(attacks.silent_session(ctx.address, ctx.token))
        except OSError:
            break  # EUSERS: full
    ctx.saw["silent sessions"] = len(peers)
    _newcomers(ctx)
    ctx.saw["closed by the daemon"] = sum(p.closed_by_daemon(0) for p in peers)
    for p in peers:
        p.close()


def attack_trickled_frames(ctx: Context) -> None:
    """16 sessions each trickle a frame's payload at 1 byte per second."""
    results = []

    def trickle():
        while not ctx.stop.is_set():
            _, closed, took = attacks.trickled_frame(ctx.address, interval=1.0, duration=30,
                                                     token=ctx.token)
            results.append(took if closed else None)

    threads = [threading.Thread(target=trickle, daemon=True) for _ in range(16)]
    for t in threads:
        t.start()
    ctx.stop.wait()
    cut = [t for t in results if t is not None]
    ctx.saw["frames cut"] = len(cut)
    ctx.saw["cut after (s, max)"] = round(max(cut), 2) if cut else None


def attack_failing_forgets(ctx: Context) -> None:
    """20,000 FORGETs of node ids the peer does not hold (no reply is due)."""
    peers = []
    for _ in range(20):
        peers.append(attacks.failing_forgets(ctx.address, 1000, ctx.token))
        if ctx.stop.wait(0.2):
            break
    ctx.saw["forgets sent"] = 1000 * len(peers)
    ctx.stop.wait()
    for p in peers:
        p.close()


def attack_wrong_tokens(ctx: Context) -> None:
    """8 guessers from one address send wrong proofs, one connection each, back to back."""
    counts = []

    def guess():
        n = 0
        while not ctx.stop.is_set():
            try:
                attacks.wrong_tokens(ctx.address, 1, "127.0.0.5")
            except (OSError, AssertionError):
                pass
            n += 1
        counts.append(n)

    threads = [threading.Thread(target=guess) for _ in range(8)]
    start = time.monotonic()
    for t in threads:
        t.start()
    ctx.stop.wait()
    for t in threads:
        t.join()
    ctx.saw["guesses"] = sum(counts)
    ctx.saw["guesses/s"] = round(sum(counts) / (time.monotonic() - start), 1)


def attack_unknown_noreply(ctx: Context) -> None:
    """20,000 FS requests with an unknown opcode and NEED_REPLY clear."""
    peers = []
    for _ in range(20):
        peers.append(attacks.unknown_noreply(ctx.address, 1000, ctx.token))
        if ctx.stop.wait(0.2):
            break
    ctx.saw["frames sent"] = 1000 * len(peers)
    ctx.stop.wait()
    for p in peers:
        p.close()


ATTACKS = {
    "pipelined-reads": attack_pipelined_reads,
    "descriptor-hog": attack_descriptor_hog,
    "handshake-flood": attack_handshake_flood,
    "silent-sessions": attack_silent_sessions,
    "trickled-frames": attack_trickled_frames,
    "failing-forgets": attack_failing_forgets,
    "wrong-tokens": attack_wrong_tokens,
    "unknown-noreply": attack_unknown_noreply,
}

# What to count in the daemon's log: its one line per kind of action.
LOG_PATTERNS = {
    "disconnected: replies unread": r"bytes of replies unread",
    "disconnected: frame not complete": r"a frame not complete",
    "closed: idle session": r"nothing sent for \d+ ms",
    "refused: handshakes per address": r"handshakes under way already",
    "evicted: oldest handshake": r"closing the oldest handshake",
    "closed: handshake timeout": r"no finished handshake",
    "refused: handshake slots": r"still in their handshake",
    "wrong token (delayed)": r"wrong token, refusing it",
    "descriptor budget": r"as one guest may|descriptor budget allows",
    "FORGET failed (once per session)": r"FORGET failed",
    "unknown opcode, no reply (once per session)": r"without NEED_REPLY, ignored",
    "fanotify: no fd": r"no descriptor for an event",
    "Traceback": r"Traceback",
}
COUNTERS = ("output_paused", "output_stuck", "slow_frames", "idle_closed",
            "handshakes_per_peer_refused", "handshakes_evicted", "handshakes_refused",
            "auth_failures", "wrong_token_delays_ms", "fd_refusals", "noreply_errors",
            "unsupported_noreply", "protocol_errors")


# --- one run --------------------------------------------------------------------------------

def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def run_one(name: str, work: str, export: str, token_file: str, token: bytes,
            duration: float) -> dict:
    daemon = start_daemon(work, export, token_file, name)
    # A new daemon on the export waits out the leases its predecessor may have
    # granted (host/boot.py: one lease term) before any write lands: not measured.
    warmup = 2.5
    guests = start_guests(daemon.address, token_file, warmup + duration + 0.5)
    writer = start_writer(export, warmup + duration + 0.5)
    time.sleep(warmup)
    rss_before, fds_before = daemon.rss(), daemon.fds()
    ctx = Context(daemon.address, token, export, threading.Event())
    thread = None
    if name != "baseline":
        thread = threading.Thread(target=_guarded, args=(ATTACKS[name], ctx), daemon=True)
    start = time.monotonic()
    if thread:
        thread.start()
    rss_peak, fds_peak = rss_before, fds_before
    while time.monotonic() - start < duration:
        rss_peak = max(rss_peak, daemon.rss())
        fds_peak = max(fds_peak, daemon.fds())
        time.sleep(0.05)
    ctx.stop.set()
    end = time.monotonic()
    if thread:
        thread.join(30)
    time.sleep(1.0)
    rss_after, alive = daemon.rss(), daemon.proc.poll() is None
    written = writer_result(writer)
    results = collect(guests)
    stats = daemon.stop()
    reads = [took for r in results for (t, took) in r["reads"] if start <= t <= end]
    writes = [took for r in results for (t, took) in r["writes"] if start <= t <= end]
    log_counts = {label: sum(bool(re.search(pattern, line)) for line in daemon.log)
                  for label, pattern in LOG_PATTERNS.items()}
    return {
        "attack": name, "alive": alive,
        "rss_before": rss_before, "rss_peak": rss_peak, "rss_after": rss_after,
        "fds_before": fds_before, "fds_peak": fds_peak, "fd_limit": FD_LIMIT,
        "reads": len(reads), "read_p50_ms": _percentile(reads, 0.5) * 1000,
        "read_p99_ms": _percentile(reads, 0.99) * 1000,
        "writes": len(writes), "write_max_ms": max(writes, default=0) * 1000,
        "guest_failures": sum(r["failure_count"] for r in results),
        "guest_failure_samples": [f for r in results for f in r["failures"]][:5],
        "host_writes": written["writes"], "host_write_errors": written["error_count"],
        "host_write_error_samples": written["errors"],
        "host_write_max_ms": max((took for t, took in written["took"] if start <= t <= end),
                                 default=0) * 1000,
        "lockout_max_s": max(ctx.lockouts, default=None), "newcomers": len(ctx.lockouts),
        "attacker_saw": ctx.saw,
        "counters": {k: stats.get(k) for k in COUNTERS if stats.get(k)},
        "no_fd_events": (stats.get("detector_stats") or {}).get("no_fd", 0),
        "detector": stats.get("detector"),
        "log": {k: v for k, v in log_counts.items() if v},
    }


def _guarded(attack, ctx: Context) -> None:
    try:
        attack(ctx)
    except Exception as exc:  # noqa: BLE001 - reported as what the attacker saw
        ctx.saw["attacker error"] = f"{type(exc).__name__}: {exc}"


def judge(run: dict, baseline: dict) -> list[str]:
    """The promises `run` broke (empty: none)."""
    broken = []
    if not run["alive"]:
        broken.append("the daemon died")
    if run["rss_peak"] > RSS_LIMIT:
        broken.append(f"RSS peak {run['rss_peak'] >> 20} MiB > {RSS_LIMIT >> 20} MiB")
    if run["fds_peak"] >= run["fd_limit"] or run["no_fd_events"] or run["host_write_errors"]:
        broken.append(f"descriptors exhausted (peak {run['fds_peak']}/{run['fd_limit']}, "
                      f"{run['no_fd_events']} events without an fd, "
                      f"{run['host_write_errors']} host writes refused: "
                      f"{run['host_write_error_samples']})")
    if run["guest_failures"]:
        broken.append(f"{run['guest_failures']} good-guest failures: "
                      f"{run['guest_failure_samples']}")
    if run["log"].get("Traceback"):
        broken.append("tracebacks in the daemon's log")
    if run["attack"] != "baseline":
        limit = P99_RATIO * baseline["read_p99_ms"]
        if not run["reads"] or run["read_p99_ms"] > limit:
            broken.append(f"read p99 {run['read_p99_ms']:.2f} ms > {P99_RATIO}x baseline "
                          f"({limit:.2f} ms)")
    lockout = run["lockout_max_s"]
    if lockout is not None:
        bound = (HANDSHAKE_TIMEOUT_MS / 1000 if run["attack"] == "handshake-flood"
                 else IDLE_TIMEOUT_MS / 1000 * 1.25 + 1.0)
        if lockout > bound:
            broken.append(f"a newcomer locked out {lockout:.2f} s > {bound:.2f} s")
    if run["attacker_saw"].get("attacker error"):
        broken.append(f"the attack itself failed: {run['attacker_saw']['attacker error']}")
    return broken


def report(run: dict, baseline: dict | None) -> str:
    mib = lambda b: f"{b / (1 << 20):.0f}"  # noqa: E731
    ratio = (f" ({run['read_p99_ms'] / baseline['read_p99_ms']:.1f}x)"
             if baseline and baseline["read_p99_ms"] else "")
    lines = [
        f"== {run['attack']}",
        f"   daemon RSS MiB before/peak/after: {mib(run['rss_before'])}/{mib(run['rss_peak'])}/"
        f"{mib(run['rss_after'])}   fds peak/limit: {run['fds_peak']}/{run['fd_limit']}",
        f"   good reads: {run['reads']}, p50 {run['read_p50_ms']:.2f} ms, p99 "
        f"{run['read_p99_ms']:.2f} ms{ratio}; good writes: {run['writes']}, longest "
        f"{run['write_max_ms']:.1f} ms; host-local writes {run['host_writes']} "
        f"({run['host_write_errors']} refused, longest {run['host_write_max_ms']:.1f} ms)",
    ]
    if run["lockout_max_s"] is not None:
        lines.append(f"   newcomers: {run['newcomers']}, longest lock-out "
                     f"{run['lockout_max_s']:.2f} s")
    if run["attacker_saw"]:
        lines.append(f"   attacker saw: {run['attacker_saw']}")
    if run["counters"]:
        lines.append(f"   daemon counters: {run['counters']}")
    if run["log"]:
        lines.append(f"   daemon log lines: {run['log']}")
    return "\n".join(lines)


def setup_export(export: str) -> None:
    os.makedirs(export)
    for i in range(4):
        with open(os.path.join(export, f"data-{i}"), "wb") as f:
            for block in range(64):
                f.write(make_block(Stamp.initial(i, block)))
    for g in range(GUESTS):
        with open(os.path.join(export, f"w-good{g}"), "wb") as f:
            f.write(bytes(16 * BLOCK_SIZE))
    with open(os.path.join(export, "big"), "wb") as f:
        f.write(os.urandom(1 << 20))
    for i in range(3200):
        with open(os.path.join(export, f"hog-{i:04d}"), "wb") as f:
            f.write(b"h")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.soak",
        description="Each attack of issue 13 against a real daemon while 3 good guests read "
                    "and write; prints RSS, descriptors, latencies and what the daemon did, "
                    "and exits 1 if a promise breaks (docs/reliability.md, \"make soak\").")
    parser.add_argument("--duration", type=float, default=8.0, metavar="S",
                        help="seconds of each attack, and of the baseline (default: %(default)s)")
    parser.add_argument("--attacks", default=",".join(ATTACKS),
                        help=f"comma-separated subset of: {', '.join(ATTACKS)}")
    parser.add_argument("--json", metavar="PATH", help="write every run's figures here")
    args = parser.parse_args(argv)
    chosen = [a for a in args.attacks.split(",") if a]
    unknown = [a for a in chosen if a not in ATTACKS]
    if unknown:
        parser.error(f"unknown attack(s) {unknown}; choose from {', '.join(ATTACKS)}")
    runs, failed = [], False
    with tempfile.TemporaryDirectory(prefix="cleanlease-soak-", dir="/tmp") as work:
        export = os.path.join(work, "export")
        setup_export(export)
        token_file = os.path.join(work, "cl.token")
        token = os.urandom(32).hex()
        fd = os.open(token_file, os.O_WRONLY | os.O_CREAT, 0o600)
        os.write(fd, token.encode() + b"\n")
        os.close(fd)
        # A baseline first and last: each attack is judged against the one with
        # the lower p99 (the stricter), since other load on the machine varies.
        names = ["baseline", *chosen, "baseline"]
        for i, name in enumerate(names):
            print(f"[{i + 1}/{len(names)}] {name} ({args.duration:g} s) ...", flush=True)
            run = run_one(name, work, export, token_file, token.encode(), args.duration)
            runs.append(run)
            print(report(run, None), flush=True)
        subprocess.run(["umount", "-l", export], capture_output=True)  # a bind a killed host left
    baseline = min((r for r in runs if r["attack"] == "baseline"), key=lambda r: r["read_p99_ms"])
    print(f"\nreference baseline: read p99 {baseline['read_p99_ms']:.2f} ms (the lower of the two)")
    for run in runs:
        run["broken"] = judge(run, baseline)
        failed |= bool(run["broken"])
        for promise in run["broken"]:
            print(f"   BROKEN: {run['attack']}: {promise}", flush=True)
    print()
    print(f"{'attack':<17} {'RSS MiB b/peak/a':>17} {'fds peak':>8} {'p50 ms':>7} {'p99 ms':>7} "
          f"{'x base':>6} {'write max ms':>12} {'lock-out s':>10}  verdict")
    for run in runs:
        ratio = run["read_p99_ms"] / baseline["read_p99_ms"] if baseline["read_p99_ms"] else 0.0
        rss = (f"{run['rss_before'] >> 20}/{run['rss_peak'] >> 20}/{run['rss_after'] >> 20}")
        lock = "-" if run["lockout_max_s"] is None else f"{run['lockout_max_s']:.2f}"
        print(f"{run['attack']:<17} {rss:>17} {run['fds_peak']:>4}/{run['fd_limit']:<4} "
              f"{run['read_p50_ms']:>6.2f} {run['read_p99_ms']:>7.2f} {ratio:>6.1f} "
              f"{run['write_max_ms']:>12.1f} {lock:>10}  "
              f"{'BROKEN' if run['broken'] else 'ok'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(runs, f, indent=2)
    print("soak: " + ("a promise broke (see BROKEN above)" if failed else "every promise held"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
