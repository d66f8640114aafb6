"""A host-local writer for `make soak`: a separate process writing through the export's path.

    python -m benchmarks.soak_writer PATH DURATION_S

Every 100 ms writes one stamped block (writer 99) into PATH, a stamped data
file of 64 blocks, then prints one JSON line: the writes done, the errors
(EPERM if the detector could not get a descriptor for the event), and each
write's (time.monotonic() at start, seconds taken): it waits for the recall
of the guests' copies.
"""

from __future__ import annotations

import json
import sys
import time

from workload.stamp import BLOCK_SIZE, Stamp, make_block


def main() -> int:
    path, duration = sys.argv[1], float(sys.argv[2])
    writes, errors, took, seq = 0, [], [], 0
    end = time.monotonic() + duration
    while time.monotonic() < end:
        time.sleep(0.1)
        seq += 1
        block = seq % 64
        start = time.monotonic()
        try:
            with open(path, "r+b") as f:
                f.seek(block * BLOCK_SIZE)
                f.write(make_block(Stamp(0, block, 99, seq, time.monotonic_ns())))
            writes += 1
        except OSError as exc:
            errors.append(str(exc))
        took.append((start, time.monotonic() - start))
    print(json.dumps({"writes": writes, "errors": errors[:5], "error_count": len(errors),
                      "took": took}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
