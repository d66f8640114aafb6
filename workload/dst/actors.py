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


# Names whose binding is the register: a slot's "version" is the stamp of
# block 0 of whatever file the name leads to (ABSENT: no such name).  Guests
# create, unlink and replace them (rename of a private file over one, across
# directories too) and read them by name, through their entry caches.
SLOTS = ("d0/s0", "d0/s1", "d1/s2")
SLOT_BASE = 100  # a slot's file_id in the log


def slot_id(slot: int) -> int:
    return SLOT_BASE + slot


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
            # Some seeds give each guest a file it mostly uses (a hot reader).
            if rng.random() < w.favourite_p:
                index = g.writer % w.files
            else:
                index = rng.randrange(w.files)
            handle = g.handles.get(index)
            if handle is None or handle.stale:
                if not await self._open(g, index):
                    continue
                handle = g.handles[index]
            if rng.random() < w.namespace_p:
                await self._namespace_op(g)
                await asyncio.sleep(rng.uniform(0, w.p.think_s))
                continue
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

    # --- names ------------------------------------------------------------------

    async def _namespace_op(self, g: Guest) -> None:
        rng = self.world.rng
        slot = rng.randrange(len(SLOTS))
        roll = rng.random()
        if roll < 0.5:
            await self._slot_read(g, slot)
        elif roll < 0.7:
            await self._slot_replace(g, slot, by_rename=False)
        elif roll < 0.85:
            await self._slot_replace(g, slot, by_rename=True)
        else:
            await self._slot_unlink(g, slot)

    async def _slot_read(self, g: Guest, slot: int) -> None:
        path = SLOTS[slot]
        start = self.ns()
        handle = None
        try:
            handle = await g.client.open(path, os.O_RDONLY)
            result = await g.client.read(handle, 0, BLOCK_SIZE)
            await self._close(g, handle)
        except HostError as exc:
            if exc.errno != errno.ENOENT:
                self.world.trace(g.name, f"read {path} failed: {_why(exc)}")
                return
            version, corrupt, hit = ABSENT, None, False
        except _GIVE_UP as exc:
            self.world.trace(g.name, f"read {path} failed: {_why(exc)}")
            return
        else:
            version, corrupt = _version_of(result.data)
            hit = result.hit
        end = self.ns()
        self.records.append(ReadRecord(g.name, slot_id(slot), 0, version[0], version[1], start,
                                       end, hit, self._op(), corrupt))
        self.world.trace(g.name, f"read {path} -> {'?' if corrupt else _label(version)}"
                                 f"{' (hit)' if hit else ''}")

    async def _slot_replace(self, g: Guest, slot: int, *, by_rename: bool) -> None:
        """Give slot a new file: written in place through CREATE (an existing
        file is reused), or written under this guest's private name and
        renamed over the slot (across directories for d1/s2)."""
        path = SLOTS[slot]
        g.seq += 1
        seq = g.seq
        # A private name of its own for each replacement (one left behind by a
        # failed one must not be renamed over another slot later).
        target = f"d{(slot + 1) % 2}/t{g.writer}.{seq}" if by_rename else path
        block = make_block(Stamp(slot_id(slot), 0, g.writer, seq, self.ns()))
        op = self._op()
        start = self.ns()
        g.pending[op] = (slot_id(slot), 0, 1, seq, start)  # uncertain if it dies under way
        how = f"rename of {target}" if by_rename else "create"
        self.world.trace(g.name, f"replace {path} by {how}: v{g.writer}.{seq}")
        try:
            handle = await g.client.create(target, os.O_RDWR)
            await g.client.write(handle, 0, block)
            await self._close(g, handle)
            if by_rename:
                start = self.ns()  # the slot changes only at the rename
                g.pending[op] = (slot_id(slot), 0, 1, seq, start)
                await g.client.rename(target, path)
        except HostError as exc:
            self._uncertain(g, op)  # which of its steps landed is not known: all may have
            self.world.trace(g.name, f"replace {path} v{g.writer}.{seq} failed: {_why(exc)}")
            return
        except _GIVE_UP as exc:
            self._uncertain(g, op)
            self.world.trace(g.name, f"replace {path} v{g.writer}.{seq} outcome unknown: "
                                     f"{_why(exc)}")
            return
        g.pending.pop(op, None)
        self.records.append(WriteRecord(g.name, slot_id(slot), 0, g.writer, seq, start,
                                        self.ns(), None, "guest"))
        self.world.trace(g.name, f"replace {path} v{g.writer}.{seq} done")

    async def _close(self, g: Guest, handle) -> None:
        """Release a handle; a failure only leaves it to the session's end.
        (No await in a `finally`: a killed guest's coroutines are closed as
        garbage, and must not await then.)"""
        try:
            await g.client.close_file(handle)
        except (HostError, *_GIVE_UP):
            pass

    async def _slot_unlink(self, g: Guest, slot: int) -> None:
        path = SLOTS[slot]
        op = self._op()
        start = self.ns()
        g.pending[op] = ("unlink", slot_id(slot), start)
        self.world.trace(g.name, f"unlink {path}")
        try:
            await g.client.unlink(path)
        except HostError as exc:
            g.pending.pop(op, None)
            self.world.trace(g.name, f"unlink {path} failed: {_why(exc)}")
            return
        except _GIVE_UP as exc:
            self._uncertain(g, op)
            self.world.trace(g.name, f"unlink {path} outcome unknown: {_why(exc)}")
            return
        g.pending.pop(op, None)
        self.records.append(WriteRecord(g.name, slot_id(slot), 0, *ABSENT, start, self.ns(), None,
                                        "guest"))
        self.world.trace(g.name, f"unlink {path} done")

    def _uncertain(self, g: Guest, op: int) -> None:
        """The write `op` of `g` may or may not have landed, at any instant from
        its start until the end of the run (the host may still carry it out
        after its guest gave up): its records end with the run."""
        entry = g.pending.pop(op, None)
        if entry is None:
            return
        if entry[0] == "unlink":
            _, file_id, start = entry
            self.uncertain.append((g.name, file_id, 0, *ABSENT, start))
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
        written, released = await host_local_write(host.detector, host.node, path,
                                                   first * BLOCK_SIZE, data, in_write_s)
        end = self.ns()
        # A write the kernel let go because the daemon died while it held it
        # lands while guests may still serve their copies (a known gap:
        # docs/simulation.md): its version is only a possible one.
        via = "uncertain" if released else "host-local"
        for i in range(written // BLOCK_SIZE):
            self.records.append(WriteRecord(name, index, first + i, writer, seq, start, end, None,
                                            via))
        w.trace(name, f"host write f{index} v{writer}.{seq} landed"
                      f"{' (let through by the daemon death: unchecked)' if released else ''}")

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
        for slot, path in enumerate(SLOTS):
            try:
                with open(os.path.join(self.world.export, path), "rb") as f:
                    version, corrupt = _version_of(f.read(BLOCK_SIZE))
            except FileNotFoundError:
                version, corrupt = ABSENT, None
            self.records.append(ReadRecord("final", slot_id(slot), 0, version[0], version[1], now,
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
