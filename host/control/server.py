"""The control socket: a local administrator's requests, served by the daemon.

A Unix socket created mode 0600 (only the daemon's user, and root, may
connect; a peer of another uid is also refused by SO_PEERCRED), beside the
guest socket (`--control`, default `<guest socket>.control`).  One sans-I/O
`protocol.control.ControlConnection` per client; each request is dispatched
from one table (`HANDLERS`) and answered once, with an errno and a sentence
on failure.  Nothing a client sends stops the daemon serving anyone: a
malformed frame closes that client only, a failing handler answers EIO.

A hold (FREEZE, SEAL) belongs to the connection that asked for it: when the
connection goes away, for any reason, its holds are lifted.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import stat
import struct

from host.control.holds import HoldKind
from protocol import control as cp
from protocol.errors import ProtocolError

log = logging.getLogger("cleanlease.control")


def control_path_for(listen: str) -> str | None:
    """The default control socket of a daemon listening on `listen`."""
    return listen[5:] + ".control" if listen.startswith("unix:") else None


class _ControlProtocol(asyncio.Protocol):
    def __init__(self, server: "ControlServer") -> None:
        self.server = server
        self.conn = cp.ControlConnection(cp.Role.SERVER)
        self.transport: asyncio.Transport | None = None
        self.tasks: set[asyncio.Task] = set()
        self.closed = False

    def connection_made(self, transport) -> None:
        self.transport = transport
        sock = transport.get_extra_info("socket")
        try:
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            _pid, uid, _gid = struct.unpack("3i", creds)
        except (OSError, AttributeError):
            uid = -1
        if uid not in (0, os.geteuid()):
            log.warning("control: refused a peer of uid %d", uid)
            transport.abort()
            return
        self.server.clients.add(self)

    def data_received(self, data: bytes) -> None:
        self.conn.receive_data(data)
        while not self.closed:
            try:
                request = self.conn.next_event()
            except ProtocolError as exc:
                log.warning("control: closing a client: %s", exc)
                self.transport.abort()
                return
            if request is None:
                return
            task = asyncio.ensure_future(self.server.serve(self, request))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    def eof_received(self):
        return False  # close; connection_lost lifts the holds

    def connection_lost(self, exc) -> None:
        self.closed = True
        self.server.clients.discard(self)
        for task in list(self.tasks):
            task.cancel()
        lifted = self.server.daemon.holds.release_owner(self)
        if lifted:
            log.info("control: a client went away; its holds are lifted (%d writers go)", lifted)

    def send(self, reply: cp.ControlReply) -> None:
        if not self.closed:
            self.transport.write(self.conn.send(reply))


class _Refused(Exception):
    def __init__(self, err: int, message: str) -> None:
        super().__init__(message)
        self.errno = err


class ControlServer:
    """Serves the control socket of `daemon` (a running HostDaemon)."""

    def __init__(self, daemon) -> None:
        self.daemon = daemon
        self.clients: set[_ControlProtocol] = set()
        self._server: asyncio.AbstractServer | None = None
        self.path: str | None = None

    async def start(self, path: str) -> None:
        if os.path.exists(path):
            if not stat.S_ISSOCK(os.lstat(path).st_mode):
                raise SystemExit(f"cleanlease host: --control {path} exists and is not a socket")
            os.unlink(path)
        old = os.umask(0o177)
        try:
            self._server = await asyncio.get_running_loop().create_unix_server(
                lambda: _ControlProtocol(self), path)
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        self.path = path

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for client in list(self.clients):
            client.transport.abort()
            client.connection_lost(None)
        if self.path is not None:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass

    # --- dispatch ---------------------------------------------------------------------

    async def serve(self, client: _ControlProtocol, request) -> None:
        code = cp.CODE_OF[type(request)]
        try:
            body, message = await HANDLERS[code](self, client, request)
            reply = cp.ControlReply(code, request.seq, 0, message, body)
        except _Refused as exc:
            reply = cp.ControlReply(code, request.seq, -exc.errno, str(exc))
        except OSError as exc:
            reply = cp.ControlReply(code, request.seq, -(exc.errno or errno.EIO),
                                    f"{os.fsdecode(request.path)}: {exc.strerror or exc}")
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("control: %s failed", code.name)
            reply = cp.ControlReply(code, request.seq, -errno.EIO,
                                    "the daemon failed on this request (see its log)")
        client.send(reply)

    def _open(self, path: bytes) -> tuple[int, tuple[int, int], os.stat_result]:
        """An O_RDONLY fd of regular file `path` (absolute, inside the export),
        opened under the daemon's mark (its reads raise no event)."""
        export = os.fsencode(self.daemon.fs.root_path)
        if not os.path.isabs(path):
            raise _Refused(errno.EINVAL, f"{os.fsdecode(path)}: give an absolute path "
                                         "(the cleanlease command does)")
        rel = os.path.relpath(path, export)
        if rel == b"." or rel.startswith(b"../") or rel == b"..":
            raise _Refused(errno.EXDEV, f"{os.fsdecode(path)} is not inside the export "
                                        f"{os.fsdecode(export)}")
        root = self.daemon.fs.inodes.host_fd(1)
        fd = os.open(rel, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=root)
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise _Refused(errno.EINVAL, f"{os.fsdecode(path)} is not a regular file")
        return fd, (st.st_dev, st.st_ino), st

    def _detector_control(self):
        return getattr(self.daemon.detector, "control", None)

    def _watch(self, fd: int, key) -> list[str]:
        """Make `key` raise events; the warnings about writers that cannot be held."""
        dc = self._detector_control()
        if dc is None:
            return [f"the {self.daemon.detector.label} detector cannot hold host-local writers: "
                    "only guest modifications wait (run the daemon with --detector fanotify)"]
        dc.watch_file(fd, key)
        return dc.blind_spots(key)

    async def _hold(self, client, request, kind: HoldKind):
        fd, key, _ = self._open(request.path)
        try:
            warnings = self._watch(fd, key)
        finally:
            os.close(fd)
        try:
            drain_ns, drained = await self.daemon.holds.hold(
                key, kind, client, max_hold_s=request.max_hold_ms / 1000.0)
        except ValueError as exc:
            raise _Refused(errno.EALREADY, f"{os.fsdecode(request.path)}: {exc}") from None
        return cp.Held(drain_ns, drained), "; ".join(warnings)

    async def _release(self, client, request, kind: HoldKind):
        fd, key, _ = self._open(request.path)
        os.close(fd)
        holders = self.daemon.holds.holders(key)
        if not any(k is kind for k, _ in holders):
            raise _Refused(errno.EINVAL, f"{os.fsdecode(request.path)} is not {kind.value}d")
        mine = (kind, client) in holders
        released = self.daemon.holds.release(key, kind, client if mine else None)
        note = "" if mine else f"lifted every {kind.value} of it (other clients' too)"
        return cp.Released(released), note

    async def freeze(self, client, request):
        return await self._hold(client, request, HoldKind.FREEZE)

    async def thaw(self, client, request):
        return await self._release(client, request, HoldKind.FREEZE)

    async def seal(self, client, request):
        return await self._hold(client, request, HoldKind.SEAL)

    async def unseal(self, client, request):
        return await self._release(client, request, HoldKind.SEAL)

    async def flush(self, client, request):
        fd, _key, _ = self._open(request.path)
        try:
            await self.daemon.run_blocking(os.fdatasync, fd)
        finally:
            os.close(fd)
        return cp.Flushed(), ""

    async def mark(self, client, request):
        """A mark: a brief freeze, so that every modification in flight is
        recorded before the mark and every later one after it."""
        fd, key, st = self._open(request.path)
        try:
            warnings = self._watch(fd, key)
        finally:
            os.close(fd)
        owner = object()
        holds = self.daemon.holds
        await holds.hold(key, HoldKind.FREEZE, owner)
        try:
            epoch = self.daemon.journal.mark(key)
            for why in warnings:
                self.daemon.journal.taint(key, why)
            dc = self._detector_control()
            if dc is None or not dc.gives_ranges:
                self.daemon.journal.taint(
                    key, f"the {self.daemon.detector.label} detector gives no ranges")
        finally:
            holds.release(key, HoldKind.FREEZE, owner)
        return cp.MarkOut(self.daemon.boot_id, epoch, st.st_size), "; ".join(warnings)

    async def changes(self, client, request):
        fd, key, st = self._open(request.path)
        os.close(fd)
        status, ranges, why = self.daemon.journal.since(key, request.boot_id, request.epoch,
                                                        st.st_size)
        return cp.ChangesOut(status, st.st_size, ranges), why

    async def status(self, client, request):
        fd, key, _ = self._open(request.path)
        os.close(fd)
        freezes, seals, waiting = self.daemon.holds.status(key)
        nodeid = self.daemon.fs.inodes.lookup_key(*key)
        in_flight = len(self.daemon._modifying.get(nodeid, ())) if nodeid is not None else 0
        return cp.StatusOut(freezes, seals, waiting, in_flight, int(key in self.daemon.journal),
                            self.daemon.holds.released), ""


HANDLERS = {
    cp.ControlCode.FREEZE: ControlServer.freeze,
    cp.ControlCode.THAW: ControlServer.thaw,
    cp.ControlCode.FLUSH: ControlServer.flush,
    cp.ControlCode.MARK: ControlServer.mark,
    cp.ControlCode.CHANGES: ControlServer.changes,
    cp.ControlCode.SEAL: ControlServer.seal,
    cp.ControlCode.UNSEAL: ControlServer.unseal,
    cp.ControlCode.STATUS: ControlServer.status,
}
