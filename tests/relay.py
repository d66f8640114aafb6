"""A Unix-socket relay between a guest and the host, for losing a reply on purpose.

`hold_replies` keeps what the host sends from reaching the guest (the guest's
requests still go through); `cut()` then aborts every relayed connection, so
that what was held is lost as a failing network would lose it; `admit` holds
new connections back until it is set again, so that the test decides when a
reconnecting guest gets through.
"""

from __future__ import annotations

import asyncio
import os


class Relay:
    def __init__(self, path: str, host_path: str):
        self.path = path
        self.host_path = host_path
        self.hold_replies = False
        self.admit = asyncio.Event()
        self.admit.set()
        self.connections = 0  # accepted so far
        self._writers: list[asyncio.StreamWriter] = []
        self._relaying: set[asyncio.Future] = set()
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> str:
        self._server = await asyncio.start_unix_server(self._relay, self.path)
        return f"unix:{self.path}"

    def cut(self) -> None:
        for writer in self._writers:
            writer.transport.abort()
        self._writers.clear()

    async def close(self) -> None:
        self.admit.set()
        self.cut()
        await asyncio.gather(*self._relaying)
        self._server.close()
        if os.path.exists(self.path):
            os.unlink(self.path)

    async def _relay(self, guest_r: asyncio.StreamReader, guest_w: asyncio.StreamWriter):
        self.connections += 1
        finished = asyncio.get_running_loop().create_future()
        self._relaying.add(finished)
        try:
            await self._pump_both(guest_r, guest_w)
        finally:
            finished.set_result(None)

    async def _pump_both(self, guest_r, guest_w) -> None:
        self._writers.append(guest_w)
        await self.admit.wait()
        if guest_w.transport.is_closing():
            return
        host_r, host_w = await asyncio.open_unix_connection(self.host_path)
        self._writers.append(host_w)

        async def pump(reader, writer, held):
            try:
                while data := await reader.read(65536):
                    if held():
                        continue  # lost on the way
                    writer.write(data)
            except (ConnectionError, OSError):
                pass
            finally:
                writer.transport.abort()

        await asyncio.gather(pump(guest_r, host_w, lambda: False),
                             pump(host_r, guest_w, lambda: self.hold_replies))
