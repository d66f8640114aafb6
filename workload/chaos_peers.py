"""The peers `cleanlease chaos` injects as faults: each one its own OS process.

    python -m workload.chaos_peers KIND ADDRESS_OR_EXPORT [options]

Every peer appends what it read and wrote to its own operation log
(`--log`, workload/oplog.py), so the checker judges it with the workload's
records, and writes its counters and verdicts as JSON (`--stats`).  A peer
that talks to the host speaks the protocol itself: `RawSession` frame by
frame (it ACKs nothing unless told, so it can be a holder that never ACKs),
or `guest.client.GuestClient` where the library's own behaviour (reconnects,
at-most-once retries, OutcomeUnknown, entry caching) is what is under test.

Kinds:

* `silent-holders ADDRESS --count N --for S --files ...`: N raw sessions
  that read the files (a lease on each, and on the export root), heartbeat
  every term/3 and never ACK an invalidation.  Each session checks, from its
  side, what the host promises: no reply renews its term once it owes an
  ACK; it learns that it was fenced from a heartbeat (-EKEYEXPIRED); and it
  logs, for every lease it held, a read at the last instant its own term let
  it serve the copy (a broken guest that ignores invalidations would do
  just that, and so may a mount whose connection was lost: its kernel keeps
  the pages), so the checker holds every write to that instant: a write
  that completed while the holder's lease was live makes that read stale,
  whichever boot of the host let it land.  A
  fenced session says HELLO again and takes its leases again until S is
  over.  `--signal` prints HOLDING once the first session holds them all.
* `failing-write ADDRESS --file ...`: a raw guest opens a workload file
  O_RDWR, reads it (a lease), and writes one block at offset 2**50: the host
  recalls every other copy, then the write fails with EFBIG.  It checks
  that the error reply publishes the inode's new generation, and that the
  file leads back to CLEAN (a later read is granted a lease of at least that
  generation).
* `namespace-churn ADDRESS --for S --dirs ... --side NAME`: a library guest
  that, in each directory, with several changes in flight at once, creates
  side files, renames them over NAME and creates and unlinks junk names,
  while others hold the directory's lease.  Each rename over `side.dat` is
  logged as a write of that name's block, so a reader that resolves the
  name from a stale entry is caught as a stale read.
* `name-reader ADDRESS --for S --dirs ... --side NAME`: a library guest that
  holds each directory's lease and reads NAME by path again and again (entries
  and pages from its cache when its leases allow), logging every read.
* `inflight-writes ADDRESS --file ... --writes N`: a library guest that
  writes stamped blocks to a workload file; prints `INFLIGHT n` before and
  `DONE n` after each write (for the injector, which restarts the host
  while one is in flight); a write whose outcome the restart hid ends with
  OutcomeUnknown and is logged as `uncertain`.
* `host-write EXPORT --mode direct|buffered --writes N --files ...`: a
  host-local process (no daemon) writing stamped blocks into workload files
  through the export's path, with O_DIRECT from an aligned buffer or
  buffered; with userfaultfd the source buffer is filled only after a
  seeded stall, so each write stays inside write(2), past the pre-content
  hook and holding the inode lock, for that long (`--hold`: until a line on
  stdin, after printing INSIDE).  Logged as `host-local` writes.

Peers print READY once connected and, where the injector must wait for them,
take GO/RELEASE lines on stdin; nothing here sleeps to stand in for an
ordering.  A peer's own deadlines (request timeouts, S) bound its run.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import errno
import fcntl
import itertools
import json
import mmap
import os
import random
import select
import struct
import sys
import threading
import time
from dataclasses import dataclass, field

from protocol import auth, wire
from protocol.address import parse_address
from protocol.connection import NEED_DATA, Connection, Role
from protocol.errors import ProtocolError
from protocol.messages import (
    Ack,
    Auth,
    AuthReply,
    ConnectionClosed,
    FsReply,
    FsRequest,
    Getattr,
    Heartbeat,
    HeartbeatReply,
    Hello,
    HelloReply,
    InvalEntry,
    Invalidate,
    Lookup,
    Open,
    Read,
    Release,
    Write,
)
from workload import stamp as stamps
from workload.oplog import LogWriter, ReadRecord, WriteRecord

BLOCK = stamps.BLOCK_SIZE
ROOT = 1
FAILING_OFFSET = 1 << 50  # beyond ext4's largest file (16 TiB): EFBIG after the recall


def say(*words) -> None:
    sys.stdout.write(" ".join(str(w) for w in words) + "\n")
    sys.stdout.flush()


def now_ns() -> int:
    return time.monotonic_ns()


@dataclass(frozen=True)
class FileArg:
    path: str
    file_id: int
    blocks: int


def parse_files(text: str) -> list[FileArg]:
    """`path:file_id:blocks,...` (what chaos passes for the workload's files)."""
    out = []
    for item in text.split(","):
        path, file_id, blocks = item.rsplit(":", 2)
        out.append(FileArg(path, int(file_id), int(blocks)))
    return out


def _token(args) -> bytes | None:
    return auth.read_token_file(args.token_file) if getattr(args, "token_file", None) else None


def _write_stats(path: str, stats: dict) -> None:
    with open(path, "w") as f:
        json.dump(stats, f)


def _log_block_reads(log: LogWriter, actor: str, op: int, file_id: int, first_block: int,
                     data: bytes, start: int, end: int, hit: bool) -> list[tuple[int, int, int]]:
    """Log each block of `data`; returns (block, writer, seq) of the ones that parsed."""
    versions = []
    for i in range(0, len(data) - len(data) % BLOCK, BLOCK):
        block = first_block + i // BLOCK
        try:
            s = stamps.parse_block(data[i:i + BLOCK])
        except stamps.CorruptBlock as exc:
            log.write(ReadRecord(actor, file_id, block, -1, -1, start, end, hit, op, exc.kind))
            continue
        log.write(ReadRecord(actor, file_id, block, s.writer, s.seq, start, end, hit, op, None))
        versions.append((block, s.writer, s.seq))
    return versions


# --- a session spoken frame by frame -------------------------------------------------


class RawSession(asyncio.Protocol):
    """One protocol session over a real socket, driven by the caller.

    With `auto_ack` it ACKs every invalidation at once (a peer with no cache);
    without, it never ACKs, and the first invalidation leaves it owing one from
    `owed_since_ns` on.  It keeps, from its own side, the
    term the host gave it: `renewed_sent_ns` is the latest send instant of a
    frame whose reply renewed it (the guest's rule: count from the send),
    and `expiry_ns()` is where that term ends.  A reply that renews a frame
    sent while an ACK was owed breaks the host's promise and is counted in
    `renewed_while_owed`.
    """

    def __init__(self, name: str, token: bytes | None, started_ns: int, auto_ack: bool):
        self.name = name
        self.auto_ack = auto_ack  # ACK at once (a peer with no cache), or never
        self.token = token
        self.conn = Connection(Role.GUEST)
        self.transport: asyncio.Transport | None = None
        loop = asyncio.get_running_loop()
        self.hello_future: asyncio.Future = loop.create_future()
        self.auth_future: asyncio.Future = loop.create_future()
        self.lost: asyncio.Future = loop.create_future()
        self.lost_ns = 0
        self.replies: dict[int, tuple[asyncio.Future, int, bool]] = {}
        self.heartbeats: dict[int, tuple[asyncio.Future, int, bool]] = {}
        self.next = 1
        self.hello: HelloReply | None = None
        self.term_ns = 0
        # The host counts this session's term from no earlier than its accept,
        # which is after we began to connect.
        self.renewed_sent_ns = started_ns
        self.owed_since_ns: int | None = None
        self.invalidations = 0
        self.received: list[tuple[int, Invalidate | InvalEntry]] = []  # (at ns, message)
        self.renewed_while_owed = 0

    @classmethod
    async def open(cls, address: str, name: str, token: bytes | None, *, auto_ack: bool = False,
                   timeout: float = 10.0) -> "RawSession":
        """Connect, HELLO (and AUTH when the host asks); raises OSError/ConnectionError."""
        loop = asyncio.get_running_loop()
        self = cls(name, token, now_ns(), auto_ack)
        where = parse_address(address)
        if where.kind == "unix":
            await loop.create_unix_connection(lambda: self, where.path)
        else:
            await loop.create_connection(lambda: self, where.host, where.port)
        try:
            offer = wire.SUPPORTED_FEATURES | (wire.FEATURE_AUTH if token is not None else 0)
            self.transport.write(self.conn.send(Hello(wire.PROTOCOL_VERSION, offer,
                                                      wire.DEFAULT_MAX_FRAME, name,
                                                      os.urandom(wire.CLIENT_ID_SIZE))))
            hello: HelloReply = await asyncio.wait_for(asyncio.shield(self.hello_future), timeout)
            if hello.error:
                raise ConnectionError(f"HELLO refused: {os.strerror(-hello.error)}")
            if hello.features & wire.FEATURE_AUTH:
                if token is None:
                    raise ConnectionError("the host asks for a token and we have none")
                nonce = auth.new_nonce()
                self.transport.write(self.conn.send(
                    Auth(nonce, auth.guest_proof(token, hello.nonce, nonce))))
                answer: AuthReply = await asyncio.wait_for(asyncio.shield(self.auth_future),
                                                           timeout)
                if answer.error or not auth.proof_matches(
                        auth.host_proof(token, nonce, hello.nonce), answer.proof):
                    raise ConnectionError(f"AUTH failed ({answer.error})")
        except BaseException:
            self.transport.abort()
            raise
        self.hello = hello
        self.term_ns = hello.lease_term_ms * 1_000_000
        return self

    # --- asyncio.Protocol -------------------------------------------------------

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        try:
            self.conn.receive_data(data)
            while (event := self.conn.next_event()) is not NEED_DATA:
                self._event(event)
        except ProtocolError:
            self.transport.abort()

    def _event(self, event) -> None:
        received = now_ns()
        match event:
            case HelloReply():
                if not self.hello_future.done():
                    self.hello_future.set_result(event)
            case AuthReply():
                if not self.auth_future.done():
                    self.auth_future.set_result(event)
            case FsReply():
                future, sent, owed = self.replies.pop(event.unique, (None, 0, False))
                if future is not None:
                    if event.lease.renews and event.error != -errno.EKEYEXPIRED:
                        self._renewed(sent, owed)
                    if not future.done():
                        future.set_result(event)
            case HeartbeatReply():
                future, sent, owed = self.heartbeats.pop(event.seq, (None, 0, False))
                if future is not None:
                    if event.error == 0:
                        self._renewed(sent, owed)
                    if not future.done():
                        future.set_result((event, received))
            case Invalidate() | InvalEntry():
                self.invalidations += 1
                self.received.append((received, event))
                if self.auto_ack:
                    self.transport.write(self.conn.send(Ack(event.seq)))
                elif self.owed_since_ns is None:
                    self.owed_since_ns = received
            case ConnectionClosed():
                self.transport.close()

    def _renewed(self, sent: int, owed: bool) -> None:
        if owed:
            self.renewed_while_owed += 1
        elif sent > self.renewed_sent_ns:
            self.renewed_sent_ns = sent

    def connection_lost(self, exc):
        if not self.lost.done():
            self.lost_ns = now_ns()
            self.lost.set_result(exc)
        for table in (self.replies, self.heartbeats):
            for future, _, _ in table.values():
                if not future.done():
                    future.set_exception(ConnectionError("connection lost"))
            table.clear()
        for future in (self.hello_future, self.auth_future):
            if not future.done():
                future.set_exception(ConnectionError("connection lost"))
                future.exception()  # retrieved: nobody may be waiting for it

    # --- what the peer does ---------------------------------------------------------

    def expiry_ns(self) -> int:
        """Where this session's term ends, counted as a guest counts it."""
        return self.renewed_sent_ns + self.term_ns

    async def call(self, nodeid: int, op, timeout: float = 30.0) -> FsReply:
        if self.lost.done():
            raise ConnectionError("connection lost")
        unique = self.next
        self.next += 1
        future = asyncio.get_running_loop().create_future()
        self.replies[unique] = (future, now_ns(), self.owed_since_ns is not None)
        self.transport.write(self.conn.send(FsRequest(unique, nodeid, op)))
        return await asyncio.wait_for(future, timeout)

    async def heartbeat(self, timeout: float = 10.0) -> tuple[HeartbeatReply, int]:
        """(reply, received at ns)."""
        if self.lost.done():
            raise ConnectionError("connection lost")
        seq = self.next
        self.next += 1
        future = asyncio.get_running_loop().create_future()
        self.heartbeats[seq] = (future, now_ns(), self.owed_since_ns is not None)
        self.transport.write(self.conn.send(Heartbeat(seq)))
        return await asyncio.wait_for(future, timeout)

    async def resolve(self, path: str) -> int:
        nodeid = ROOT
        for part in path.split("/"):
            reply = await self.call(nodeid, Lookup(os.fsencode(part)))
            if reply.error:
                raise OSError(-reply.error, f"LOOKUP {part}: {os.strerror(-reply.error)}")
            nodeid = reply.body.nodeid
        return nodeid

    async def open_file(self, path: str, flags: int) -> tuple[int, int]:
        nodeid = await self.resolve(path)
        reply = await self.call(nodeid, Open(flags))
        if reply.error:
            raise OSError(-reply.error, f"OPEN {path}: {os.strerror(-reply.error)}")
        return nodeid, reply.body.fh

    def close(self) -> None:
        if self.transport is not None:
            self.transport.abort()


async def _connect_until(address: str, name: str, token: bytes | None, until: float, *,
                         auto_ack: bool = False) -> RawSession | None:
    """A RawSession, retrying with backoff (the host may be restarting) until `until`."""
    delay = 0.02
    while True:
        try:
            return await RawSession.open(address, name, token, auto_ack=auto_ack)
        except (OSError, ConnectionError, asyncio.TimeoutError):
            if time.monotonic() + delay > until:
                return None
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.5)


