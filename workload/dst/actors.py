"""What the simulated guests and host-local writers do, and what they log.

Every file of the simulation is `blocks` stamped 4 KiB blocks
(workload/stamp.py); every read and write is logged block by block as the
operation log's records (workload/oplog.py), with global virtual time in
nanoseconds, for the existing checker (workload/checker.py).

A block that is not there (beyond the end of file after a truncate, or a
hole a later write left) reads as the version ABSENT; a truncate is logged
as a write of ABSENT to each block it removed.  A write whose outcome its
guest cannot know (the host restarted, the connection was lost for good,
the guest was killed while it was under way) is logged "uncertain": its
version becomes a possible one, never a reason to call a read stale.
"""

from __future__ import annotations

import asyncio
import errno
import os
from dataclasses import dataclass, field

from guest.client import GuestClient, HostError, OutcomeUnknown, SessionLost
from workload.dst.kernel import host_local_write
from workload.dst.loop import Node
from workload.oplog import ReadRecord, WriteRecord
from workload.stamp import BLOCK_SIZE, CorruptBlock, Stamp, make_block, parse_block

ABSENT = (1_000_000, 0)  # (writer, seq) of "no data here"
HOST_LOCAL_WRITER = 900_000
INITIAL = (0, 0)

_GIVE_UP = (SessionLost, OutcomeUnknown, TimeoutError, asyncio.TimeoutError, ConnectionError)


def file_path(index: int) -> str:
    return f"d{index % 2}/f{index}"


@dataclass
class Guest:
    """One guest incarnation: its node, its client, its open files."""

    name: str
    writer: int
    node: Node
    client: GuestClient | None = None
    handles: dict = field(default_factory=dict)
    seq: int = 0
    ops: int = 0
    alive: bool = True
    paused: bool = False
    # Writes under way: op id -> their records' (file, block, start) (made
    # uncertain if the guest dies with them under way).
    pending: dict = field(default_factory=dict)
    workers: list = field(default_factory=list)
    main: object = None  # its task


