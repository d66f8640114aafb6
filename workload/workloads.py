"""Named, seeded workloads: which files exist, which actors run, what each does when.

A workload is a pure description.  `Workload.schedule(actor, seed, duration)`
returns that actor's operations, each with the instant (offset from the
common start) at which it is due; the same seed gives the same schedule, so
every policy runs the identical workload.  Actors are paced (open loop):
an actor that falls behind runs its late operations at once, so the mix of
reads and writes does not depend on how fast a policy is.

Guest actors go through the daemon; host-local actors write into the export
directly, as an editor or a build tool on the host would.
"""

from __future__ import annotations

import bisect
import itertools
import json
import random
from dataclasses import dataclass, field
from typing import Callable, Iterator

READ, WRITE, APPEND, SAVE, FSYNC = "read", "write", "append", "save", "fsync"
KINDS = (READ, WRITE, APPEND, SAVE, FSYNC)


@dataclass(frozen=True)
class FileSpec:
    file_id: int
    path: str
    blocks: int


@dataclass(frozen=True)
class Op:
    at_ns: int  # due this long after the common start
    kind: str
    file_id: int
    block: int = 0
    nblocks: int = 1


@dataclass(frozen=True)
class Actor:
    name: str  # "g0", "g1", ... for guests; "h0", ... for host-local writers
    host_local: bool
    index: int
    role: str  # "reader", "writer", "mixed", ...

    @property
    def writer_id(self) -> int:
        """The id stamped into the blocks this actor writes (0 is the initial content)."""
        return 1000 + self.index if self.host_local else 1 + self.index


@dataclass(frozen=True)
class Workload:
    name: str
    description: str
    files: tuple[FileSpec, ...]
    actors: tuple[Actor, ...]
    _schedule: Callable[["Workload", Actor, random.Random, int], Iterator[Op]] = field(repr=False)
    # The writer keeps every file open for write for the whole run (held-open-writer).
    writer_holds_open: bool = False

    def schedule(self, actor: Actor, seed: int, duration_s: float) -> list[Op]:
        """The operations of `actor` due before `duration_s`, in order."""
        rng = random.Random(f"{self.name}/{seed}/{actor.name}")
        limit = int(duration_s * 1e9)
        return list(itertools.takewhile(lambda op: op.at_ns < limit,
                                        self._schedule(self, actor, rng, limit)))

    def file(self, file_id: int) -> FileSpec:
        return self.files[file_id]

    @property
    def guests(self) -> tuple[Actor, ...]:
        return tuple(a for a in self.actors if not a.host_local)

    @property
    def host_writers(self) -> tuple[Actor, ...]:
        return tuple(a for a in self.actors if a.host_local)


class Zipf:
    """Draw 0..n-1 with probability proportional to 1/(k+1)^s."""

    def __init__(self, n: int, s: float = 1.1):
        weights = [1.0 / (k + 1) ** s for k in range(n)]
        self.cumulative = list(itertools.accumulate(weights))

    def draw(self, rng: random.Random) -> int:
        return bisect.bisect(self.cumulative, rng.random() * self.cumulative[-1])


def _paced(rng: random.Random, mean_interval_ms: float, start_ms: float = 0.0) -> Iterator[int]:
    """Due instants (ns) with exponentially distributed gaps: a Poisson arrival stream."""
    t = start_ms
    while True:
        t += rng.expovariate(1.0 / mean_interval_ms)
        yield int(t * 1e6)


def _files(n: int, blocks: int, prefix: str = "f") -> tuple[FileSpec, ...]:
    return tuple(FileSpec(i, f"{prefix}{i:03d}.dat", blocks) for i in range(n))


def _actors(guests: int, host_writers: int, roles: Callable[[int], str],
            host_role: str = "writer") -> tuple[Actor, ...]:
    return tuple([Actor(f"g{i}", False, i, roles(i)) for i in range(guests)]
                 + [Actor(f"h{j}", True, j, host_role) for j in range(host_writers)])


# --- the named workloads -----------------------------------------------------------