# --- silent holders ------------------------------------------------------------------


@dataclass
class _HolderStats:
    sessions: int = 0
    leases: int = 0
    invalidations: int = 0
    owed_sessions: int = 0  # sessions that received an invalidation (and never ACKed)
    fences_learned: int = 0  # of those, how many a heartbeat told -EKEYEXPIRED
    lost_while_owed: int = 0  # connection lost (a host restart) before it could learn
    never_fenced: int = 0  # owed an ACK for longer than the bound and still not fenced
    fenced_unowed: int = 0  # told -EKEYEXPIRED without ever having been sent an invalidation
    renewed_while_owed: int = 0
    withheld_heartbeats: int = 0  # heartbeat replies -EAGAIN (not renewed)
    last_instant_reads: int = 0
    fence_learned_ms: list[float] = field(default_factory=list)
    # One per session: index, outcome, renewed (sent) ns, term end ns, lost ns,
    # owed since ns, boot id: what its last-instant reads were judged by.
    ends: list[list] = field(default_factory=list)


async def silent_holders(args) -> int:
    files = parse_files(args.files)
    token = _token(args)
    log = LogWriter(args.log)
    st = _HolderStats()
    ops = itertools.count()
    until = time.monotonic() + args.for_s
    bound_s = args.bound_ms / 1000.0
    signalled = False
    actor = args.actor

    def last_instant(held: list, t_last: int, who: str) -> None:
        """The reads a guest that ignored its invalidations would serve at the last
        instant its term allowed: every write is judged against them."""
        t = t_last - 1000  # 1 us inside the term
        for file_id, versions, read_end in held:
            if t <= read_end:
                continue  # the term had run out before the reply arrived
            op = next(ops)
            for block, writer, seq in versions:
                log.write(ReadRecord(who, file_id, block, writer, seq, t, t, True, op, None))
                st.last_instant_reads += 1

    async def hold(session: RawSession, index: int, held: list) -> bool:
        """Lease the root and every file (into `held`); False if the session was lost."""
        nonlocal signalled
        try:
            await session.call(ROOT, Getattr())
            for f in files:
                start = now_ns()
                nodeid, fh = await session.open_file(f.path, os.O_RDONLY)
                reply = await session.call(nodeid, Read(fh, 0, f.blocks * BLOCK))
                end = now_ns()
                if reply.error:
                    continue
                versions = _log_block_reads(log, actor, next(ops), f.file_id, 0,
                                            reply.body.data, start, end, False)
                if reply.lease.granted:
                    st.leases += 1
                    held.append((f.file_id, versions, end))
        except (ConnectionError, OSError, asyncio.TimeoutError):
            return False
        if index == 0 and not signalled:
            signalled = True
            if args.signal:
                say("HOLDING")
        return True

    async def stay_silent(session: RawSession) -> str:
        """Heartbeat every term/3 and ACK nothing, until fenced ('fenced'), the window
        is over with nothing owed ('closed'), the connection goes ('lost'), or an
        ACK has been owed for longer than the bound ('never-fenced')."""
        interval = session.term_ns / 3e9
        while True:
            owed = session.owed_since_ns
            if owed is None and time.monotonic() >= until:
                return "closed"
            if owed is not None and now_ns() - owed > (bound_s + 2 * interval + 1.0) * 1e9:
                return "never-fenced"
            try:
                reply, received = await session.heartbeat()
            except asyncio.TimeoutError:
                session.close()
                return "lost"
            except ConnectionError:
                return "lost"
            if reply.error == -errno.EKEYEXPIRED:
                if session.owed_since_ns is not None:
                    st.fence_learned_ms.append((received - session.owed_since_ns) / 1e6)
                return "fenced"
            if reply.error == -errno.EAGAIN:
                st.withheld_heartbeats += 1
            try:
                await asyncio.wait_for(asyncio.shield(session.lost), interval)
                return "lost"
            except asyncio.TimeoutError:
                pass

    def tally(session: RawSession, outcome: str) -> None:
        st.invalidations += session.invalidations
        st.renewed_while_owed += session.renewed_while_owed
        if session.owed_since_ns is None:
            st.fenced_unowed += outcome == "fenced"
            return
        st.owed_sessions += 1
        if outcome == "fenced":
            st.fences_learned += 1
        elif outcome == "lost":
            st.lost_while_owed += 1
        else:
            st.never_fenced += 1

    async def one(index: int) -> None:
        while time.monotonic() < until:
            session = await _connect_until(args.address, f"{actor}.{index}", token, until + 5.0)
            if session is None:
                return
            if time.monotonic() >= until:
                session.close()
                return
            st.sessions += 1
            held: list = []
            outcome = await stay_silent(session) if await hold(session, index, held) else "lost"
            tally(session, outcome)
            # Its leases end where its own term ends, whatever became of the connection:
            # a guest whose kernel keeps its pages (a mount) serves them until then, and
            # a lost connection is not an ACK, nor is a host restart (docs/design.md,
            # "Disappearance").  So the last-instant reads are judged at the term's end.
            # A connection lost (the host was killed: nothing else closes a holder's)
            # before then gives two: at the loss, against the boot that granted the
            # leases, and at the term's end as `<actor>+restart`, against the next boot
            # too, which must not land a write on them until then either.
            end = session.expiry_ns()
            st.ends.append([index, outcome, session.renewed_sent_ns, end, session.lost_ns,
                            session.owed_since_ns, session.hello.boot_id.hex()[:8]])
            if outcome == "lost" and 0 < session.lost_ns < end:
                last_instant(held, session.lost_ns, actor)
                last_instant(held, end, actor + "+restart")
            else:
                last_instant(held, end, actor)
            session.close()

    say("READY")
    await asyncio.gather(*(one(i) for i in range(args.count)))
    log.close()
    _write_stats(args.stats, dict(kind="silent-holders", count=args.count, **st.__dict__))
    return 0