class Actors:
    """The guests' and writers' operations over a world (workload/dst/world.py)."""

    def __init__(self, world):
        self.world = world
        self.records: list = []
        self.uncertain: list = []  # (actor, file, block, writer, seq, start) of uncertain writes
        self._next_op = 0

    def ns(self) -> int:
        return int(self.world.loop.now * 1e9)

    # --- guest operations ----------------------------------------------------------

    async def guest_main(self, g: Guest) -> None:
        """A guest's life: connect, open every file, run its workers."""
        w = self.world
        while g.client is None:
            try:
                g.client = await GuestClient.connect(
                    "unix:/simulated/host", name=g.name, cache_bytes=1 << 20,
                    request_timeout=w.p.request_timeout_s, reconnect_for=60.0,
                    dial=lambda factory: w.net.dial(g.node, factory), clock=g.node.clock,
                    client_id=w.rng.randbytes(16))
            except (OSError, ConnectionError, asyncio.TimeoutError):
                await asyncio.sleep(0.05)
        w.trace(g.name, "connected")
        for index in range(w.p.files):
            await self._open(g, index)
        g.workers = [g.node.spawn(self._worker(g)) for _ in range(w.p.workers)]
        await asyncio.gather(*g.workers)

    async def _open(self, g: Guest, index: int) -> bool:
        for _ in range(20):
            try:
                g.handles[index] = await g.client.open(file_path(index), os.O_RDWR)
                return True
            except (HostError, *_GIVE_UP):
                await asyncio.sleep(0.05)
        return False

    async def _worker(self, g: Guest) -> None:
        w = self.world
        rng = w.rng
        while w.budget > 0 and g.alive:
            w.budget -= 1
            g.ops += 1
            index = rng.randrange(w.files)
            handle = g.handles.get(index)
            if handle is None or handle.stale:
                if not await self._open(g, index):
                    continue
                handle = g.handles[index]
            roll = rng.random()
            reads = w.read_fraction
            if roll < reads:
                await self._read(g, index, handle)
            elif roll < reads + (1 - reads) * 0.6:
                await self._write(g, index, handle)
            elif roll < reads + (1 - reads) * 0.72:
                await self._truncate(g, index, handle)
            elif roll < reads + (1 - reads) * 0.92:
                await self._fsync(g, index, handle)
            else:
                await self._stat(g, index)
            await asyncio.sleep(rng.uniform(0, w.p.think_s))

    def _range(self) -> tuple[int, int]:
        rng, blocks = self.world.rng, self.world.p.blocks
        first = rng.randrange(blocks)
        return first, rng.randint(1, min(2, blocks - first))

    async def _read(self, g: Guest, index: int, handle) -> None:
        if self.world.rng.random() < 0.5:
            first, count = 0, self.world.p.blocks  # the whole file: every page gets cached
        else:
            first, count = self._range()
        start = self.ns()
        try:
            result = await g.client.read(handle, first * BLOCK_SIZE, count * BLOCK_SIZE)
        except (HostError, *_GIVE_UP) as exc:
            self.world.trace(g.name, f"read f{index}[{first}+{count}] failed: {_why(exc)}")
            return
        end = self.ns()
        op = self._op()
        seen = []
        for i in range(count):
            block = first + i
            data = result.data[i * BLOCK_SIZE:(i + 1) * BLOCK_SIZE]
            version, corrupt = _version_of(data)
            seen.append("?" if corrupt else _label(version))
            self.records.append(ReadRecord(g.name, index, block, version[0], version[1], start,
                                           end, result.hit, op, corrupt))
        self.world.trace(g.name, f"read f{index}[{first}+{count}] {'hit' if result.hit else 'miss'}"
                                 f" -> {' '.join(seen)}")

    async def _write(self, g: Guest, index: int, handle) -> None:
        first, count = self._range()
        g.seq += 1
        seq = g.seq
        start = self.ns()
        data = b"".join(make_block(Stamp(index, first + i, g.writer, seq, start))
                        for i in range(count))
        op = self._op()
        g.pending[op] = (index, first, count, seq, start)
        self.world.trace(g.name, f"write f{index}[{first}+{count}] v{g.writer}.{seq}")
        try:
            result = await g.client.write(handle, first * BLOCK_SIZE, data)
        except HostError as exc:
            g.pending.pop(op, None)
            self.world.trace(g.name, f"write f{index} v{g.writer}.{seq} failed: {_why(exc)}")
            return
        except _GIVE_UP as exc:
            self._uncertain(g, op)
            self.world.trace(g.name, f"write f{index} v{g.writer}.{seq} outcome unknown: {_why(exc)}")
            return
        g.pending.pop(op, None)
        end = self.ns()
        landed = result.size // BLOCK_SIZE
        for i in range(landed):
            self.records.append(WriteRecord(g.name, index, first + i, g.writer, seq, start, end,
                                            result.first_dirty, "guest"))
        self.world.trace(g.name, f"write f{index} v{g.writer}.{seq} done ({landed}/{count} blocks"
                                 f"{', first dirty' if result.first_dirty else ''})")

    async def _truncate(self, g: Guest, index: int, handle) -> None:
        keep = self.world.rng.randrange(self.world.p.blocks + 1)
        start = self.ns()
        op = self._op()
        removed = self.world.p.blocks - keep
        g.pending[op] = ("truncate", index, keep, removed, start)
        self.world.trace(g.name, f"truncate f{index} to {keep} blocks")
        try:
            await g.client.truncate(handle, keep * BLOCK_SIZE)
        except HostError as exc:
            g.pending.pop(op, None)
            self.world.trace(g.name, f"truncate f{index} failed: {_why(exc)}")
            return
        except _GIVE_UP as exc:
            self._uncertain(g, op)
            self.world.trace(g.name, f"truncate f{index} outcome unknown: {_why(exc)}")
            return
        g.pending.pop(op, None)
        end = self.ns()
        for block in range(keep, self.world.p.blocks):
            self.records.append(WriteRecord(g.name, index, block, *ABSENT, start, end, None,
                                            "guest"))
        self.world.trace(g.name, f"truncate f{index} to {keep} done")

    async def _fsync(self, g: Guest, index: int, handle) -> None:
        try:
            await g.client.fsync(handle)
            self.world.trace(g.name, f"fsync f{index} done")
        except (HostError, *_GIVE_UP) as exc:
            self.world.trace(g.name, f"fsync f{index} failed: {_why(exc)}")

    async def _stat(self, g: Guest, index: int) -> None:
        try:
            await g.client.stat(file_path(index))
        except (HostError, *_GIVE_UP) as exc:
            self.world.trace(g.name, f"stat f{index} failed: {_why(exc)}")

    def _uncertain(self, g: Guest, op: int) -> None:
        """The write `op` of `g` may or may not have landed, at any instant from
        its start until the end of the run (the host may still carry it out
        after its guest gave up): its records end with the run."""
        entry = g.pending.pop(op, None)
        if entry is None:
            return
        if entry[0] == "truncate":
            _, index, keep, _, start = entry
            for block in range(keep, self.world.p.blocks):
                self.uncertain.append((g.name, index, block, *ABSENT, start))
            return
        index, first, count, seq, start = entry
        for i in range(count):
            self.uncertain.append((g.name, index, first + i, g.writer, seq, start))

    def guest_died(self, g: Guest) -> None:
        for op in list(g.pending):
            self._uncertain(g, op)

    def _op(self) -> int:
        self._next_op += 1
        return self._next_op

    # --- host-local writers -----------------------------------------------------------

    async def host_write(self, writer_no: int, in_write_s: float) -> None:
        """A process on the host pwrites stamped blocks into one file."""
        w = self.world
        index = w.rng.randrange(w.files)
        first, count = self._range()
        seq = self._op()
        writer = HOST_LOCAL_WRITER + writer_no
        start = self.ns()
        data = b"".join(make_block(Stamp(index, first + i, writer, seq, start)) for i in range(count))
        name = f"hw{writer_no}"
        w.trace(name, f"host write f{index}[{first}+{count}] v{writer}.{seq}"
                      f"{f' (inside write(2) for {in_write_s * 1000:.0f} ms)' if in_write_s else ''}")
        path = os.path.join(w.export, file_path(index))
        host = w.host
        written = await host_local_write(host.detector, host.node, path, first * BLOCK_SIZE,
                                         data, in_write_s)
        end = self.ns()
        for i in range(written // BLOCK_SIZE):
            self.records.append(WriteRecord(name, index, first + i, writer, seq, start, end, None,
                                            "host-local"))
        w.trace(name, f"host write f{index} v{writer}.{seq} landed")

    # --- the end ---------------------------------------------------------------------

    def final_reads(self) -> None:
        """Read every block from the export itself once everything is over: a
        completed write that is not there (nor overwritten) is a lost write."""
        now = self.ns()
        for actor, index, block, writer, seq, start in self.uncertain:
            self.records.append(WriteRecord(actor, index, block, writer, seq, start, now, None,
                                            "uncertain"))
        op = self._op()
        for index in range(self.world.p.files):
            with open(os.path.join(self.world.export, file_path(index)), "rb") as f:
                data = f.read()
            for block in range(self.world.p.blocks):
                version, corrupt = _version_of(data[block * BLOCK_SIZE:(block + 1) * BLOCK_SIZE])
                self.records.append(ReadRecord("final", index, block, version[0], version[1], now,
                                               now, False, op, corrupt))


def _version_of(data: bytes) -> tuple[tuple[int, int], str | None]:
    if not data:
        return ABSENT, None
    try:
        stamp = parse_block(data)
    except CorruptBlock as exc:
        if exc.kind == "zero":
            return ABSENT, None
        return (-1, -1), exc.kind
    return (stamp.writer, stamp.seq), None


def _label(version: tuple[int, int]) -> str:
    if version == ABSENT:
        return "-"
    return f"v{version[0]}.{version[1]}"


def _why(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno:
        return errno.errorcode.get(exc.errno, str(exc.errno))
    return type(exc).__name__
