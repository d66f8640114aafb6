"""`cleanlease dst`: run many seeded schedules, report the first failure with its trace.

Seed i of a run is `seed_base + i` (i from 0): the same command always runs
the same schedules, and a failing seed replays bit for bit with
`--seed S` (the same `--steps`), printing the same trace and digest.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor

from workload.dst.world import Outcome, Params, World

TRACE_LINES = 40


def run_seed(seed: int, steps: int) -> Outcome:
    return World(seed, Params(steps=steps)).run()


def _run_chunk(args) -> tuple[int, list[tuple[int, str, str]], float]:
    """Run seeds [first, first + count); return (schedules run, failures, virtual s)."""
    first, count, steps, stop_at_first = args
    failures, virtual = [], 0.0
    done = 0
    for seed in range(first, first + count):
        outcome = run_seed(seed, steps)
        done += 1
        virtual += outcome.virtual_s
        if not outcome.ok:
            failures.append((seed, str(outcome.violation), outcome.digest))
            if stop_at_first:
                break
    return done, failures, virtual


def run_seeds(count: int, *, steps: int, seed_base: int = 0, jobs: int = 1,
              stop_at_first: bool = True, progress=None) -> tuple[int, list[tuple[int, str, str]]]:
    """Run `count` schedules (seeds seed_base ...); returns (schedules run, failures)
    as (seed, violation, digest), in seed order.  `progress(done, count)` is
    called as chunks finish."""
    chunk = max(1, min(200, count // (jobs * 8) or 1))
    tasks = [(seed_base + start, min(chunk, count - start), steps, stop_at_first)
             for start in range(0, count, chunk)]
    done, failures = 0, []
    if jobs <= 1:
        results = map(_run_chunk, tasks)
        pool = None
    else:
        pool = ProcessPoolExecutor(jobs)
        results = pool.map(_run_chunk, tasks)
    try:
        for ran, found, _ in results:
            done += ran
            failures.extend(found)
            if progress is not None:
                progress(done, count)
            if failures and stop_at_first:
                break
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    failures.sort()
    return done, failures


def print_outcome(outcome: Outcome, steps: int, out=sys.stdout) -> None:
    if outcome.ok:
        print(f"seed {outcome.seed}: ok ({outcome.ops} operations, {outcome.virtual_s:.2f} s "
              f"virtual, digest {outcome.digest})", file=out)
        return
    print(f"seed {outcome.seed}: FAILED: {outcome.violation}", file=out)
    events = relevant_events(outcome)
    print(f"the last {len(events)} events before it that concern it (virtual ms, who, what; "
          f"--seed {outcome.seed} --trace prints them all):", file=out)
    for line in events:
        print(f"  {line}", file=out)
    print(f"replay: cleanlease dst --seed {outcome.seed} --steps {steps}   "
          f"(digest {outcome.digest})", file=out)


_FAULTS = ("cut", "paused", "resumed", "killed", "crashed", "closing", "up (", "fault", "log ",
           "connected")


def relevant_events(outcome: Outcome) -> list[str]:
    """The trace up to the violation: the events of its file and every fault."""
    v = outcome.violation
    events = outcome.events
    if v.at_ms is not None:
        events = [e for e in events if float(e.split("ms", 1)[0]) <= v.at_ms + 0.001]
    if v.file is not None:
        tag = f" f{v.file}"
        events = [e for e in events if tag in e or any(k in e for k in _FAULTS)]
    return events[-TRACE_LINES:]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seeds", type=int, default=100, metavar="N",
                        help="how many schedules to run (default: %(default)s)")
    parser.add_argument("--seed", type=int, metavar="S",
                        help="run (replay) only seed S, and print its trace")
    parser.add_argument("--seed-base", type=int, default=0, metavar="B",
                        help="the first seed; seeds B .. B+N-1 run (default: %(default)s, so "
                             "every run without it runs the same schedules)")
    parser.add_argument("--steps", type=int, default=Params.steps, metavar="K",
                        help="guest operations per schedule (default: %(default)s)")
    parser.add_argument("--jobs", type=int, default=1, metavar="J",
                        help="processes to run schedules in (default: %(default)s)")
    parser.add_argument("--all", action="store_true",
                        help="keep going after a failing seed and list every one")
    parser.add_argument("--trace", action="store_true",
                        help="with --seed: print the whole event trace, even when it passes")


def main(args: argparse.Namespace) -> int:
    if args.seed is not None:
        outcome = run_seed(args.seed, args.steps)
        if args.trace:
            print("\n".join(outcome.events))
        print_outcome(outcome, args.steps)
        return 0 if outcome.ok else 1
    if args.seeds <= 0 or args.steps <= 0 or args.jobs <= 0:
        print("cleanlease dst: --seeds, --steps and --jobs must be at least 1", file=sys.stderr)
        return 2
    started = time.perf_counter()
    tty = sys.stderr.isatty()
    last = [0.0]

    def progress(done: int, count: int) -> None:
        now = time.perf_counter()
        if done == count or now - last[0] >= (0.5 if tty else 10.0):
            last[0] = now
            rate = done / max(now - started, 1e-9)
            end = "\r" if tty and done < count else "\n"
            print(f"dst: {done}/{count} schedules, {rate:.0f}/s", end=end, file=sys.stderr,
                  flush=True)

    done, failures = run_seeds(args.seeds, steps=args.steps, seed_base=args.seed_base,
                               jobs=args.jobs, stop_at_first=not args.all, progress=progress)
    elapsed = time.perf_counter() - started
    print(f"dst: {done} schedules of {args.steps} operations (seeds {args.seed_base}.."
          f"{args.seed_base + done - 1}) in {elapsed:.1f} s: {done / elapsed:.1f} schedules/s "
          f"on {args.jobs} process{'es' if args.jobs > 1 else ''}; "
          f"{len(failures)} failing")
    if failures:
        for seed, violation, digest in failures[:20]:
            print(f"  seed {seed}: {violation}")
        print()
        print_outcome(run_seed(failures[0][0], args.steps), args.steps)
        return 1
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m workload.dst.run")
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