# --- a write that fails after its recall -------------------------------------------------


async def failing_write(args) -> int:
    f = parse_files(args.file)[0]
    token = _token(args)
    log = LogWriter(args.log)
    result = dict(kind="failing-write", file=f.path, done=False, efbig=False,
                  generation_published=False, clean_again=False, clean_ms=None, errno=None,
                  modifications=[], interrupted=None, attempts=0)
    ops = itertools.count()
    until = time.monotonic() + args.clean_within + 10.0
    say("READY")

    async def attempt(session: RawSession) -> None:
        nodeid, fh = await session.open_file(f.path, os.O_RDWR)
        start = now_ns()
        reply = await session.call(nodeid, Read(fh, 0, f.blocks * BLOCK))
        _log_block_reads(log, args.actor, next(ops), f.file_id, 0, reply.body.data, start,
                         now_ns(), False)
        granted_gen = reply.lease.generation if reply.lease.granted else None
        block = stamps.make_block(stamps.Stamp(f.file_id, FAILING_OFFSET // BLOCK,
                                               args.writer_id, result["attempts"], now_ns()))
        w0 = now_ns()
        w = await session.call(nodeid, Write(fh, FAILING_OFFSET, block))
        w1 = now_ns()
        # The recall and the failure, and then the way back to CLEAN: a read granted
        # a lease of the failed write's generation or a later one.
        clean_ms = None
        deadline = time.monotonic() + args.clean_within
        while time.monotonic() < deadline:
            r0 = now_ns()
            r = await session.call(nodeid, Read(fh, 0, f.blocks * BLOCK))
            _log_block_reads(log, args.actor, next(ops), f.file_id, 0, r.body.data, r0,
                             now_ns(), False)
            if r.lease.granted and r.lease.generation >= w.lease.generation:
                clean_ms = (now_ns() - w1) / 1e6
                break
            await asyncio.sleep(0.02)  # a poll with a deadline: DIRTY until the flush
        await session.call(nodeid, Release(fh))
        result.update(
            done=True, errno=-w.error, efbig=w.error == -errno.EFBIG,
            generation=w.lease.generation,
            generation_published=w.lease.ino == nodeid and (
                w.lease.generation > granted_gen if granted_gen is not None
                else w.lease.generation > 0),
            clean_again=clean_ms is not None, clean_ms=clean_ms)
        result["modifications"].append([w0, w1])

    # A host restart in the middle makes the answers of that boot moot (generations
    # start again): the whole sequence is tried again on the new boot.
    while not result["done"] and time.monotonic() < until:
        result["attempts"] += 1
        # It ACKs what it is sent: only its own write is the fault.
        session = await _connect_until(args.address, args.actor, token, until, auto_ack=True)
        if session is None:
            result["interrupted"] = "could not connect"
            break
        try:
            await attempt(session)
        except (ConnectionError, OSError, asyncio.TimeoutError) as exc:
            result["interrupted"] = f"{type(exc).__name__}: {exc}"
        finally:
            session.close()
    log.close()
    _write_stats(args.stats, result)
    return 0


