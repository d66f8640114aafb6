"""A well-behaved guest for `make soak`: a separate process, the library client.

    python -m benchmarks.soak_guest ADDRESS NAME INDEX DURATION_S TOKEN_FILE

Reads stamped 4 KiB blocks of the export's `data-*` files at random, with
a one-page cache (so from the daemon, nearly all), and
checks each parses to its own file and block; every tenth operation writes
a stamped block to its own file `w-NAME` and reads it back (it must see its
own write).  Paced at about 200 operations a second.  Prints `ready` once
connected, then, at the end, one JSON line: every read's and write's
(time.monotonic() at start, seconds taken), and the failures.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import sys
import time

from guest.client import GuestClient
from protocol import auth
from workload.stamp import BLOCK_SIZE, Stamp, make_block, parse_block

DATA_FILES = 4
DATA_BLOCKS = 64
OWN_BLOCKS = 16


async def run(address: str, name: str, index: int, duration: float, token: bytes) -> dict:
    # A one-page cache: nearly every read is a round trip to the daemon, which is
    # what an attack could slow (a cache hit measures only this process).
    guest = await GuestClient.connect(address, name=name, token=token, reconnect=True,
                                      reconnect_for=10.0, cache_bytes=4096)
    data = [await guest.open(f"data-{i}") for i in range(DATA_FILES)]
    own = await guest.open(f"w-{name}", os.O_RDWR)
    print("ready", flush=True)
    rng = random.Random(index)
    reads, writes, failures = [], [], []
    seq = 0
    end = time.monotonic() + duration
    while time.monotonic() < end:
        try:
            if seq % 10 == 9:
                block = seq // 10 % OWN_BLOCKS
                stamp = Stamp(1000 + index, block, index + 1, seq + 1, time.monotonic_ns())
                start = time.monotonic()
                await guest.write(own, block * BLOCK_SIZE, make_block(stamp))
                writes.append((start, time.monotonic() - start))
                back = await guest.read(own, block * BLOCK_SIZE, BLOCK_SIZE)
                if parse_block(back.data) != stamp:
                    failures.append(f"read-your-write of block {block}: {parse_block(back.data)}")
            else:
                file_id, block = rng.randrange(DATA_FILES), rng.randrange(DATA_BLOCKS)
                start = time.monotonic()
                got = await guest.read(data[file_id], block * BLOCK_SIZE, BLOCK_SIZE)
                reads.append((start, time.monotonic() - start))
                stamp = parse_block(got.data)
                if (stamp.file_id, stamp.block) != (file_id, block):
                    failures.append(f"data-{file_id} block {block} carries {stamp}")
        except Exception as exc:  # noqa: BLE001 - every failure is reported, none stops us
            failures.append(f"{type(exc).__name__}: {exc}")
            await asyncio.sleep(0.05)
        seq += 1
        await asyncio.sleep(0.005)
    await guest.close()
    return {"name": name, "reads": reads, "writes": writes, "failures": failures[:20],
            "failure_count": len(failures)}


def main() -> int:
    address, name, index, duration, token_file = sys.argv[1:6]
    token = auth.read_token_file(token_file)
    result = asyncio.run(run(address, name, int(index), float(duration), token))
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
