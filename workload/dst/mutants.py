"""`make mutants`: does the simulator catch each removed safety step?

Each patch in tests/mutants/ removes one safety step from the project's own
code.  For each, the packages are copied to a temporary directory, the
patch is applied there (the worktree is never touched), and the copy's
simulator runs seeds 0, 1, 2, ... until one fails, up to `--max-seeds`.
The table says, per mutant, the first catching seed, how many schedules
that took, and the invariant it broke; a mutant no seed catches is a
finding about the simulator (exit status 1).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PACKAGES = ("host", "guest", "protocol", "workload")
MUTANTS = os.path.join(ROOT, "tests", "mutants")


def mutant_names() -> list[str]:
    return sorted(name[:-len(".patch")] for name in os.listdir(MUTANTS) if name.endswith(".patch"))


def hunt(name: str, *, max_seeds: int, steps: int, jobs: int) -> dict:
    """Apply mutant `name` to a copy and run seeds until one fails."""
    with tempfile.TemporaryDirectory(prefix=f"cleanlease-mutant-{name}-") as tmp:
        for package in PACKAGES:
            shutil.copytree(os.path.join(ROOT, package), os.path.join(tmp, package),
                            ignore=shutil.ignore_patterns("__pycache__"))
        patch = os.path.join(MUTANTS, f"{name}.patch")
        applied = subprocess.run(["patch", "-s", "-p1", "-d", tmp, "-i", patch],
                                 capture_output=True, text=True)
        if applied.returncode != 0:
            return {"mutant": name, "error": f"patch does not apply: {applied.stdout}{applied.stderr}"}
        started = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-m", "workload.dst.mutants", "--worker", str(max_seeds), str(steps),
             str(jobs)], cwd=tmp, capture_output=True, text=True,
            env={**os.environ, "PYTHONPATH": tmp})
        if done.returncode != 0:
            return {"mutant": name, "error": done.stderr.strip().splitlines()[-1:] or "failed"}
        result = json.loads(done.stdout.strip().splitlines()[-1])
        result.update(mutant=name, seconds=time.perf_counter() - started)
        return result


def _worker(max_seeds: int, steps: int, jobs: int) -> None:
    """In the patched copy: the first failing seed among 0 .. max_seeds-1."""
    from workload.dst.run import run_seeds

    base, batch = 0, 50
    while base < max_seeds:
        count = min(batch, max_seeds - base)
        _, failures = run_seeds(count, steps=steps, seed_base=base, jobs=jobs)
        if failures:
            seed, violation, _ = failures[0]
            print(json.dumps({"seed": seed, "schedules": seed + 1,
                              "invariant": violation.split(":")[0], "detail": violation}))
            return
        base += count
        batch = min(batch * 2, 1000)
    print(json.dumps({"seed": None, "schedules": max_seeds}))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workload.dst.mutants",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="mutants to run (default: every patch)")
    parser.add_argument("--max-seeds", type=int, default=10000)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--worker", nargs=3, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(*args.worker)
        return 0
    names = args.names or mutant_names()
    print(f"{'mutant':<26} {'first seed':>10} {'schedules':>9}  invariant broken")
    missed = 0
    for name in names:
        r = hunt(name, max_seeds=args.max_seeds, steps=args.steps, jobs=args.jobs)
        if "error" in r:
            print(f"{name:<26} error: {r['error']}")
            missed += 1
        elif r["seed"] is None:
            print(f"{name:<26} {'none':>10} {r['schedules']:>9}  NOT CAUGHT")
            missed += 1
        else:
            print(f"{name:<26} {r['seed']:>10} {r['schedules']:>9}  {r['detail'][:90]}")
        sys.stdout.flush()
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