# --- namespace changes ---------------------------------------------------------------------


async def _library_client(args, deadline_s: float = 15.0):
    """A GuestClient, connecting again with backoff while the host is being restarted."""
    from guest.client import AuthenticationFailed, GuestClient

    until = time.monotonic() + deadline_s
    delay = 0.02
    while True:
        try:
            return await GuestClient.connect(args.address, name=args.actor, token=_token(args),
                                             request_timeout=30.0)
        except AuthenticationFailed:
            raise
        except (OSError, ConnectionError, asyncio.TimeoutError):
            if time.monotonic() + delay > until:
                raise
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.5)


def _side_path(directory: str, name: str) -> str:
    return f"{directory}/{name}" if directory else name


async def namespace_churn(args) -> int:
    from guest.client import HostError, OutcomeUnknown, SessionLost

    dirs = [d if d != "." else "" for d in args.dirs.split(",")]
    file_ids = [int(x) for x in args.file_ids.split(",")]
    log = LogWriter(args.log)
    client = await _library_client(args)
    await client.lease_root()
    for d in dirs:
        for _ in range(5):  # a restart may hide whether it happened: ask again
            if not d:
                break
            try:
                await client.mkdir(d)
                break
            except HostError as exc:
                if exc.errno == errno.EEXIST:
                    break
                raise
            except SessionLost:
                continue
    stats = dict(kind="namespace-churn", renames=0, creates=0, unlinks=0, uncertain=0,
                 failed={}, modifications=[])
    seqs = itertools.count(1)
    rng = random.Random(args.seed)
    until = time.monotonic() + args.for_s
    say("READY")

    def failed(kind: str, exc: Exception) -> None:
        key = f"{kind}: {type(exc).__name__}"
        stats["failed"][key] = stats["failed"].get(key, 0) + 1

    async def timed(kind: str, coro):
        t0 = now_ns()
        result = await coro
        stats["modifications"].append([t0, now_ns()])
        stats[kind] += 1
        return result

    async def worker(tag: int, directory: str, file_id: int) -> None:
        n = 0
        while time.monotonic() < until:
            n += 1
            tmp = _side_path(directory, f"{args.side}.{tag}-{n}.tmp")
            seq = next(seqs)
            try:
                handle = await timed("creates", client.create(tmp))
                data = stamps.make_block(stamps.Stamp(file_id, 0, args.writer_id, seq, now_ns()))
                await client.write(handle, 0, data)
                await client.close_file(handle)
            except (HostError, SessionLost, TimeoutError) as exc:
                failed("create", exc)
                continue
            start = now_ns()
            try:
                await client.rename(tmp, _side_path(directory, args.side))
                end = now_ns()
                stats["modifications"].append([start, end])
                stats["renames"] += 1
                log.write(WriteRecord(args.actor, file_id, 0, args.writer_id, seq, start, end,
                                      None, "guest"))
            except (SessionLost, OutcomeUnknown) as exc:
                # It may or may not have happened: its version is a possible one.
                stats["uncertain"] += 1
                log.write(WriteRecord(args.actor, file_id, 0, args.writer_id, seq, start,
                                      now_ns(), None, "uncertain"))
                failed("rename", exc)
                continue
            except (HostError, TimeoutError) as exc:
                failed("rename", exc)
                continue
            junk = _side_path(directory, f"{args.side}.junk-{tag}-{n}")
            try:
                handle = await timed("creates", client.create(junk))
                await client.close_file(handle)
                await timed("unlinks", client.unlink(junk))
            except (HostError, SessionLost, TimeoutError) as exc:
                failed("junk", exc)
            if rng.random() < 0.3:
                try:
                    await client.listdir(directory)
                except (HostError, SessionLost, TimeoutError) as exc:
                    failed("readdir", exc)
            await asyncio.sleep(args.pause_ms / 1000.0)  # pacing, not an ordering

    # Several changes in flight at once in each directory.
    await asyncio.gather(*(worker(t, d, fid) for d, fid in zip(dirs, file_ids)
                           for t in range(args.concurrency)))
    log.close()
    await client.close()
    _write_stats(args.stats, stats)
    return 0


