"""`cleanlease bench`: what the codec, a cache hit, a miss, a recall and the daemon cost.

Every figure is measured in this run and shown next to a baseline measured in
the same run, as a ratio:

* codec: µs per message through the fast path (protocol/fastcodec.py) and the
  reference codec (construct), against `struct.pack`/`unpack` of the very same
  fields with the struct formats the fast path derived;
* cache miss: a 4 KiB `GuestClient.read` through a real `cleanlease host`
  process, against a raw echo of the same bytes (the READ request frame out,
  the READ reply frame back) between two processes, with no protocol at all;
* cache hit: `GuestClient.read` on a hit and `GuestCache.read_pages` alone,
  against an awaited no-op coroutine and a bare LRU lookup;
* the first dirtying write with 1, 4 and 16 lease holders, against the same
  writer's next write (the inode is DIRTY then: one round trip, no recall).
  The holders are 16 guest connections in ONE helper process: this measures
  the host's recall, not 16 guest machines;
* daemon throughput with 1 to 16 guest connections (in one helper process,
  closed loop, one READ outstanding per connection), against the same helper
  driving the raw echo server, plus the daemon's CPU time per request;
* uvloop against asyncio: the miss and the echo again with `--loop asyncio`
  on both sides;
* two costs behind the server-side recommendations of docs/performance.md;

For the miss and its echo baseline, where the two processes run is pinned
(`Placement`): a wake-up across CPUs costs several times one on the same CPU
here, and the scheduler would otherwise pick either from run to run; both
placements are measured.  The recall and throughput runs (three or more
processes) are left to the scheduler.
* memory: bytes allocated per cached MiB of a GuestCache (tracemalloc; RSS
  growth too), against the MiB of data it holds.

Helper processes are this module run with `python -m workload.bench HELPER`.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import timeit
from dataclasses import asdict, dataclass, field

from protocol.address import parse_address

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGE = 4096
BENCH_FILE = "bench.dat"
MISS_CACHE_BYTES = 4 << 20  # the guest cache of the miss runs: 1024 pages


# --- results -----------------------------------------------------------------------------------


@dataclass
class Row:
    group: str
    metric: str
    value: float
    unit: str
    baseline: float
    baseline_label: str
    max_ratio: float | None = None  # target: value <= max_ratio * baseline
    max_value: float | None = None  # target: value <= max_value (in `unit`)
    min_ratio: float | None = None  # target: value >= min_ratio * baseline
    higher_is_better: bool = False
    note: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        return self.value / self.baseline if self.baseline else float("inf")

    @property
    def target(self) -> str:
        if self.max_ratio is not None:
            return f"≤ {self.max_ratio:g}×"
        if self.min_ratio is not None:
            return f"≥ {self.min_ratio:g}×"
        if self.max_value is not None:
            return f"≤ {self.max_value:g} {self.unit}"
        return "-"

    @property
    def met(self) -> bool | None:
        if self.max_ratio is not None:
            return self.ratio <= self.max_ratio
        if self.min_ratio is not None:
            return self.ratio >= self.min_ratio
        if self.max_value is not None:
            return self.value <= self.max_value
        return None

    def as_dict(self) -> dict:
        d = asdict(self)
        d.update(ratio=self.ratio, target=self.target, met=self.met)
        return d


def _percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


def _summary(samples_ns: list[int]) -> dict:
    us = [s / 1000.0 for s in samples_ns]
    return {"n": len(us), "p50_us": _percentile(us, 0.5), "p90_us": _percentile(us, 0.9),
            "p99_us": _percentile(us, 0.99), "mean_us": statistics.fmean(us) if us else 0.0,
            "min_us": min(us) if us else 0.0}


def machine() -> dict:
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        import uvloop

        uvloop_version = uvloop.__version__
    except ImportError:  # pragma: no cover
        uvloop_version = "absent"
    return {"nproc": len(os.sched_getaffinity(0)), "cpu": model, "kernel": platform.release(),
            "python": platform.python_version(), "implementation": platform.python_implementation(),
            "uvloop": uvloop_version, "loadavg_at_start": os.getloadavg()}


# --- processes ---------------------------------------------------------------------------------


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


class Child:
    """A helper process we started; it speaks lines on stdin/stdout."""

    def __init__(self, argv: list[str], name: str, workdir: str, env: dict | None = None):
        self.name = name
        self.err_path = os.path.join(workdir, f"{name}.stderr")
        self._err = open(self.err_path, "wb")
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self._err, cwd=ROOT, env={**_env(), **(env or {})},
                                     bufsize=0)

    def line(self, timeout: float = 30.0) -> str:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            raise RuntimeError(f"{self.name}: no output within {timeout}s ({self._tail()})")
        line = self.proc.stdout.readline().decode()
        if not line:
            raise RuntimeError(f"{self.name} exited with {self.proc.wait()} ({self._tail()})")
        return line.strip()

    def expect(self, word: str, timeout: float = 30.0) -> str:
        line = self.line(timeout)
        if not line.startswith(word):
            raise RuntimeError(f"{self.name}: expected {word!r}, got {line!r} ({self._tail()})")
        return line

    def say(self, text: str) -> None:
        self.proc.stdin.write((text + "\n").encode())
        self.proc.stdin.flush()

    def cpu_seconds(self) -> float:
        """CPU time of the process so far, all its threads: nanoseconds on a CPU from
        /proc/PID/task/*/schedstat (utime + stime ticks of /proc/PID/stat if absent)."""
        pid = self.proc.pid
        try:
            total = 0
            for task in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                    total += int(f.read().split()[0])
            return total / 1e9
        except (OSError, ValueError, IndexError):
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def _tail(self) -> str:
        try:
            with open(self.err_path, "rb") as f:
                return f.read()[-800:].decode(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._err.close()


def start_host(workdir: str, name: str, loop: str, *extra: str, env: dict | None = None
               ) -> tuple[Child, str]:
    sock = os.path.join(workdir, f"{name}.sock")
    argv = [sys.executable, "-m", "workload.cli", "host",
            "--export", os.path.join(workdir, "export"), "--listen", f"unix:{sock}",
            "--detector", "none", "--loop", loop, *extra]
    child = Child(argv, name, workdir, env)
    child.expect("READY")
    return child, f"unix:{sock}"


def start_helper(workdir: str, name: str, *args: str) -> Child:
    child = Child([sys.executable, "-m", "workload.bench", *args], name, workdir)
    child.expect("READY")
    return child


def _run(coro, loop: str):
    if loop == "uvloop":
        import uvloop

        return uvloop.run(coro)
    return asyncio.run(coro)


# --- the frames a 4 KiB miss puts on the wire --------------------------------------------------


def read_frames() -> tuple[bytes, bytes]:
    """The READ request frame and its 4 KiB reply frame, as the protocol sends them."""
    from protocol import fastcodec
    from protocol.messages import FsReply, FsRequest, LeaseGrant, Read, ReadOut

    request = fastcodec.encode_frame(FsRequest(1, 2, Read(3, 0, PAGE)))
    reply = fastcodec.encode_frame(FsReply(1, 0, ReadOut(bytes(PAGE)), LeaseGrant(2, 1, 2000, 1)))
    return request, reply


# --- 1. the codec ------------------------------------------------------------------------------


def _best_us(stmt: str, namespace: dict, number: int, repeat: int) -> float:
    """Best-of-`repeat` mean µs per execution of `stmt` (timeit; no per-call wrapper)."""
    timer = timeit.Timer(stmt, globals=namespace)
    return min(timer.repeat(repeat=repeat, number=number)) / number * 1e6


def _best_pair_us(stmt: str, baseline: str, namespace: dict, number: int, repeat: int
                  ) -> tuple[float, float]:
    """Like _best_us for `stmt` and its `baseline`, their repeats interleaved, so that a
    busy moment of the machine cannot fall on one of the two only."""
    timers = timeit.Timer(stmt, globals=namespace), timeit.Timer(baseline, globals=namespace)
    best = [float("inf"), float("inf")]
    for _ in range(repeat):
        for i, timer in enumerate(timers):
            best[i] = min(best[i], timer.timeit(number))
    return best[0] / number * 1e6, best[1] / number * 1e6


def bench_codec(quick: bool) -> list[Row]:
    from protocol import codec, fastcodec
    from protocol.fuse import Opcode
    from protocol.messages import (
        Attr,
        AttrOut,
        FsReply,
        FsRequest,
        Invalidate,
        LeaseGrant,
        Read,
        ReadOut,
    )

    n = 3000 if quick else 20000
    repeat = 3 if quick else 7
    lease = LeaseGrant(42, 3, 2000, 1)
    attr = Attr(42, 1 << 20, 2048, 1700000000, 1700000001, 1700000002, 1, 2, 3, 0o100644, 1,
                1000, 1000, 0, 4096)
    FH = fastcodec.FRAME_HEADER
    H, I, O, L = fastcodec.HEADER, fastcodec.IN_HEADER, fastcodec.OUT_HEADER, fastcodec.LEASE
    from protocol import fuse, wire

    read_in = fastcodec.derive(fuse.ReadIn)
    read_request, read_names = fastcodec.join(("h", H), ("i", I), ("b", read_in))
    attr_out = fastcodec.derive(fuse.AttrOut)
    inval, notify = fastcodec.INVAL_INODE, fastcodec.NOTIFY
    cases = [
        # name, message, opcode the reply answers, struct of the whole frame (or parts)
        ("READ request", FsRequest(7, 42, Read(3, 8192, PAGE)), None, read_request),
        ("READ reply, 4 KiB", FsReply(7, 0, ReadOut(os.urandom(PAGE)), lease), Opcode.READ, None),
        ("GETATTR reply", FsReply(7, 0, AttrOut(1, 0, attr), lease), Opcode.GETATTR,
         fastcodec.join(("h", H), ("o", O), ("b", attr_out), ("l", L))[0]),
        ("INVALIDATE", Invalidate(9, 42, 0, 0, 4), None,
         fastcodec.join(("h", H), ("o", O), ("b", inval), ("n", notify))[0]),
    ]
    prefix = fastcodec.join(("h", H), ("o", O))[0]
    trailer = fastcodec.join(("l", L))[0]
    rows: list[Row] = []
    for name, message, opcode, whole in cases:
        frame = fastcodec.encode_frame(message)
        ns = {"fastcodec": fastcodec, "codec": codec, "FH": FH, "frame": frame, "m": message,
              "ro": (lambda unique, _o=opcode: _o), "whole": whole, "prefix": prefix,
              "trailer": trailer, "size": len(frame) - wire.HEADER_SIZE}
        if whole is not None:
            ns["values"] = whole.unpack(frame)
            struct_decode, struct_encode = "whole.unpack_from(frame)", "whole.pack(*values)"
        else:  # a READ reply: fixed prefix, the data, the trailer
            data_end = len(frame) - L.size
            ns["values"] = prefix.unpack_from(frame)
            ns["tvalues"] = trailer.unpack_from(frame, data_end)
            ns["data"] = message.body.data
            ns["data_end"] = data_end
            struct_decode = ("prefix.unpack_from(frame); frame[%d:data_end]; "
                             "trailer.unpack_from(frame, data_end)" % prefix.size)
            struct_encode = "b''.join((prefix.pack(*values), data, trailer.pack(*tvalues)))"
        fast_decode = ("r, f, s = FH.unpack_from(frame); "
                       f"fastcodec.decode(r, f, frame, {wire.HEADER_SIZE}, s, ro)")
        ref_decode = (f"r, f, s = codec.decode_header(frame[:{wire.HEADER_SIZE}]); "
                      f"codec.decode_payload(r, f, frame[{wire.HEADER_SIZE}:], ro)")
        fast_encode = "fastcodec.encode_frame(m)"
        ref_encode = "c, f, p = codec.encode_payload(m); codec.encode_header(c, f, len(p)) + p"
        # the fast path really answers (no silent fallback to the reference)
        r, f, s = FH.unpack_from(frame)
        assert fastcodec.decode(r, f, frame, wire.HEADER_SIZE, s, ns["ro"]) == message
        assert fastcodec.encode_frame(message) == frame
        fd, sd = _best_pair_us(fast_decode, struct_decode, ns, n, repeat)
        fe, se = _best_pair_us(fast_encode, struct_encode, ns, n, repeat)
        rows.append(Row("codec", f"decode {name} (fast)", fd, "µs", sd,
                        "struct.unpack, same fields", max_ratio=3))
        rows.append(Row("codec", f"encode {name} (fast)", fe, "µs", se,
                        "struct.pack, same fields", max_ratio=3))
        if name == "READ request":
            rn = max(200, n // 50)
            rows.append(Row("codec", f"decode {name} (reference, construct)",
                            _best_us(ref_decode, ns, rn, repeat), "µs", sd,
                            "struct.unpack, same fields"))
            rows.append(Row("codec", f"encode {name} (reference, construct)",
                            _best_us(ref_encode, ns, rn, repeat), "µs", se,
                            "struct.pack, same fields"))
            # The floor of any decoder that returns the messages' dataclasses: struct plus
            # their own constructors.
            ns.update(FsRequest=FsRequest, Read=Read)

            def arg(name: str) -> str:
                return f"v[{read_names.index(name)}]"

            op_args = ", ".join(arg(f"b.{f}") for f in
                                ("fh", "offset", "size", "read_flags", "lock_owner", "flags"))
            floor = (f"v = whole.unpack_from(frame); FsRequest({arg('i.unique')}, "
                     f"{arg('i.nodeid')}, Read({op_args}), {arg('i.uid')}, {arg('i.gid')}, "
                     f"{arg('i.pid')})")
            assert eval(floor.partition("; ")[2], {**ns, "v": whole.unpack(frame)}) == message
            rows.append(Row("codec", "decode READ request: struct + dataclass __init__ (floor)",
                            _best_us(floor, ns, n, repeat), "µs", sd,
                            "struct.unpack, same fields",
                            note="what building the frozen dataclasses costs by itself"))
    return rows


# --- 2. cache misses and hits, through a real host ---------------------------------------------


class _EchoClient(asyncio.Protocol):
    def __init__(self, reply_size: int):
        self.reply_size = reply_size
        self.got = 0
        self.waiter: asyncio.Future | None = None

    def data_received(self, data):
        self.got += len(data)
        if self.got >= self.reply_size:
            self.got -= self.reply_size
            self.waiter.set_result(None)


async def echo_latency(address: str, samples: int, warmup: int, cpu: dict | None = None
                       ) -> list[int]:
    """Round trips of the READ request frame out and the 4 KiB reply frame back.

    `cpu`, if given: {"server": callable -> CPU seconds}; the CPU time of this
    process and of the server over the measured round trips is added to it."""
    request, reply = read_frames()
    loop = asyncio.get_running_loop()
    transport, proto = await loop.create_unix_connection(lambda: _EchoClient(len(reply)),
                                                         parse_address(address).path)
    out = []
    clock = time.perf_counter_ns
    for i in range(warmup + samples):
        if i == warmup and cpu is not None:
            mark = _cpu_mark(cpu)
        proto.waiter = loop.create_future()
        t0 = clock()
        transport.write(request)
        await proto.waiter
        if i >= warmup:
            out.append(clock() - t0)
    if cpu is not None:
        _cpu_add(cpu, mark, samples)
    transport.close()
    return out


def _cpu_mark(cpu: dict) -> tuple[float, float]:
    return time.process_time(), cpu["server"]()


def _cpu_add(cpu: dict, mark: tuple[float, float], count: int) -> None:
    """Add this process's and the server's CPU seconds since `mark`, over `count` operations."""
    cpu["client_s"] = cpu.get("client_s", 0.0) + time.process_time() - mark[0]
    cpu["server_s"] = cpu.get("server_s", 0.0) + cpu["server"]() - mark[1]
    cpu["count"] = cpu.get("count", 0) + count


async def miss_and_hit(address: str, samples: int, warmup: int, hits: int, cpu: dict) -> dict:
    from guest.client import GuestClient

    client = await GuestClient.connect(address, name="bench", cache_bytes=MISS_CACHE_BYTES)
    try:
        handle = await client.open(BENCH_FILE)
        clock = time.perf_counter_ns
        misses = []
        for i in range(warmup + samples):
            if i == warmup:
                mark = _cpu_mark(cpu)
            t0 = clock()
            result = await client.read(handle, i * PAGE, PAGE)
            dt = clock() - t0
            if result.hit or len(result.data) != PAGE:
                raise RuntimeError("a miss benchmark read was served from the cache")
            if i >= warmup:
                misses.append(dt)
        _cpu_add(cpu, mark, samples)
        layers = await _client_layers(client, handle, samples, warmup)
        # hits: one page, cached under the lease its READ was granted
        result = await client.read(handle, 0, PAGE)
        hit_samples = []
        read = client.read
        for _ in range(hits):
            t0 = clock()
            result = await read(handle, 0, PAGE)
            hit_samples.append(clock() - t0)
        if not result.hit:
            raise RuntimeError("the hit benchmark missed: no lease?")

        async def noop():
            return result

        floor = []
        for _ in range(hits):
            t0 = clock()
            await noop()
            floor.append(clock() - t0)
        # GuestCache.read_pages alone, and a bare LRU lookup of one page
        cache = client.cache
        pages = cache._pages
        key = (handle.nodeid, 0)
        ns = {"cache": cache, "nodeid": handle.nodeid, "pages": pages, "key": key}
        read_pages = min(timeit.Timer("cache.read_pages(nodeid, 0, 4096)", globals=ns)
                         .repeat(5, 20000)) / 20000 * 1e9
        lru = min(timeit.Timer("pages.get(key); pages.move_to_end(key)", globals=ns)
                  .repeat(5, 20000)) / 20000 * 1e9
        assert cache.read_pages(handle.nodeid, 0, PAGE) is not None
        return {"miss": misses, "hit": hit_samples, "await_noop": floor,
                "read_pages_ns": read_pages, "lru_ns": lru, **layers}
    finally:
        await client.close()


async def _client_layers(client, handle, samples: int, warmup: int) -> dict:
    """The same 4 KiB READ one layer down each time: GuestClient.request (no cache, no
    retry), then the session's bare sans-I/O Connection with one future."""
    from protocol.messages import FsRequest, Read

    clock = time.perf_counter_ns
    loop = asyncio.get_running_loop()
    request, bare = [], []
    for i in range(warmup + samples):
        t0 = clock()
        await client.request(handle.nodeid, Read(handle.fh, (i % 256) * PAGE, PAGE))
        if i >= warmup:
            request.append(clock() - t0)
    session = client.session
    for i in range(warmup + samples):
        unique = (1 << 40) + i  # far from the client's own uniques
        t0 = clock()
        future = loop.create_future()
        session.pending[unique] = (future, 0.0)
        session.transport.write(session.conn.send(
            FsRequest(unique, handle.nodeid, Read(handle.fh, (i % 256) * PAGE, PAGE))))
        await future
        if i >= warmup:
            bare.append(clock() - t0)
    return {"request": request, "bare": bare}


async def reference_misses(address: str, samples: int, warmup: int) -> list[int]:
    """4 KiB misses again, with this process's connection on the reference codec (the host
    was started with CLEANLEASE_CODEC=reference)."""
    from guest.client import GuestClient
    from protocol import connection

    saved, connection.FAST_CODEC = connection.FAST_CODEC, False
    try:
        client = await GuestClient.connect(address, name="bench-ref", cache_bytes=MISS_CACHE_BYTES)
        if client.session.conn.fast_codec:
            raise RuntimeError("the reference run uses the fast codec")
    finally:
        connection.FAST_CODEC = saved
    try:
        handle = await client.open(BENCH_FILE)
        clock = time.perf_counter_ns
        out = []
        for i in range(warmup + samples):
            t0 = clock()
            result = await client.read(handle, i * PAGE, PAGE)
            if i >= warmup:
                out.append(clock() - t0)
            if result.hit:
                raise RuntimeError("a miss benchmark read was served from the cache")
        return out
    finally:
        await client.close()


class Placement:
    """Which CPUs the client (this process) and the server of a latency benchmark run on.

    A wake-up across CPUs costs far more than one on the same CPU (in a VM it is
    an inter-processor interrupt through the hypervisor), and left alone the
    scheduler may do either, run to run.  So both the raw echo and the miss are
    measured with the same, explicit placement: "same" (both on the first CPU)
    and "cross" (client on the first, server on the second)."""

    def __init__(self, kind: str):
        self.kind = kind
        cpus = sorted(os.sched_getaffinity(0))
        self.client = {cpus[0]}
        self.server = {cpus[0]} if kind == "same" else {cpus[1]}
        self._saved = os.sched_getaffinity(0)

    @staticmethod
    def available() -> list[str]:
        return ["same", "cross"] if len(os.sched_getaffinity(0)) >= 2 else ["same"]

    def pin(self, *children: Child) -> None:
        os.sched_setaffinity(0, self.client)
        for child in children:
            os.sched_setaffinity(child.proc.pid, self.server)

    def release(self) -> None:
        os.sched_setaffinity(0, self._saved)


def bench_reference_misses(workdir: str, quick: bool, placement: Placement) -> list[int]:
    samples, warmup = _miss_samples(quick)
    host, address = start_host(workdir, "host-reference", "uvloop",
                               env={"CLEANLEASE_CODEC": "reference"})
    try:
        placement.pin(host)
        return _run(reference_misses(address, samples // 4, warmup), "uvloop")
    finally:
        placement.release()
        host.stop()


def bench_latency(workdir: str, loop: str, quick: bool, placement: Placement) -> dict:
    samples, warmup = _miss_samples(quick)
    hits = 2000 if quick else 20000
    name = f"{loop}-{placement.kind}"
    host, address = start_host(workdir, f"host-{name}", loop)
    echo = start_helper(workdir, f"echo-{name}", "echo", "--socket",
                        os.path.join(workdir, f"echo-{name}.sock"), "--loop", loop)
    echo_cpu, miss_cpu = {"server": echo.cpu_seconds}, {"server": host.cpu_seconds}
    try:
        placement.pin(host, echo)
        echo_address = "unix:" + os.path.join(workdir, f"echo-{name}.sock")
        raw = _run(echo_latency(echo_address, samples // 2, warmup, echo_cpu), loop)
        result = _run(miss_and_hit(address, samples, warmup, hits, miss_cpu), loop)
        raw_again = _run(echo_latency(echo_address, samples // 2, warmup, echo_cpu), loop)
    finally:
        placement.release()
        echo.stop()
        host.stop()
    result["echo"] = raw + raw_again  # before and after: the same conditions as the misses
    for name, cpu in (("echo_cpu", echo_cpu), ("miss_cpu", miss_cpu)):
        result[name] = {"client_us": cpu["client_s"] / cpu["count"] * 1e6,
                        "server_us": cpu["server_s"] / cpu["count"] * 1e6, "count": cpu["count"]}
    return result


# --- 3. the first dirtying write ---------------------------------------------------------------


async def stall(address: str, host: Child, holders: Child, counts: tuple[int, ...],
                rounds: int) -> dict:
    """Per holder count: the first dirtying write's latency, the next write's, the
    ACKs the holders sent, and the CPU the host and the holders' process spent on
    each first write (read from /proc before and after, outside the timing)."""
    from guest.client import GuestClient

    writer = await GuestClient.connect(address, name="writer")
    loop = asyncio.get_running_loop()
    data = os.urandom(PAGE)
    clock = time.perf_counter_ns
    out: dict = {}
    index = 0
    try:
        for count in counts:
            first, plain, acks, host_cpu, holders_cpu = [], [], [], [], []
            for _ in range(rounds):
                path = f"stall/{index}"
                index += 1
                handle = await writer.open(path, os.O_RDWR)
                holders.say(f"hold {count} {path}")
                held = await loop.run_in_executor(None, holders.line)
                if held != f"HELD {count}":
                    raise RuntimeError(f"holders: {held}")
                cpu0 = host.cpu_seconds(), holders.cpu_seconds()
                t0 = clock()
                result = await writer.write(handle, 0, data)
                first.append(clock() - t0)
                await asyncio.sleep(0.002)  # the holders' ACK bookkeeping ends too
                host_cpu.append(host.cpu_seconds() - cpu0[0])
                holders_cpu.append(holders.cpu_seconds() - cpu0[1])
                if not result.first_dirty:
                    raise RuntimeError("the write recalled nothing")
                t0 = clock()
                result = await writer.write(handle, PAGE, data)  # DIRTY now: no recall
                plain.append(clock() - t0)
                if result.first_dirty:
                    raise RuntimeError("the second write recalled again")
                await writer.close_file(handle)
                holders.say("acks")
                acks.append(int((await loop.run_in_executor(None, holders.line)).split()[1]))
            out[count] = {"first": first, "plain": plain, "acks": acks,
                          "host_cpu_us": statistics.median(host_cpu) * 1e6,
                          "holders_cpu_us": statistics.median(holders_cpu) * 1e6}
    finally:
        await writer.close()
    return out


def bench_stall(workdir: str, quick: bool) -> dict:
    counts = (1, 4, 16)
    rounds = 8 if quick else 50
    export = os.path.join(workdir, "export", "stall")
    os.makedirs(export, exist_ok=True)
    for i in range(rounds * len(counts)):
        with open(os.path.join(export, str(i)), "wb") as f:
            f.write(bytes(2 * PAGE))
    host, address = start_host(workdir, "host-stall", "uvloop", "--clean-after", "1000")
    holders = start_helper(workdir, "holders", "holders", "--connect", address, "--guests",
                           str(max(counts)), "--loop", "uvloop")
    try:
        return _run(stall(address, host, holders, counts, rounds), "uvloop")
    finally:
        holders.stop()
        host.stop()


# --- 4. daemon throughput ----------------------------------------------------------------------


def bench_throughput(workdir: str, quick: bool) -> dict:
    counts = (1, 2, 4, 8, 16)
    seconds = 0.5 if quick else 2.0
    host, address = start_host(workdir, "host-load", "uvloop")
    echo_sock = os.path.join(workdir, "echo-load.sock")
    echo = start_helper(workdir, "echo-load", "echo", "--socket", echo_sock, "--loop", "uvloop")
    out: dict = {"daemon": {}, "echo": {}}
    try:
        for count in counts:
            for kind, target, child in (("daemon", address, host),
                                        ("echo", f"unix:{echo_sock}", echo)):
                load = Child([sys.executable, "-m", "workload.bench", "load", "--target", target,
                              "--kind", kind, "--guests", str(count), "--seconds", str(seconds),
                              "--loop", "uvloop"], f"load-{kind}-{count}", workdir)
                try:
                    load.expect("CONNECTED")
                    cpu0 = child.cpu_seconds()
                    load.say("GO")
                    result = json.loads(load.line(seconds + 30))
                    result["server_cpu_s"] = child.cpu_seconds() - cpu0
                finally:
                    load.stop()
                out[kind][count] = result
    finally:
        echo.stop()
        host.stop()
    return out


# --- 6. what the server-side recommendations would save (docs/performance.md) -----------------


def bench_server_hints(quick: bool) -> list[Row]:
    """Two costs the daemon pays per request today, next to the alternative."""
    import socket

    n = 20000 if quick else 100000

    async def tasks_vs_eager() -> tuple[float, float]:
        async def handler(x):  # a handler that does not suspend: READ, GETATTR, LOOKUP, ...
            return x

        loop = asyncio.get_running_loop()
        pending: set = set()
        t0 = time.perf_counter()
        for i in range(n):  # what HostDaemon._spawn does per request
            task = loop.create_task(handler(i))
            pending.add(task)
            task.add_done_callback(pending.discard)
        while pending:
            await asyncio.sleep(0)
        task_us = (time.perf_counter() - t0) / n * 1e6
        t0 = time.perf_counter()
        for i in range(n):  # run it eagerly; only a handler that suspends would need a Task
            coro = handler(i)
            try:
                coro.send(None)
            except StopIteration:
                pass
        return task_us, (time.perf_counter() - t0) / n * 1e6

    task_us, eager_us = _run(tasks_vs_eager(), "uvloop")
    _, reply = read_frames()
    batch = 16
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        b.setblocking(False)
        rounds = 300 if quick else 2000

        def drain() -> None:
            try:
                while b.recv(1 << 20):
                    pass
            except BlockingIOError:
                pass

        each = joined = 0
        frames = [reply] * batch
        for _ in range(rounds):
            t0 = time.perf_counter_ns()
            for frame in frames:
                a.send(frame)
            each += time.perf_counter_ns() - t0
            drain()
            t0 = time.perf_counter_ns()
            a.send(b"".join(frames))
            joined += time.perf_counter_ns() - t0
            drain()
    finally:
        a.close()
        b.close()
    per = rounds * batch * 1000.0
    return [
        Row("server", "a Task (+ done callback) per request that never suspends", task_us, "µs",
            eager_us, "running the coroutine eagerly"),
        Row("server", f"{batch} 4 KiB replies to one guest: one send() each, per reply",
            each / per, "µs", joined / per, f"one send() of all {batch}, per reply"),
    ]


# --- 5. memory ---------------------------------------------------------------------------------


def bench_memory(workdir: str, quick: bool) -> dict:
    mib = 16 if quick else 64
    child = start_helper(workdir, "memory", "memory", "--mib", str(mib))
    try:
        return json.loads(child.line(120))
    finally:
        child.stop()


# --- the whole run -----------------------------------------------------------------------------


def _miss_breakdown(lat: dict, echo: float, echo_label: str, kind: str) -> list[Row]:
    """Where a miss goes: the same READ one layer down at a time, and the CPU each end used."""
    mc, ec = lat["miss_cpu"], lat["echo_cpu"]
    rows = [
        Row("miss", "  same READ via GuestClient.request: no cache, no retry (p50)",
            _p50(lat["request"]), "µs", echo, echo_label),
        Row("miss", "  same READ, bare Connection + future on the session (p50)",
            _p50(lat["bare"]), "µs", echo, echo_label),
        Row("miss", "  guest CPU per miss (mean, user+sys of the guest process)",
            mc["client_us"], "µs", ec["client_us"], "echo client CPU per round trip"),
        Row("miss", "  host CPU per miss (mean, user+sys of the host process)",
            mc["server_us"], "µs", ec["server_us"], "echo server CPU per round trip"),
    ]
    return rows


def _miss_samples(quick: bool) -> tuple[int, int]:
    """(measured, warm-up) misses per run; each reads a page never read before.  The warm-up
    fills the guest's cache (MISS_CACHE_BYTES), so every measured miss also evicts a page:
    the steady state, where a new page reuses the memory of an old one."""
    warmup = MISS_CACHE_BYTES // PAGE + 100
    return (300, warmup) if quick else (4000, warmup)


def _p50(samples_ns: list[int]) -> float:
    return _percentile(samples_ns, 0.5) / 1000.0


def run(args) -> int:
    from rich.console import Console
    from rich.table import Table

    started = time.monotonic()
    console = Console(width=None if sys.stdout.isatty() else 150)
    err = Console(stderr=True)
    info = machine()
    workdir = tempfile.mkdtemp(prefix="cleanlease-bench-")
    export = os.path.join(workdir, "export")
    os.makedirs(export)
    quick = args.quick
    samples, warmup = _miss_samples(quick)
    with open(os.path.join(export, BENCH_FILE), "wb") as f:
        f.write(os.urandom((samples + warmup) * PAGE))
    rows: list[Row] = []
    raw: dict = {}
    try:
        err.print("[dim]bench: codec[/dim]")
        rows += bench_codec(quick)

        placements = Placement.available()
        where = {"same": "same CPU", "cross": "different CPUs"}
        uv: dict = {}
        hit_runs: dict = {}
        for loop in ("uvloop", "asyncio"):
            for kind in placements:
                err.print(f"[dim]bench: miss and hit ({loop}, {where[kind]})[/dim]")
                placement = Placement(kind)
                lat = bench_latency(workdir, loop, quick, placement)
                raw[f"latency_{loop}_{kind}"] = {k: (_summary(v) if isinstance(v, list) else v)
                                                 for k, v in lat.items()}
                hit_runs[f"{loop}, {where[kind]}"] = lat
                miss, echo = _p50(lat["miss"]), _p50(lat["echo"])
                echo_label = f"raw {loop} echo of the same bytes, {where[kind]}"
                if loop == "uvloop":
                    uv[kind] = (miss, echo)
                    rows.append(Row("miss", f"4 KiB read miss via the host, {where[kind]} (p50)",
                                    miss, "µs", echo, echo_label, max_ratio=1.5))
                    rows.extend(_miss_breakdown(lat, echo, echo_label, kind))
                    if kind == "same":
                        ref = bench_reference_misses(workdir, quick, placement)
                        raw["latency_reference_codec_same"] = _summary(ref)
                        rows.append(Row("miss", "  same miss, reference codec (construct) at "
                                        "both ends (p50)", _p50(ref), "µs", miss,
                                        "the fast-codec miss above"))
                else:
                    uv_miss, uv_echo = uv[kind]
                    rows.append(Row("loop", f"4 KiB read miss, asyncio at both ends, "
                                    f"{where[kind]} (p50)", miss, "µs", echo, echo_label,
                                    max_ratio=1.5))
                    rows.append(Row("loop", f"  miss: asyncio vs uvloop, {where[kind]}", miss,
                                    "µs", uv_miss, "the uvloop miss"))
                    rows.append(Row("loop", f"  raw echo: asyncio vs uvloop, {where[kind]}", echo,
                                    "µs", uv_echo, "the uvloop echo"))

        # Hits were measured in each of those runs: the worst p50 is the one judged.
        runs = ", ".join(f"{name} {_p50(lat['hit']):.2f}" for name, lat in hit_runs.items())
        worst = max(hit_runs.values(), key=lambda lat: _p50(lat["hit"]))
        rows.append(Row("hit", "4 KiB read hit, GuestClient.read (p50, the worst of the runs "
                        "above)", _p50(worst["hit"]), "µs", _p50(worst["await_noop"]),
                        "await of a no-op coroutine, same run", max_value=2.0,
                        note=f"p50 per run, µs: {runs}"))
        worst = max(hit_runs.values(), key=lambda lat: lat["read_pages_ns"])
        runs = ", ".join(f"{name} {lat['read_pages_ns'] / 1000:.2f}"
                         for name, lat in hit_runs.items())
        rows.append(Row("hit", "GuestCache.read_pages, 4 KiB (mean, the worst of the runs above)",
                        worst["read_pages_ns"] / 1000, "µs", worst["lru_ns"] / 1000,
                        "OrderedDict get + move_to_end, same run", max_value=2.0,
                        note=f"per run, µs: {runs}"))

        err.print("[dim]bench: first dirtying write[/dim]")
        stalls = bench_stall(workdir, quick)
        raw["stall"] = {str(k): {kk: (_summary(vv) if kk in ("first", "plain") else vv)
                                 for kk, vv in v.items()} for k, v in stalls.items()}
        for count, result in stalls.items():
            rows.append(Row("stall", f"first dirtying write, {count} lease holder"
                            f"{'s' if count > 1 else ''} (p50; the holders are guest connections "
                            f"in ONE helper process: this measures the host)",
                            _p50(result["first"]), "µs",
                            _p50(result["plain"]), "the next write: one round trip, no recall",
                            max_ratio=3 if count == 16 else None,
                            note=f"CPU per write: host {result['host_cpu_us']:.0f} µs, "
                                 f"holders' process {result['holders_cpu_us']:.0f} µs",
                            extra={"host_cpu_us": result["host_cpu_us"],
                                   "holders_cpu_us": result["holders_cpu_us"]}))

        err.print("[dim]bench: daemon throughput[/dim]")
        load = bench_throughput(workdir, quick)
        raw["throughput"] = load
        for count, result in load["daemon"].items():
            ops = result["ops"] / result["seconds"]
            echo_ops = load["echo"][count]["ops"] / load["echo"][count]["seconds"]
            cpu_us = result["server_cpu_s"] / result["ops"] * 1e6 if result["ops"] else 0.0
            rows.append(Row("daemon", f"daemon 4 KiB READs/s, {count} guest connection"
                            f"{'s' if count > 1 else ''}", ops, "ops/s", echo_ops,
                            "raw echo, same load process and count", higher_is_better=True,
                            note=f"host CPU {cpu_us:.0f} µs/op",
                            extra={"host_cpu_us_per_op": cpu_us}))

        err.print("[dim]bench: server-side costs[/dim]")
        rows += bench_server_hints(quick)

        err.print("[dim]bench: memory[/dim]")
        mem = bench_memory(workdir, quick)
        raw["memory"] = mem
        rows.append(Row("memory", "GuestCache bytes per cached MiB (tracemalloc)",
                        mem["traced_per_mib"] / (1 << 20), "MiB", 1.0, "1 MiB of page data",
                        max_ratio=1.10))
        rows.append(Row("memory", "GuestCache RSS growth per cached MiB",
                        mem["rss_per_mib"] / (1 << 20), "MiB", 1.0, "1 MiB of page data",
                        max_ratio=1.10))

        err.print("[dim]bench: cached reads through a mount[/dim]")
        mount = bench_mount_throughput(workdir, quick)
        raw["mount"] = mount
        if mount:
            rows.append(Row("mount", "cached 1 MiB reads through a FUSE mount (MB/s)",
                            mount["mount_MBps"], "MB/s", mount["host_MBps"],
                            "the same file read on the host", higher_is_better=True,
                            note=f"{mount['file_bytes'] >> 20} MiB file, {mount['rounds']} rounds"))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    elapsed = time.monotonic() - started
    loadavg = " ".join(f"{x:.2f}" for x in info["loadavg_at_start"])
    table = Table(title=f"cleanlease bench ({info['nproc']} CPUs, Linux {info['kernel']}, "
                        f"Python {info['python']}, uvloop {info['uvloop']}; {elapsed:.0f} s)",
                  caption=f"load average at start: {loadavg}.  Every value and baseline was "
                          f"measured in this run; ratio = value / baseline.")
    for column in ("metric", "value", "baseline", "ratio", "target", "met?"):
        table.add_column(column, justify="left" if column in ("metric",) else "right")
    group = None
    for row in rows:
        if group is not None and row.group != group:
            table.add_section()
        group = row.group
        met = {True: "[green]yes[/green]", False: "[red]no[/red]", None: "-"}[row.met]
        metric = row.metric + (f" [dim]({row.note})[/dim]" if row.note else "")
        table.add_row(metric, _fmt(row.value, row.unit), f"{_fmt(row.baseline, row.unit)} "
                      f"[dim]{row.baseline_label}[/dim]", f"{row.ratio:.2f}×", row.target, met)
    console.print(table)
    if args.json:
        with open(args.json, "w") as f:
            info["loadavg_at_end"] = os.getloadavg()
            json.dump({"machine": info, "elapsed_s": elapsed, "quick": quick,
                       "command": " ".join(["cleanlease", "bench"] + sys.argv[2:]),
                       "rows": [r.as_dict() for r in rows], "raw": raw}, f, indent=2,
                      default=str)
    return 0


def bench_mount_throughput(workdir: str, quick: bool) -> dict | None:
    """Cached reads through a FUSE mount of the export (the kernel page cache as the
    guest cache, under a lease) against reading the same file on the host directly.
    None, with the reason printed, where /dev/fuse or mount rights are missing."""
    from rich.console import Console

    from guest.fuse_device import unavailable_reason
    from guest.mount import cached_read_throughput

    why = unavailable_reason()
    if why:
        Console(stderr=True).print(f"[yellow]bench: mount throughput skipped: {why}[/yellow]")
        return None
    size = (16 if quick else 64) << 20
    path = os.path.join(workdir, "export", "big.dat")
    with open(path, "wb") as f:
        f.write(os.urandom(size))
    host, address = start_host(workdir, "mount-host", "uvloop")
    mountpoint = os.path.join(workdir, "mnt")
    os.makedirs(mountpoint, exist_ok=True)
    guest = Child([sys.executable, "-m", "workload.cli", "guest", "--connect", address,
                   "--mount", mountpoint], "mount-guest", workdir)
    try:
        guest.expect("READY")
        return cached_read_throughput(os.path.join(mountpoint, "big.dat"), path,
                                      rounds=3 if quick else 5)
    finally:
        guest.stop()
        host.stop()


def _fmt(value: float, unit: str) -> str:
    if unit == "ops/s":
        return f"{value:,.0f} ops/s"
    if unit == "MiB":
        return f"{value:.3f} MiB"
    return f"{value:.2f} {unit}" if value < 100 else f"{value:.0f} {unit}"


# --- helpers (run as separate processes) -------------------------------------------------------


class _EchoServer(asyncio.Protocol):
    """Answers every READ-request-sized chunk with a READ-reply-sized frame."""

    def __init__(self, request_size: int, reply: bytes):
        self.request_size = request_size
        self.reply = reply
        self.pending = 0

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.pending += len(data)
        while self.pending >= self.request_size:
            self.pending -= self.request_size
            self.transport.write(self.reply)


async def _echo_main(args) -> None:
    request, reply = read_frames()
    loop = asyncio.get_running_loop()
    if os.path.exists(args.socket):
        os.unlink(args.socket)
    server = await loop.create_unix_server(lambda: _EchoServer(len(request), reply), args.socket)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    print("READY", flush=True)
    await stop.wait()
    server.close()


async def _holders_main(args) -> None:
    from guest.client import GuestClient

    clients = [await GuestClient.connect(args.connect, name=f"holder{i}")
               for i in range(args.guests)]
    loop = asyncio.get_running_loop()
    print("READY", flush=True)
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            break
        words = line.split()
        if words[0] == "hold":
            count, path = int(words[1]), words[2]

            async def hold(client):
                handle = await client.open(path)
                result = await client.read(handle, 0, PAGE)
                # one more read must be a hit: the lease is really held
                again = await client.read(handle, 0, PAGE)
                return (not result.hit) and again.hit and client.cache.may_serve_data(handle.nodeid)

            held = await asyncio.gather(*(hold(c) for c in clients[:count]))
            print(f"HELD {sum(held)}", flush=True)
        elif words[0] == "acks":
            print(f"ACKS {sum(c.acks_sent for c in clients)}", flush=True)


class _LoadProtocol(asyncio.Protocol):
    """One guest connection of the load helper: a sans-I/O Connection over a raw
    transport, one READ outstanding at a time once set up."""

    def __init__(self, kind: str, reply_size: int):
        from protocol.connection import NEED_DATA, Connection, Role

        self.need_data = NEED_DATA
        self.kind = kind
        self.conn = Connection(Role.GUEST) if kind == "daemon" else None
        self.reply_size = reply_size
        self.got = 0
        self.waiter: asyncio.Future | None = None
        self.running = False
        self.count = 0
        self.next = None  # callable sending the next request

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        if self.conn is None:
            self.got += len(data)
            while self.got >= self.reply_size:
                self.got -= self.reply_size
                self._done(None)
            return
        self.conn.receive_data(data)
        while (event := self.conn.next_event()) is not self.need_data:
            self._done(event)

    def _done(self, event):
        if self.running:
            self.count += 1
            self.next()
        elif self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(event)

    async def call(self, message=None, raw: bytes | None = None):
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(raw if raw is not None else self.conn.send(message))
        return await self.waiter


async def _load_main(args) -> None:
    from protocol import wire
    from protocol.messages import FsRequest, Hello, Lookup, Open, Read

    request, reply = read_frames()
    loop = asyncio.get_running_loop()
    protos = []
    for i in range(args.guests):
        _, proto = await loop.create_unix_connection(lambda: _LoadProtocol(args.kind, len(reply)),
                                                     parse_address(args.target).path)
        if args.kind == "daemon":
            await proto.call(Hello(wire.PROTOCOL_VERSION, wire.SUPPORTED_FEATURES,
                                   wire.DEFAULT_MAX_FRAME, f"load{i}"))
            entry = await proto.call(FsRequest(1, 1, Lookup(BENCH_FILE.encode())))
            opened = await proto.call(FsRequest(2, entry.body.nodeid, Open(os.O_RDONLY)))
            state = {"unique": 3, "nodeid": entry.body.nodeid, "fh": opened.body.fh}

            def send_next(p=proto, s=state):
                unique = s["unique"]
                s["unique"] = unique + 1
                p.transport.write(p.conn.send(FsRequest(unique, s["nodeid"], Read(
                    s["fh"], (unique % 256) * PAGE, PAGE))))
        else:
            await proto.call(raw=request)

            def send_next(p=proto):
                p.transport.write(request)
        proto.next = send_next
        protos.append(proto)
    print("CONNECTED", flush=True)
    await loop.run_in_executor(None, sys.stdin.readline)  # GO
    started = time.perf_counter()
    for proto in protos:
        proto.running = True
        proto.next()
    await asyncio.sleep(args.seconds)
    for proto in protos:
        proto.running = False
    elapsed = time.perf_counter() - started
    print(json.dumps({"ops": sum(p.count for p in protos), "seconds": elapsed,
                      "guests": args.guests}), flush=True)
    await asyncio.sleep(0.05)  # let the last replies drain


def _memory_main(args) -> None:
    import tracemalloc

    from guest.cache import GuestCache
    from protocol.messages import Policy

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    total = args.mib << 20
    chunk = 32 * PAGE  # what one READ of 128 KiB brings
    blob = os.urandom(chunk)
    print("READY", flush=True)

    def fill() -> GuestCache:
        cache = GuestCache(Policy.CLEAN_LEASE, 2 * total)
        for i in range(total // chunk):
            # a fresh bytes object per reply, as a decoded READ reply would be
            data = blob[:PAGE] + blob[PAGE:]
            cache.store_pages(100 + i % 16, (i // 16) * chunk, data, chunk)
        assert cache.cached_bytes == total
        return cache

    gc.collect()
    before = rss()
    cache = fill()
    gc.collect()
    rss_delta = rss() - before
    del cache
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    cache = fill()
    gc.collect()
    traced = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    pages = len(cache._pages)
    print(json.dumps({"mib": args.mib, "pages": pages, "traced_bytes": traced,
                      "traced_per_mib": traced / args.mib, "rss_bytes": rss_delta,
                      "rss_per_mib": rss_delta / args.mib,
                      "overhead_bytes_per_page": (traced - total) / pages}), flush=True)


def helper_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m workload.bench")
    sub = parser.add_subparsers(dest="helper", required=True)
    echo = sub.add_parser("echo")
    echo.add_argument("--socket", required=True)
    echo.add_argument("--loop", default="uvloop")
    holders = sub.add_parser("holders")
    holders.add_argument("--connect", required=True)
    holders.add_argument("--guests", type=int, default=16)
    holders.add_argument("--loop", default="uvloop")
    load = sub.add_parser("load")
    load.add_argument("--target", required=True)
    load.add_argument("--kind", choices=("daemon", "echo"), required=True)
    load.add_argument("--guests", type=int, default=1)
    load.add_argument("--seconds", type=float, default=1.0)
    load.add_argument("--loop", default="uvloop")
    memory = sub.add_parser("memory")
    memory.add_argument("--mib", type=int, default=64)
    args = parser.parse_args(argv)
    if args.helper == "memory":
        _memory_main(args)
        return 0
    main = {"echo": _echo_main, "holders": _holders_main, "load": _load_main}[args.helper]
    _run(main(args), args.loop)
    return 0


if __name__ == "__main__":
    sys.exit(helper_main(sys.argv[1:]))