def read_mostly(guests: int = 3, host_writers: int = 0) -> Workload:
    """Zipf-popular files read whole by every guest; 0.5% of operations write one block."""
    files = _files(24, 4)
    popularity = Zipf(len(files))

    def schedule(w: Workload, actor: Actor, rng: random.Random, limit: int) -> Iterator[Op]:
        if actor.host_local:
            for at in _paced(rng, 400.0):
                f = popularity.draw(rng)
                yield Op(at, WRITE, f, rng.randrange(w.files[f].blocks))
            return
        for at in _paced(rng, 2.0):
            f = popularity.draw(rng)
            if rng.random() < 0.005:
                yield Op(at, WRITE, f, rng.randrange(w.files[f].blocks))
            else:
                yield Op(at, READ, f, 0, w.files[f].blocks)

    return Workload("read-mostly", read_mostly.__doc__, files,
                    _actors(guests, host_writers, lambda i: "mixed"), schedule)


def held_open_writer(guests: int = 3, host_writers: int = 0) -> Workload:
    """Guest g0 keeps every file open for write and writes a block every 250 ms; the others read."""
    files = _files(16, 4)
    popularity = Zipf(len(files))

    def schedule(w: Workload, actor: Actor, rng: random.Random, limit: int) -> Iterator[Op]:
        if actor.role == "writer":
            for at in _paced(rng, 250.0):
                f = rng.randrange(len(w.files))
                yield Op(at, WRITE, f, rng.randrange(w.files[f].blocks))
            return
        for at in _paced(rng, 2.0):
            f = popularity.draw(rng)
            yield Op(at, READ, f, 0, w.files[f].blocks)

    return Workload("held-open-writer", held_open_writer.__doc__, files,
                    _actors(max(2, guests), host_writers,
                            lambda i: "writer" if i == 0 else "reader"), schedule,
                    writer_holds_open=True)


def log_append(guests: int = 3, host_writers: int = 0) -> Workload:
    """Guest g0 appends a block to a log every 20 ms; the others re-read the log's head."""
    files = (FileSpec(0, "app.log", 4),)

    def schedule(w: Workload, actor: Actor, rng: random.Random, limit: int) -> Iterator[Op]:
        if actor.role == "writer":
            for n, at in enumerate(_paced(rng, 20.0)):
                yield Op(at, APPEND, 0, w.files[0].blocks + n)
            return
        for at in _paced(rng, 2.0):
            yield Op(at, READ, 0, 0, 2)

    return Workload("log-append", log_append.__doc__, files,
                    _actors(max(2, guests), host_writers,
                            lambda i: "writer" if i == 0 else "reader"), schedule)


def ping_pong(guests: int = 2, host_writers: int = 0) -> Workload:
    """Guests g0 and g1 take turns every 10 ms: read the shared block, then write it and fsync."""
    files = (FileSpec(0, "ball.dat", 1),)

    def schedule(w: Workload, actor: Actor, rng: random.Random, limit: int) -> Iterator[Op]:
        if actor.host_local or actor.index > 1:
            for at in _paced(rng, 5.0):
                yield Op(at, READ, 0, 0, 1)
            return
        turn_ms = 10.0
        for turn in itertools.count():
            base = (2 * turn + actor.index) * turn_ms
            yield Op(int(base * 1e6), READ, 0, 0, 1)
            yield Op(int((base + 1) * 1e6), READ, 0, 0, 1)
            yield Op(int((base + 2) * 1e6), WRITE, 0, 0, 1)
            yield Op(int((base + 3) * 1e6), FSYNC, 0)

    return Workload("ping-pong", ping_pong.__doc__, files,
                    _actors(max(2, guests), 0, lambda i: "player" if i < 2 else "reader"), schedule)


def host_edit(guests: int = 3, host_writers: int = 1) -> Workload:
    """A host-local editor saves a file every 100 ms by write-temp-then-rename; guests read by path."""
    files = _files(8, 2, prefix="doc")
    popularity = Zipf(len(files))

    def schedule(w: Workload, actor: Actor, rng: random.Random, limit: int) -> Iterator[Op]:
        if actor.host_local:
            for at in _paced(rng, 100.0):
                yield Op(at, SAVE, popularity.draw(rng), 0, 2)
            return
        for at in _paced(rng, 2.0):
            f = popularity.draw(rng)
            yield Op(at, READ, f, 0, 2)

    return Workload("host-edit", host_edit.__doc__, files,
                    _actors(guests, max(1, host_writers), lambda i: "reader", "editor"), schedule)