async def name_reader(args) -> int:
    from guest.client import HostError, SessionLost

    dirs = [d if d != "." else "" for d in args.dirs.split(",")]
    file_ids = [int(x) for x in args.file_ids.split(",")]
    log = LogWriter(args.log)
    client = await _library_client(args)
    stats = dict(kind="name-reader", reads=0, hits=0, missing=0, failed=0)
    ops = itertools.count()
    until = time.monotonic() + args.for_s
    say("READY")
    while time.monotonic() < until:
        for d, file_id in zip(dirs, file_ids):
            try:
                # The directory's lease: its entries may then be cached.
                await client.stat(d)
                start = now_ns()
                handle = await client.open(_side_path(d, args.side))
                try:
                    result = await client.read(handle, 0, BLOCK)
                finally:
                    await client.close_file(handle)
                end = now_ns()
            except HostError as exc:
                if exc.errno in (errno.ENOENT, errno.ESTALE):
                    stats["missing"] += 1
                else:
                    stats["failed"] += 1
                continue
            except (SessionLost, TimeoutError):
                stats["failed"] += 1
                continue
            stats["reads"] += 1
            stats["hits"] += bool(result.hit)
            _log_block_reads(log, args.actor, next(ops), file_id, 0, result.data, start, end,
                             result.hit)
        await asyncio.sleep(0.005)  # pacing, not an ordering
    log.close()
    stats["entry_hits"] = client.cache.stats.entry_hits
    await client.close()
    _write_stats(args.stats, stats)
    return 0


