"""One actor of a simulation, run as its own OS process.

`cleanlease guest --connect ADDR --workload W --actor g1 ...` runs a guest
actor through the daemon; `cleanlease writer --export DIR --workload W
--actor h0 ...` runs a host-local writer directly on the export.  Both:
prepare (connect, open), print `READY`, wait for `GO <t0_ns>` on stdin (so
every actor starts from the same instant, with no sleeps), run their paced
schedule, log every block read or written (workload/oplog.py), and write
their counters and latencies as JSON.

Every block written is stamped; every block read is parsed and logged with
the version it returned, so the checker can judge each read afterwards.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time

from guest.client import FileHandle, GuestClient, HostError, OutcomeUnknown, SessionLost
from workload import stamp as stamps
from workload.oplog import LogWriter, ReadRecord, WriteRecord
from workload.workloads import APPEND, FSYNC, READ, SAVE, WRITE, Actor, Op, Workload

BLOCK = stamps.BLOCK_SIZE


def _actor(workload: Workload, name: str) -> Actor:
    for actor in workload.actors:
        if actor.name == name:
            return actor
    names = ", ".join(a.name for a in workload.actors)
    raise SystemExit(f"actor {name!r} is not in workload {workload.name} (actors: {names})")


async def _wait_for_go() -> int:
    print("READY", flush=True)
    line = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    word, _, t0 = line.strip().partition(" ")
    if word != "GO":
        raise SystemExit(f"expected 'GO <t0_ns>' on stdin, got {line!r}")
    return int(t0)


async def _done_then_wait_for_exit() -> None:
    """Say DONE, then stay (connected, files open) until the coordinator says EXIT,
    so that no actor's leaving changes what the others still see."""
    print("DONE", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)


async def _due(t0: int, op: Op) -> None:
    delay = (t0 + op.at_ns - time.monotonic_ns()) / 1e9
    if delay > 0:
        await asyncio.sleep(delay)


class Latencies:
    def __init__(self):
        self.read_hit: list[int] = []
        self.read_miss: list[int] = []
        self.write_first: list[int] = []
        self.write_other: list[int] = []

    def as_dict(self) -> dict:
        return dict(self.__dict__)


class Stamper:
    """Stamps the blocks one actor writes: (file, block, writer, seq, time)."""

    def __init__(self, actor: Actor):
        self.writer = actor.writer_id
        self.seq = 0

    def block(self, file_id: int, block: int, t_ns: int) -> tuple[bytes, int]:
        self.seq += 1
        return stamps.make_block(stamps.Stamp(file_id, block, self.writer, self.seq, t_ns)), self.seq


def _log_read(log: LogWriter, actor: str, op_no: int, file_id: int, first_block: int,
              data: bytes, start: int, end: int, hit: bool) -> None:
    for i in range(0, len(data), BLOCK):
        block = first_block + i // BLOCK
        try:
            s = stamps.parse_block(data[i: i + BLOCK])
            log.write(ReadRecord(actor, file_id, block, s.writer, s.seq, start, end, hit, op_no, None))
        except stamps.CorruptBlock as exc:
            log.write(ReadRecord(actor, file_id, block, -1, -1, start, end, hit, op_no, exc.kind))


# --- a guest actor -----------------------------------------------------------------


