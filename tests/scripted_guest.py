"""A guest process driven line by line, for integration tests.

Run as `python tests/scripted_guest.py ADDRESS NAME` (with $CLEANLEASE_TOKEN for a host
that asks for one).  Prints {"refused": why} if the host cannot be used; otherwise prints
{"ready": guest_id} once connected; then reads one JSON command per stdin
line and prints one JSON result per line.  Invalidations are printed as they
are applied, with the monotonic time just before the ACK is written:
{"event": "invalidate", "ino": N, "t_ack_ns": T}.
"""

import asyncio
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from guest.client import GuestClient, HostError  # noqa: E402
from protocol.auth import token_from  # noqa: E402


def emit(obj) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


async def main(address: str, name: str) -> None:
    try:
        client = await GuestClient.connect(address, name=name, request_timeout=20,
                                           token=token_from(None, None, os.environ))
    except ConnectionError as exc:
        emit({"refused": str(exc)})
        return

    def on_invalidate(event):
        name = getattr(event, "name", None)
        emit({"event": type(event).__name__.lower(), "ino": getattr(event, "ino", None),
              "name": os.fsdecode(name) if name is not None else None,
              "t_ack_ns": time.monotonic_ns()})

    client.on_invalidate = on_invalidate
    await client.lease_root()
    emit({"ready": client.hello.guest_id, "policy": client.policy.label})
    handles = {}
    loop = asyncio.get_running_loop()
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            break
        cmd = json.loads(line)
        op = cmd["op"]
        try:
            if op == "open":
                flags = {"r": os.O_RDONLY, "w": os.O_WRONLY, "rw": os.O_RDWR}[cmd.get("mode", "r")]
                handles[cmd["path"]] = await client.open(cmd["path"], flags)
                emit({"ok": True})
            elif op == "read":
                r = await client.read(handles[cmd["path"]], cmd.get("offset", 0), cmd["size"])
                emit({"ok": True, "data": r.data.decode("latin-1"), "hit": r.hit})
            elif op == "write":
                w = await client.write(handles[cmd["path"]], cmd.get("offset", 0),
                                       cmd["data"].encode("latin-1"))
                emit({"ok": True, "size": w.size, "first_dirty": w.first_dirty,
                      "t_reply_ns": time.monotonic_ns()})
            elif op == "truncate":
                await client.truncate(handles[cmd["path"]], cmd["size"])
                emit({"ok": True, "t_reply_ns": time.monotonic_ns()})
            elif op == "fsync":
                await client.fsync(handles[cmd["path"]])
                emit({"ok": True})
            elif op == "close":
                await client.close_file(handles.pop(cmd["path"]))
                emit({"ok": True})
            elif op == "stat":
                a = await client.stat(cmd["path"])
                emit({"ok": True, "size": a.size})
            elif op == "stats":
                emit({"ok": True, **client.cache.stats.__dict__, "sessions": client.sessions,
                      "boot_ids": len(set(client.boot_ids))})
            elif op == "quit":
                break
            else:
                emit({"ok": False, "error": f"unknown op {op}"})
        except (HostError, KeyError, ConnectionError, TimeoutError) as exc:
            emit({"ok": False, "error": str(exc)})
    await client.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
