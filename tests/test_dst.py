"""The deterministic simulator (workload/dst/): its loop, its network, replays,
1,000 seeds of the real code, a mutant it must catch, and the client defects
it found."""

from __future__ import annotations

import asyncio
import errno
import os
import subprocess
import sys

import pytest

from guest.client import GuestClient, HostError, SessionLost
from protocol.messages import Getattr
from tests.conftest import ROOT
from workload.dst.loop import Node, VirtualLoop
from workload.dst.mutants import hunt
from workload.dst.run import run_seed, run_seeds

# `make test`'s share: 1,000 schedules of this many guest operations (a few
# tens of seconds on 2 cores; `cleanlease dst` runs as many as asked).
SEEDS, STEPS = 1000, 40


# --- the loop ----------------------------------------------------------------------

def test_virtual_time_jumps_to_the_next_timer():
    loop = VirtualLoop()

    async def main():
        await asyncio.sleep(3600)
        return loop.time()

    assert loop.run_until(main()) == pytest.approx(3600)
    assert loop.now == pytest.approx(3600)
    loop.close()


def test_each_node_has_its_own_clock_rate():
    loop = VirtualLoop()
    fast = Node(loop, "fast", rate=1.01)
    woke = []

    async def sleeper():
        await asyncio.sleep(1.01)  # one global second on a clock 1% fast
        woke.append((loop.now, fast.clock()))

    loop.run_until(fast.spawn(sleeper()))
    assert woke[0][0] == pytest.approx(1.0)
    assert woke[0][1] == pytest.approx(1.01)
    loop.close()


def test_a_paused_node_runs_nothing_until_resumed_and_a_stopped_clock_delays_its_timers():
    loop = VirtualLoop()
    node = Node(loop, "guest")
    runs = []

    async def ticker():
        for _ in range(3):
            await asyncio.sleep(1.0)
            runs.append((round(loop.now, 6), round(node.clock(), 6)))

    async def driver():
        task = node.spawn(ticker())
        await asyncio.sleep(0.5)
        node.pause(clock_stops=True)
        await asyncio.sleep(2.0)  # nothing of the node runs meanwhile
        assert runs == []
        node.resume()
        await task

    loop.run_until(driver())
    # Its clock stood still for 2 s: each tick is 1 s of its own time, 2 s later globally.
    assert runs == [(3.0, 1.0), (4.0, 2.0), (5.0, 3.0)]
    loop.close()


def test_the_loop_runs_no_threads():
    loop = VirtualLoop()

    async def main():
        await asyncio.to_thread(print)

    with pytest.raises(RuntimeError, match="no threads"):
        loop.run_until(main())
    loop.close()


# --- replays and seeds --------------------------------------------------------------

def test_a_seed_replays_bit_for_bit_in_another_process():
    """Same seed, other process, other hash seed: the same trace."""
    script = ("import sys; from workload.dst.run import run_seed; o = run_seed(7, 40); "
              "print(o.digest, len(o.events))")
    digests = set()
    for hash_seed in ("1", "2"):
        out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                             text=True, env={**os.environ, "PYTHONHASHSEED": hash_seed},
                             check=True)
        digests.add(out.stdout.strip())
    first = run_seed(7, 40)
    assert digests == {f"{first.digest} {len(first.events)}"}
    assert run_seed(8, 40).digest != first.digest


@pytest.mark.timeout(300)  # about a minute on 2 idle cores; more when others share them
def test_a_thousand_seeds_of_the_real_code_find_nothing():
    done, failures = run_seeds(SEEDS, steps=STEPS, seed_base=0, jobs=2, stop_at_first=False)
    assert done == SEEDS
    assert failures == [], "\n".join(f"seed {s}: {v} (replay: cleanlease dst --seed {s} "
                                     f"--steps {STEPS})" for s, v, _ in failures)


def test_every_mutant_still_applies_to_the_code():
    """A refactor that moves the lines a mutant removes would leave `make mutants`
    reporting "patch does not apply" (two did, after host/server.py was split)."""
    import shutil

    from workload.dst import mutants

    if shutil.which("patch") is None:
        pytest.skip("no patch(1) here")
    for name in mutants.mutant_names():
        done = subprocess.run(["patch", "--dry-run", "-s", "-p1", "-d", mutants.ROOT, "-i",
                               os.path.join(mutants.MUTANTS, f"{name}.patch")],
                              capture_output=True, text=True)
        assert done.returncode == 0, f"mutant {name} no longer applies: {done.stdout}{done.stderr}"


def test_the_simulator_catches_a_grant_during_a_recall():
    """A mutant (tests/mutants/) must make some early seed fail; make mutants runs them all."""
    result = hunt("grant-during-recall", max_seeds=200, steps=STEPS, jobs=1)
    assert result.get("seed") is not None, result
    assert result["invariant"] == "stale read", result