async def run_guest(args, workload: Workload) -> int:
    actor = _actor(workload, args.actor)
    ops = workload.schedule(actor, args.seed, args.duration)
    client = await GuestClient.connect(args.connect, name=actor.name, cache_bytes=args.cache_bytes,
                                       token=args.token)
    # Fault injection (`cleanlease chaos`): SIGUSR1 cuts this guest's connection.
    asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, client.cut_connection)
    await client.lease_root()
    held: dict[int, FileHandle] = {}
    if workload.writer_holds_open and actor.role == "writer":
        for spec in workload.files:
            held[spec.file_id] = await client.open(spec.path, os.O_RDWR)
    stamper = Stamper(actor)
    lat = Latencies()
    errors: dict[str, int] = {}
    log = LogWriter(args.log)
    t0 = await _wait_for_go()
    started = time.monotonic_ns()
    done = 0
    for op_no, op in enumerate(ops):
        await _due(t0, op)
        path = workload.file(op.file_id).path
        try:
            if op.kind == READ:
                start = time.monotonic_ns()
                handle = held.get(op.file_id) or await client.open(path)
                r0 = time.monotonic_ns()
                result = await client.read(handle, op.block * BLOCK, op.nblocks * BLOCK)
                end = time.monotonic_ns()
                (lat.read_hit if result.hit else lat.read_miss).append(end - r0)
                if op.file_id not in held:
                    await client.close_file(handle)
                _log_read(log, actor.name, op_no, op.file_id, op.block, result.data, start, end,
                          result.hit)
            elif op.kind in (WRITE, APPEND):
                start = time.monotonic_ns()
                handle = held.get(op.file_id) or await client.open(path, os.O_WRONLY)
                data = b""
                seqs = []
                for b in range(op.nblocks):
                    block, seq = stamper.block(op.file_id, op.block + b, start)
                    data += block
                    seqs.append(seq)
                w0 = time.monotonic_ns()
                first = (await client.write(handle, op.block * BLOCK, data)).first_dirty
                end = time.monotonic_ns()
                (lat.write_first if first else lat.write_other).append(end - w0)
                if op.file_id not in held:
                    await client.close_file(handle)
                for b, seq in enumerate(seqs):
                    log.write(WriteRecord(actor.name, op.file_id, op.block + b, stamper.writer, seq,
                                          start, end, first, "guest"))
            elif op.kind == FSYNC:
                handle = held.get(op.file_id) or await client.open(path, os.O_WRONLY)
                await client.fsync(handle)
                if op.file_id not in held:
                    await client.close_file(handle)
            else:
                raise ValueError(f"a guest cannot {op.kind}")
            done += 1
        except OutcomeUnknown as exc:
            # The host restarted under this write: it may have landed.
            for b, seq in enumerate(seqs):
                log.write(WriteRecord(actor.name, op.file_id, op.block + b, stamper.writer, seq,
                                      start, time.monotonic_ns(), None, "uncertain"))
            key = f"{op.kind}: {exc}"
            errors[key] = errors.get(key, 0) + 1
        except (HostError, TimeoutError, SessionLost) as exc:
            key = f"{op.kind}: {exc}"
            errors[key] = errors.get(key, 0) + 1
    elapsed = time.monotonic_ns() - started
    log.close()
    await _done_then_wait_for_exit()
    stats = dict(actor=actor.name, policy=client.policy.label, ops=done, elapsed_ns=elapsed,
                 errors=errors, latencies=lat.as_dict(), **client.cache.stats.__dict__,
                 acks=client.acks_sent)
    await client.close()
    with open(args.stats, "w") as f:
        json.dump(stats, f)
    return 0


# --- a host-local writer --------------------------------------------------------------


async def run_host_writer(args, workload: Workload) -> int:
    actor = _actor(workload, args.actor)
    ops = workload.schedule(actor, args.seed, args.duration)
    export = os.path.realpath(args.export)
    stamper = Stamper(actor)
    lat = Latencies()
    log = LogWriter(args.log)
    t0 = await _wait_for_go()
    started = time.monotonic_ns()
    done = 0
    for op in ops:
        await _due(t0, op)
        path = os.path.join(export, workload.file(op.file_id).path)
        start = time.monotonic_ns()
        records = []
        if op.kind in (WRITE, APPEND):
            data = b"".join(stamper.block(op.file_id, op.block + b, start)[0]
                            for b in range(op.nblocks))
            fd = os.open(path, os.O_WRONLY)
            try:
                os.pwrite(fd, data, op.block * BLOCK)
            finally:
                os.close(fd)
        elif op.kind == SAVE:
            # An editor's save: write a temporary file, then rename it over the original.
            data = b"".join(stamper.block(op.file_id, op.block + b, start)[0]
                            for b in range(op.nblocks))
            tmp = f"{path}.{actor.name}.tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                os.write(fd, data)
            finally:
                os.close(fd)
            os.rename(tmp, path)
        elif op.kind == FSYNC:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        end = time.monotonic_ns()
        if op.kind != FSYNC:
            lat.write_other.append(end - start)
            first_seq = stamper.seq - op.nblocks + 1
            for b in range(op.nblocks):
                records.append(WriteRecord(actor.name, op.file_id, op.block + b, stamper.writer,
                                           first_seq + b, start, end, None, "host-local"))
        for record in records:
            log.write(record)
        done += 1
    log.close()
    elapsed = time.monotonic_ns() - started
    await _done_then_wait_for_exit()
    with open(args.stats, "w") as f:
        json.dump(dict(actor=actor.name, ops=done, elapsed_ns=elapsed,
                       latencies=lat.as_dict(), errors={}), f)
    return 0