def build(guests: int = 3, host_writers: int = 0) -> Workload:
    """Guest g0 writes each output once, early (a build); then every guest reads them over and over."""
    files = _files(32, 4, prefix="obj")
    popularity = Zipf(len(files), 0.8)

    def schedule(w: Workload, actor: Actor, rng: random.Random, limit: int) -> Iterator[Op]:
        if actor.index == 0 and not actor.host_local:
            for f in range(len(w.files)):
                yield Op(int(f * 15e6), WRITE, f, 0, w.files[f].blocks)
        for at in _paced(rng, 2.0, start_ms=600.0 if actor.index == 0 else 0.0):
            f = popularity.draw(rng)
            yield Op(at, READ, f, 0, w.files[f].blocks)

    return Workload("build", build.__doc__, files,
                    _actors(guests, host_writers, lambda i: "builder" if i == 0 else "reader"),
                    schedule)


WORKLOADS: dict[str, Callable[..., Workload]] = {
    "read-mostly": read_mostly,
    "held-open-writer": held_open_writer,
    "log-append": log_append,
    "ping-pong": ping_pong,
    "host-edit": host_edit,
    "build": build,
}


def make_workload(name: str, guests: int, host_writers: int = 0,
                  trace: str | None = None) -> Workload:
    """Build the named workload (or a trace replay).  Raises ValueError naming the choices."""
    if trace:
        return trace_workload(trace)
    try:
        factory = WORKLOADS[name]
    except KeyError:
        raise ValueError(f"unknown workload {name!r}; choose one of: {', '.join(WORKLOADS)} "
                         f"(or --trace FILE)") from None
    return factory(guests=guests, host_writers=host_writers)


def trace_workload(path: str) -> Workload:
    """Replay a JSON-lines trace (format in docs/workloads.md).

    The first line is a header: {"files": [{"path": ..., "blocks": N}, ...]}.
    Every other line is one operation:
    {"t_ms": 12.5, "actor": "g0" | "h0", "op": "read"|"write"|"append"|"save"|"fsync",
     "file": 0, "block": 0, "nblocks": 1}.
    Raises ValueError naming the line for anything malformed.
    """
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    if not lines:
        raise ValueError(f"{path}: empty trace")
    try:
        header = json.loads(lines[0])
        files = tuple(FileSpec(i, spec["path"], int(spec["blocks"]))
                      for i, spec in enumerate(header["files"]))
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path}:1: bad header ({exc}); expected "
                         '{"files": [{"path": ..., "blocks": N}]}') from None
    per_actor: dict[str, list[Op]] = {}
    for number, line in enumerate(lines[1:], start=2):
        try:
            rec = json.loads(line)
            kind = rec["op"]
            if kind not in KINDS:
                raise ValueError(f"op must be one of {KINDS}")
            file_id = int(rec["file"])
            if not 0 <= file_id < len(files):
                raise ValueError(f"file {file_id} is not in the header")
            op = Op(int(float(rec["t_ms"]) * 1e6), kind, file_id, int(rec.get("block", 0)),
                    int(rec.get("nblocks", 1)))
            actor = str(rec["actor"])
            if actor[:1] not in ("g", "h") or not actor[1:].isdigit():
                raise ValueError("actor must be gN (guest) or hN (host-local)")
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}:{number}: {exc}") from None
        per_actor.setdefault(actor, []).append(op)
    actors = tuple(Actor(name, name[0] == "h", int(name[1:]), "trace")
                   for name in sorted(per_actor, key=lambda n: (n[0], int(n[1:]))))

    def schedule(w: Workload, actor: Actor, rng: random.Random, limit: int) -> Iterator[Op]:
        return iter(sorted(per_actor.get(actor.name, []), key=lambda op: op.at_ns))

    return Workload(f"trace:{path}", "replay of a JSON-lines trace", files, actors, schedule)