# --- defects the simulator found -------------------------------------------------------

async def _connected_pair(tmp_path, clients: int = 1):
    """A real daemon and real clients over the simulator's network, on the running loop."""
    from host.server import HostDaemon, _GuestProtocol
    from host.session import HostConfig
    from workload.dst.net import Network
    import random

    loop = asyncio.get_running_loop()
    export = tmp_path / "export"
    export.mkdir()
    async def inline(call):  # the simulator runs no threads
        return call()

    daemon = HostDaemon(HostConfig(str(export)), boot_id=bytes(16), run_blocking=inline)
    net = Network(loop, random.Random(1))
    host, guest = Node(loop, "host"), Node(loop, "guest")
    net.listener = lambda: (_GuestProtocol(daemon), host)
    made = []
    for i in range(clients):
        node = guest if i == 0 else Node(loop, f"guest{i}")
        made.append(await GuestClient.connect(
            "unix:/simulated", dial=lambda f, node=node: net.dial(node, f), clock=node.clock,
            heartbeat=False, reconnect=False, client_id=bytes([i + 1]) * 16))
    return (daemon, made[0]) if clients == 1 else (daemon, *made)


def test_a_request_on_a_closing_connection_leaves_no_orphan_future(tmp_path):
    """Found by dst (seeds 82, 86, 104 ... of the first runs): a request sent
    once the client had closed its transport (as it does when it learns it was
    fenced) raised SessionLost but left its future in the session's pending
    table; when the connection was then lost, that future was failed with
    nobody to retrieve it (asyncio: 'Future exception was never retrieved')."""
    loop = VirtualLoop()

    async def main():
        daemon, client = await _connected_pair(tmp_path)
        session = client.session
        session.transport.close()
        with pytest.raises(SessionLost):
            await client.request(1, Getattr())
        assert session.pending == {}
        daemon.fs.close()

    loop.run_until(main())
    loop.close()


def test_retrying_after_repeated_fencing_raises_instead_of_returning_none():
    """Found by dst (a mutant that fenced guests early made a guest's write
    return None): `_retrying` fell out of its loop after its last attempt was
    fenced and returned None, so `write` answered None instead of a result or
    an error."""
    loop = VirtualLoop()

    async def main():
        client = GuestClient("unix:/nowhere", name="g", cache_bytes=1 << 20, request_timeout=1.0,
                             heartbeat=False, reconnect=True, reconnect_for=1.0)
        client._connected.set()

        class FakeSession:
            closed = loop.create_future()
        FakeSession.closed.set_result(None)
        client.session = FakeSession()

        async def fenced():
            raise HostError(errno.EKEYEXPIRED, "fenced")
        with pytest.raises(SessionLost, match="fenced"):
            await client._retrying(fenced)

    loop.run_until(main())
    loop.close()


def test_a_writers_own_read_granted_before_its_write_is_not_cached(tmp_path):
    """Found by dst (seed 1880 of the first 2,000, at 3b7e0d1): one thread of a
    guest READs a file (the host grants a lease, generation 0), another WRITEs
    it; the host recalls every holder but the writer, drops the writer as a
    holder, and lands the write.  The READ reply reached the guest first and
    was cached under its grant; until the WRITE reply's trailer was applied,
    the guest served the old bytes, and since the host no longer counted it
    as a holder, no later modification (a host-local write while the guest's
    WRITE reply was held up) recalled them.  The guest is paused from the
    moment the READ completes, which holds the WRITE reply back."""
    loop = VirtualLoop()

    async def main():
        daemon, client, other = await _connected_pair(tmp_path, clients=2)
        (tmp_path / "export" / "f").write_bytes(b"o" * 4096)
        guest_node = client.session.transport.node
        # Another guest holds a lease: the write waits for its ACK, so its
        # reply comes a round trip after the READ's.
        other_handle = await other.open("f")
        await other.read(other_handle, 0, 4096)
        handle = await guest_node.spawn(client.open("f", os.O_RDWR))
        read = guest_node.spawn(client.read(handle, 0, 4096))
        write = guest_node.spawn(client.write(handle, 0, b"n" * 4096))
        read.add_done_callback(lambda _: guest_node.pause())
        await asyncio.wait([read])
        assert read.result().data == b"o" * 4096  # served before the write landed
        assert not write.done()
        # The write has landed on the host; its reply is held by the pause.
        while (tmp_path / "export" / "f").read_bytes() != b"n" * 4096:
            await asyncio.sleep(0.0001)
        cache = client.cache
        assert not (cache.may_serve_data(handle.nodeid)
                    and cache.read_pages(handle.nodeid, 0, 4096) == b"o" * 4096), \
            "the writer caches the bytes its own write replaced, and nothing will recall them"
        guest_node.resume()
        await write
        daemon.fs.close()

    loop.run_until(main())
    loop.close()