# --- how quickly the daemon answers: a probe ------------------------------------------------


async def probe(args) -> int:
    """Heartbeat every `--every` s for `--for` s (reconnecting after a restart); the
    stats list [sent ns, reply latency ms] for every heartbeat: the daemon's
    responsiveness, to tell a stall the protocol caused from one the daemon's
    being unscheduled or blocked caused."""
    token = _token(args)
    until = time.monotonic() + args.for_s
    samples = []
    say("READY")
    while time.monotonic() < until:
        session = await _connect_until(args.address, args.actor, token, until, auto_ack=True)
        if session is None:
            break
        try:
            while time.monotonic() < until:
                sent = now_ns()
                _, received = await session.heartbeat(timeout=30.0)
                samples.append([sent, (received - sent) / 1e6])
                await asyncio.sleep(args.every)  # the probe's period, not an ordering
        except (ConnectionError, asyncio.TimeoutError):
            pass
        finally:
            session.close()
    open(args.log, "a").close()
    _write_stats(args.stats, dict(kind="probe", samples=samples))
    return 0


# --- guest writes for the injector to restart the host under ----------------------------


async def inflight_writes(args) -> int:
    from guest.client import HostError, OutcomeUnknown, SessionLost

    f = parse_files(args.file)[0]
    log = LogWriter(args.log)
    client = await _library_client(args)
    handle = await client.open(f.path, os.O_RDWR)
    stats = dict(kind="inflight-writes", writes=0, uncertain=0, failed={}, modifications=[])
    say("READY")
    loop = asyncio.get_running_loop()
    line = await loop.run_in_executor(None, sys.stdin.readline)
    if line.strip() == "GO":
        for n in range(1, args.writes + 1):
            block = n % f.blocks
            start = now_ns()
            data = stamps.make_block(stamps.Stamp(f.file_id, block, args.writer_id, n, start))
            say("INFLIGHT", n)
            try:
                await client.write(handle, block * BLOCK, data)
                end = now_ns()
                stats["writes"] += 1
                stats["modifications"].append([start, end])
                log.write(WriteRecord(args.actor, f.file_id, block, args.writer_id, n, start, end,
                                      None, "guest"))
            except OutcomeUnknown:
                stats["uncertain"] += 1
                log.write(WriteRecord(args.actor, f.file_id, block, args.writer_id, n, start,
                                      now_ns(), None, "uncertain"))
            except (HostError, SessionLost, TimeoutError) as exc:
                key = type(exc).__name__
                stats["failed"][key] = stats["failed"].get(key, 0) + 1
            say("DONE", n)
    log.close()
    await client.close()
    _write_stats(args.stats, stats)
    return 0


