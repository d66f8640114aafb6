"""Figures from a simulation, as rich tables, JSON and a plot.

Every number here is computed from what the processes logged and counted in
the run; nothing is typed in.  Hit rates count read operations (a read op is
a hit when every page came from the guest's cache).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from rich.console import Console
from rich.table import Table

from workload.simulate import PolicyRun


def percentile(values: list[int], q: float) -> float | None:
    """The q-quantile (0..1) by nearest rank, or None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


def _us(ns: float | None) -> float | None:
    return None if ns is None else ns / 1000.0


@dataclass
class Row:
    policy: str
    detector: str
    reads: int
    hits: int
    hit_rate: float
    oracle_hit_rate: float
    hit_over_oracle: float | None
    stale_reads: int
    stale_blocks: int
    worst_stale_ms: float
    corrupt: int
    invalidations: int
    inval_entries: int
    acks: int
    fenced: int
    bytes_to_guests: int
    read_hit_p50_us: float | None
    read_hit_p99_us: float | None
    read_miss_p50_us: float | None
    read_miss_p99_us: float | None
    write_first_p50_us: float | None
    write_first_p99_us: float | None
    write_other_p50_us: float | None
    write_other_p99_us: float | None
    ops: int
    ops_per_s: float
    errors: int
    host_write_p50_us: float | None = None
    host_write_p99_us: float | None = None
    # What the host's recalls covered (its stats; "inode" from hosts before it
    # was reported): `--granularity`, or inode where the detector forced it.
    granularity: str = "inode"


def summarize(run: PolicyRun) -> Row:
    guests = [a for a in run.actors if "reads" in a]
    reads = sum(a["reads"] for a in guests)
    hits = sum(a["hits"] for a in guests)

    def collect(key: str) -> list[int]:
        return [v for a in run.actors for v in a["latencies"][key]]

    hit_rate = hits / reads if reads else 0.0
    orc = run.oracle.hit_rate
    host_writes = [v for a in run.actors if "reads" not in a for v in a["latencies"]["write_other"]]
    ops = sum(a["ops"] for a in run.actors)
    return Row(
        policy=run.policy, detector=run.detector, granularity=run.host.get("granularity", "inode"),
        reads=reads, hits=hits, hit_rate=hit_rate,
        oracle_hit_rate=orc, hit_over_oracle=(hit_rate / orc) if orc else None,
        stale_reads=run.check.stale_ops, stale_blocks=run.check.stale_reads,
        worst_stale_ms=run.check.worst_stale_age_ns / 1e6,
        corrupt=sum(run.check.corrupt.values()) + run.check.phantom,
        invalidations=run.host.get("invalidations_sent", 0),
        inval_entries=run.host.get("inval_entries_sent", 0),
        acks=run.host.get("acks", 0), fenced=run.host.get("fenced", 0),
        bytes_to_guests=run.host.get("bytes_to_guests", 0),
        read_hit_p50_us=_us(percentile(collect("read_hit"), 0.5)),
        read_hit_p99_us=_us(percentile(collect("read_hit"), 0.99)),
        read_miss_p50_us=_us(percentile(collect("read_miss"), 0.5)),
        read_miss_p99_us=_us(percentile(collect("read_miss"), 0.99)),
        write_first_p50_us=_us(percentile(collect("write_first"), 0.5)),
        write_first_p99_us=_us(percentile(collect("write_first"), 0.99)),
        write_other_p50_us=_us(percentile(collect("write_other"), 0.5)),
        write_other_p99_us=_us(percentile(collect("write_other"), 0.99)),
        ops=ops, ops_per_s=ops / run.elapsed_s if run.elapsed_s else 0.0,
        errors=sum(sum(a.get("errors", {}).values()) for a in run.actors),
        host_write_p50_us=_us(percentile(host_writes, 0.5)),
        host_write_p99_us=_us(percentile(host_writes, 0.99)),
    )


def per_guest_rows(run: PolicyRun) -> list[dict]:
    rows = []
    for a in run.actors:
        if "reads" not in a:
            continue
        elapsed = a["elapsed_ns"] / 1e9 or 1.0
        rows.append(dict(actor=a["actor"], reads=a["reads"], hits=a["hits"],
                         hit_rate=a["hits"] / a["reads"] if a["reads"] else 0.0,
                         invalidations=a["invalidations"] + a["inval_entries"],
                         ops=a["ops"], ops_per_s=a["ops"] / elapsed))
    return rows