# --- host-local writes: O_DIRECT, and long buffered ones ------------------------------------

_NR_USERFAULTFD = {"x86_64": 323, "aarch64": 282}.get(os.uname().machine)
_UFFD_API = 0xAA
_UFFDIO_API = 0xC018AA3F
_UFFDIO_REGISTER = 0xC020AA00
_UFFDIO_COPY = 0xC028AA03
_UFFDIO_REGISTER_MODE_MISSING = 1
_UFFD_EVENT_PAGEFAULT = 0x12


def _userfaultfd() -> int:
    """A userfaultfd, or OSError (not permitted, or no such syscall here)."""
    if _NR_USERFAULTFD is None:
        raise OSError(errno.ENOSYS, f"no userfaultfd number for {os.uname().machine}")
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    fd = libc.syscall(_NR_USERFAULTFD, os.O_CLOEXEC | os.O_NONBLOCK)
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"userfaultfd: {os.strerror(err)}")
    fcntl.ioctl(fd, _UFFDIO_API, bytearray(struct.pack("=QQQ", _UFFD_API, 0, 0)), True)
    return fd


class _StalledBuffer:
    """`size` bytes of memory that fill with `data` only when `release()` has been
    called after the first access faulted (`inside` is set then): a write(2) from
    it stays inside the file system's write until then."""

    def __init__(self, data: bytes):
        size = len(data)
        self.uffd = _userfaultfd()
        self.buf = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.addr = ctypes.addressof(ctypes.c_char.from_buffer(self.buf))
        fcntl.ioctl(self.uffd, _UFFDIO_REGISTER, bytearray(struct.pack(
            "=QQQQ", self.addr, size, _UFFDIO_REGISTER_MODE_MISSING, 0)), True)
        self.src = mmap.mmap(-1, size)
        self.src[:] = data
        self.src_addr = ctypes.addressof(ctypes.c_char.from_buffer(self.src))
        self.size = size
        self.inside = threading.Event()
        self.released = threading.Event()
        self.thread = threading.Thread(target=self._handler, daemon=True)
        self.thread.start()

    def _handler(self) -> None:
        while True:
            ready, _, _ = select.select([self.uffd], [], [], 0.1)
            if not ready:
                if self.released.is_set():
                    return  # closed with nothing faulted: the write never touched it
                continue
            try:
                msg = os.read(self.uffd, 32)
            except BlockingIOError:
                continue
            if msg and msg[0] == _UFFD_EVENT_PAGEFAULT:
                break
        self.inside.set()
        self.released.wait(60.0)
        fcntl.ioctl(self.uffd, _UFFDIO_COPY, bytearray(struct.pack(
            "=QQQQq", self.addr, self.src_addr, self.size, 0, 0)), True)

    def close(self) -> None:
        self.released.set()
        self.thread.join(5.0)
        if not self.thread.is_alive():
            os.close(self.uffd)


def _aligned(data: bytes) -> mmap.mmap:
    buf = mmap.mmap(-1, len(data))  # page-aligned: what O_DIRECT needs
    buf[:] = data
    return buf


def host_write(args) -> int:
    files = parse_files(args.files)
    rng = random.Random(args.seed)
    log = LogWriter(args.log)
    export = os.path.realpath(args.export)
    stats = dict(kind="host-write", mode=args.mode, writer=args.writer_id, writes=0, stalled=0,
                 failed={},
                 in_syscall_ms=[], uffd=None, detail=[])  # detail: file, block, seq, open, pwrite, end
    try:
        os.close(_userfaultfd())
        stats["uffd"] = "ok"
    except OSError as exc:
        stats["uffd"] = f"unavailable: {exc.strerror or exc}"
    say("READY")
    for n in range(1, args.writes + 1):
        f = rng.choice(files)
        block = rng.randrange(f.blocks)
        stall = rng.uniform(args.stall_min_ms, args.stall_max_ms) / 1000.0
        path = os.path.join(export, f.path)
        start = now_ns()
        data = stamps.make_block(stamps.Stamp(f.file_id, block, args.writer_id, n, start))
        flags = os.O_WRONLY | (os.O_DIRECT if args.mode == "direct" else 0)
        stalled = None
        try:
            opened = now_ns()
            fd = os.open(path, flags)
        except OSError as exc:
            key = f"open: {errno.errorcode.get(exc.errno, exc.errno)}"
            stats["failed"][key] = stats["failed"].get(key, 0) + 1
            continue
        try:
            if stats["uffd"] == "ok":
                stalled = _StalledBuffer(data)
                buf = stalled.buf
                waiter = threading.Thread(target=_release_after, daemon=True,
                                          args=(stalled, stall, args.hold))
                waiter.start()
            else:
                buf = _aligned(data)
            w0 = now_ns()
            os.pwrite(fd, buf, block * BLOCK)
            end = now_ns()
        except OSError as exc:
            key = f"pwrite: {errno.errorcode.get(exc.errno, exc.errno)}"
            stats["failed"][key] = stats["failed"].get(key, 0) + 1
            # A failed write may still have written some of it: a possible version.
            log.write(WriteRecord(args.actor, f.file_id, block, args.writer_id, n, start,
                                  now_ns(), None, "uncertain"))
            continue
        finally:
            os.close(fd)
            if stalled is not None:
                stalled.close()
        stats["writes"] += 1
        stats["stalled"] += stalled is not None
        stats["in_syscall_ms"].append((end - w0) / 1e6)
        stats["detail"].append([f.file_id, block, n, opened, w0, end])
        log.write(WriteRecord(args.actor, f.file_id, block, args.writer_id, n, start, end, None,
                              "host-local"))
    log.close()
    _write_stats(args.stats, stats)
    return 0


def _release_after(stalled: _StalledBuffer, stall_s: float, hold: bool) -> None:
    """The stall of one write: from the fault inside write(2), for `stall_s` (the
    fault's seeded length), or, with `hold`, until the injector says RELEASE."""
    if not stalled.inside.wait(30.0):
        return
    if hold:
        say("INSIDE")
        sys.stdin.readline()
    else:
        time.sleep(stall_s)  # the length of this fault, not an ordering
    stalled.released.set()


# --- command line ----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m workload.chaos_peers",
                                     description="fault peers for cleanlease chaos")
    sub = parser.add_subparsers(dest="kind", required=True)

    def common(p, address=True):
        if address:
            p.add_argument("address")
            p.add_argument("--token-file", default=None)
        p.add_argument("--actor", required=True)
        p.add_argument("--log", required=True)
        p.add_argument("--stats", required=True)
        p.add_argument("--seed", type=int, default=1)
        p.add_argument("--writer-id", type=int, default=9000)

    p = sub.add_parser("silent-holders")
    common(p)
    p.add_argument("--count", type=int, default=1)
    p.add_argument("--for", dest="for_s", type=float, default=2.0)
    p.add_argument("--files", required=True)
    p.add_argument("--bound-ms", type=float, required=True,
                   help="ack timeout + term + margin: a session owing an ACK longer is a failure")
    p.add_argument("--signal", action="store_true", help="print HOLDING once leases are held")
    p = sub.add_parser("failing-write")
    common(p)
    p.add_argument("--file", required=True)
    p.add_argument("--clean-within", type=float, default=5.0)
    p = sub.add_parser("namespace-churn")
    common(p)
    p.add_argument("--side", default="side.dat", help="the name renamed over in each directory")
    p.add_argument("--for", dest="for_s", type=float, default=2.0)
    p.add_argument("--dirs", default=".,churn.d")
    p.add_argument("--file-ids", required=True)
    p.add_argument("--concurrency", type=int, default=2, help="changes in flight per directory")
    p.add_argument("--pause-ms", type=float, default=15.0)
    p = sub.add_parser("name-reader")
    common(p)
    p.add_argument("--side", default="side.dat")
    p.add_argument("--for", dest="for_s", type=float, default=2.0)
    p.add_argument("--dirs", default=".,churn.d")
    p.add_argument("--file-ids", required=True)
    p = sub.add_parser("probe")
    common(p)
    p.add_argument("--for", dest="for_s", type=float, default=10.0)
    p.add_argument("--every", type=float, default=0.05)
    p = sub.add_parser("inflight-writes")
    common(p)
    p.add_argument("--file", required=True)
    p.add_argument("--writes", type=int, default=2)
    p = sub.add_parser("host-write")
    p.add_argument("export")
    common(p, address=False)
    p.add_argument("--mode", choices=("direct", "buffered"), required=True)
    p.add_argument("--files", required=True)
    p.add_argument("--writes", type=int, default=2)
    p.add_argument("--stall-min-ms", type=float, default=20.0)
    p.add_argument("--stall-max-ms", type=float, default=200.0)
    p.add_argument("--hold", action="store_true",
                   help="print INSIDE when a write is inside write(2); let it go on at a line")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.kind == "host-write":
        return host_write(args)
    runner = {"silent-holders": silent_holders, "failing-write": failing_write,
              "namespace-churn": namespace_churn, "name-reader": name_reader, "probe": probe,
              "inflight-writes": inflight_writes}[args.kind]
    return asyncio.run(runner(args))


if __name__ == "__main__":
    sys.exit(main())