def _fmt(value, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def guest_table(run: PolicyRun) -> Table:
    table = Table(title=f"{run.workload}, policy {run.policy}: per guest", title_justify="left")
    for col in ("guest", "reads", "hits", "hit rate", "invalidations", "ops/s"):
        table.add_column(col, justify="right" if col != "guest" else "left")
    rows = per_guest_rows(run)
    for r in rows:
        table.add_row(r["actor"], str(r["reads"]), str(r["hits"]), f"{r['hit_rate']:.1%}",
                      str(r["invalidations"]), f"{r['ops_per_s']:.0f}")
    reads = sum(r["reads"] for r in rows)
    hits = sum(r["hits"] for r in rows)
    table.add_row("total", str(reads), str(hits), f"{hits / reads if reads else 0:.1%}",
                  str(sum(r["invalidations"] for r in rows)),
                  f"{sum(r['ops_per_s'] for r in rows):.0f}", style="bold")
    return table


def policy_tables(workload: str, rows: list[Row]) -> list[Table]:
    """Two tables, so that each fits a terminal: caching and coherence, then latency."""
    cache = Table(title=f"{workload}: caching and coherence per policy", title_justify="left")
    for col in ("policy", "reads", "hit rate", "oracle", "hit/oracle", "stale reads",
                "worst stale ms", "inval/acks", "MB to guests"):
        cache.add_column(col, justify="left" if col == "policy" else "right")
    latency = Table(title=f"{workload}: latency (µs, p50/p99) and throughput", title_justify="left")
    for col in ("policy", "read hit", "read miss", "1st dirtying write", "other writes", "ops/s"):
        latency.add_column(col, justify="left" if col == "policy" else "right")
    for r in rows:
        cache.add_row(r.policy, str(r.reads), f"{r.hit_rate:.1%}", f"{r.oracle_hit_rate:.1%}",
                      _fmt(r.hit_over_oracle, ".2f"), str(r.stale_reads),
                      f"{r.worst_stale_ms:.0f}" if r.stale_reads else "-",
                      f"{r.invalidations + r.inval_entries}/{r.acks}",
                      f"{r.bytes_to_guests / 1e6:.1f}")
        latency.add_row(r.policy, f"{_fmt(r.read_hit_p50_us)}/{_fmt(r.read_hit_p99_us)}",
                        f"{_fmt(r.read_miss_p50_us, '.0f')}/{_fmt(r.read_miss_p99_us, '.0f')}",
                        f"{_fmt(r.write_first_p50_us, '.0f')}/{_fmt(r.write_first_p99_us, '.0f')}",
                        f"{_fmt(r.write_other_p50_us, '.0f')}/{_fmt(r.write_other_p99_us, '.0f')}",
                        f"{r.ops_per_s:.0f}")
    return [cache, latency]


def markdown_table(workload: str, rows: list[Row]) -> str:
    head = ("| policy | detector / granularity | reads | hit rate | oracle | hit/oracle | stale reads | worst stale ms "
            "| inval / acks | MB to guests | hit p50/p99 µs | miss p50/p99 µs "
            "| 1st write p50/p99 µs | write p50/p99 µs | ops/s |")
    lines = [f"### {workload}", "", head, "|" + "---|" * 15]
    for r in rows:
        lines.append(
            f"| {r.policy} | {r.detector} / {r.granularity} | {r.reads} | {r.hit_rate:.1%} | {r.oracle_hit_rate:.1%} "
            f"| {_fmt(r.hit_over_oracle, '.2f')} | {r.stale_reads} | {r.worst_stale_ms:.0f} "
            f"| {r.invalidations + r.inval_entries} / {r.acks} | {r.bytes_to_guests / 1e6:.1f} "
            f"| {_fmt(r.read_hit_p50_us)}/{_fmt(r.read_hit_p99_us)} "
            f"| {_fmt(r.read_miss_p50_us, '.0f')}/{_fmt(r.read_miss_p99_us, '.0f')} "
            f"| {_fmt(r.write_first_p50_us, '.0f')}/{_fmt(r.write_first_p99_us, '.0f')} "
            f"| {_fmt(r.write_other_p50_us, '.0f')}/{_fmt(r.write_other_p99_us, '.0f')} "
            f"| {r.ops_per_s:.0f} |")
    return "\n".join(lines) + "\n"


def detector_markdown(rows: list[tuple[str, Row]]) -> str:
    """Host-local writers: the same workload and policy under each detector."""
    lines = ["| workload | policy | detector / granularity | hit rate | oracle | stale reads | worst stale ms "
             "| torn blocks | host write p50/p99 µs |", "|" + "---|" * 9]
    for workload, r in rows:
        lines.append(
            f"| {workload} | {r.policy} | {r.detector} / {r.granularity} | {r.hit_rate:.1%} | {r.oracle_hit_rate:.1%} "
            f"| {r.stale_reads} | {r.worst_stale_ms:.0f} | {r.corrupt} "
            f"| {_fmt(r.host_write_p50_us, '.0f')}/{_fmt(r.host_write_p99_us, '.0f')} |")
    return "\n".join(lines) + "\n"


def to_json(runs: list[PolicyRun], options: dict) -> dict:
    out = {"options": options, "policies": []}
    for run in runs:
        row = summarize(run)
        out["policies"].append({
            "summary": row.__dict__,
            "per_guest": per_guest_rows(run),
            "host": run.host,
            "check": {"stale_ops": run.check.stale_ops, "stale_reads": run.check.stale_reads,
                      "worst_stale_age_ns": run.check.worst_stale_age_ns,
                      "corrupt": dict(run.check.corrupt), "phantom": run.check.phantom,
                      "future": run.check.future,
                      "examples": [{"actor": e.read.actor, "file": e.read.file_id,
                                    "block": e.read.block, "age_ns": e.age_ns}
                                   for e in run.check.examples]},
            "oracle": {"read_ops": run.oracle.read_ops, "hits": run.oracle.hits,
                       "hit_rate": run.oracle.hit_rate},
        })
    return out


def write_json(path: str, runs: list[PolicyRun], options: dict) -> None:
    with open(path, "w") as f:
        json.dump(to_json(runs, options), f, indent=2)


def plot(path: str, workload: str, rows: list[Row]) -> None:
    """Hit rate (with the oracle) and stale reads per policy, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r.policy for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    xs = range(len(rows))
    left.bar(xs, [r.hit_rate * 100 for r in rows], color="tab:blue", label="hit rate")
    left.plot(xs, [r.oracle_hit_rate * 100 for r in rows], "k_", markersize=28, mew=2,
              label="oracle")
    left.set_xticks(list(xs), names, rotation=20)
    left.set_ylabel("read hit rate, %")
    left.set_ylim(0, 100)
    left.legend(loc="lower right")
    right.bar(xs, [r.stale_reads for r in rows], color="tab:red")
    right.set_xticks(list(xs), names, rotation=20)
    right.set_ylabel("stale reads")
    fig.suptitle(f"{workload}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def range_markdown(rows: list[tuple[str, str, Row]]) -> str:
    """clean-lease under inode and range granularity, one line per case: rows
    come in (inode, range) pairs of the same workload and writers."""
    lines = ["| workload | writers | hit rate, inode | hit rate, range | oracle | stale reads "
             "inode / range | invalidations inode / range | MB to guests inode / range "
             "| host write p50/p99 µs inode / range |",
             "|" + "---|" * 9]
    for (name, writers, inode), (_, _, ranged) in zip(rows[::2], rows[1::2]):
        def host_writes(r: Row) -> str:
            if r.host_write_p50_us is None:
                return "-"
            return f"{_fmt(r.host_write_p50_us, '.0f')}/{_fmt(r.host_write_p99_us, '.0f')}"
        lines.append(
            f"| {name} | {writers} | {inode.hit_rate:.1%} ({inode.granularity}) "
            f"| {ranged.hit_rate:.1%} ({ranged.granularity}) | {ranged.oracle_hit_rate:.1%} "
            f"| {inode.stale_reads} / {ranged.stale_reads} "
            f"| {inode.invalidations} / {ranged.invalidations} "
            f"| {inode.bytes_to_guests / 1e6:.1f} / {ranged.bytes_to_guests / 1e6:.1f} "
            f"| {host_writes(inode)} / {host_writes(ranged)} |")
    return "\n".join(lines) + "\n"


def print_runs(console: Console, runs: list[PolicyRun], per_guest: bool) -> list[Row]:
    rows = [summarize(run) for run in runs]
    if per_guest:
        for run in runs:
            console.print(guest_table(run))
    if runs:
        for table in policy_tables(runs[0].workload, rows):
            console.print(table)
        detectors = sorted({r.detector for r in rows})
        console.print(f"host-local change detector: {', '.join(detectors)}")
        granularities = sorted({f"{r.policy} {r.granularity}" for r in rows
                                if r.policy == "clean-lease"})
        if granularities:
            console.print(f"recall granularity: {', '.join(granularities)}"
                          + (" (inotify carries no range: whole inode)"
                             if "inotify" in detectors and any("inode" in g for g in granularities)
                             else ""))
    return rows
