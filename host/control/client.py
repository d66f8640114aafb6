"""A blocking client of the control socket (for the `cleanlease` commands and tests).

No event loop: one request at a time over a plain socket, the framing done
by the sans-I/O `protocol.control.ControlConnection`.  A hold (freeze,
seal) lasts as long as this client's connection: close the client, or let
the process die, and it is lifted.
"""

from __future__ import annotations

import os
import socket

from protocol import control as cp

ENV = "CLEANLEASE_CONTROL"


class ControlError(Exception):
    """The daemon refused a request: `errno` (positive) and its sentence."""

    def __init__(self, err: int, message: str) -> None:
        super().__init__(message or os.strerror(err))
        self.errno = err


def format_mark(boot_id: bytes, epoch: int) -> str:
    return f"{boot_id.hex()}:{epoch}"


def parse_mark(text: str) -> tuple[bytes, int]:
    """(boot_id, epoch) of a mark printed by `cleanlease mark`; ValueError if it is not one."""
    boot, sep, epoch = text.strip().partition(":")
    try:
        boot_id = bytes.fromhex(boot)
        value = int(epoch)
    except ValueError:
        boot_id, value = b"", -1
    if not sep or len(boot_id) != cp.BOOT_ID_SIZE or value < 0:
        raise ValueError(f"{text!r} is not a mark (32 hex digits, ':', a number: what "
                         "`cleanlease mark` printed)")
    return boot_id, value


class ControlClient:
    """`ControlClient(path)`: connected to the control socket at `path`.

    Each method sends one request and returns its reply's body; raises
    ControlError when the daemon refuses it, ConnectionError when the
    daemon went away."""

    def __init__(self, path: str, *, timeout: float | None = None) -> None:
        self.path = path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        try:
            self._sock.connect(path)
        except OSError as exc:
            self._sock.close()
            raise ConnectionError(f"cannot connect to the control socket {path}: "
                                  f"{exc.strerror or exc} (is the daemon running? its socket is "
                                  "`--control`, by default the guest socket's path + "
                                  "'.control')") from None
        self._conn = cp.ControlConnection(cp.Role.CLIENT)
        self._seq = 0
        self.last_message = ""

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> "ControlClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def fileno(self) -> int:
        return self._sock.fileno()

    def request(self, message):
        self._seq += 1
        kind = type(message)
        message = kind(**{**message.__dict__, "seq": self._seq})
        self._sock.sendall(self._conn.send(message))
        while True:
            reply = self._conn.next_event()
            if reply is not None:
                break
            data = self._sock.recv(1 << 16)
            if not data:
                raise ConnectionError("the daemon closed the control connection")
            self._conn.receive_data(data)
        self.last_message = reply.message
        if reply.error:
            raise ControlError(-reply.error, reply.message)
        return reply.body

    @staticmethod
    def _path(path: str) -> bytes:
        return os.fsencode(os.path.realpath(path))

    def freeze(self, path: str, max_hold_s: float = 0.0) -> cp.Held:
        return self.request(cp.Freeze(self._path(path), int(max_hold_s * 1000)))

    def thaw(self, path: str) -> cp.Released:
        return self.request(cp.Thaw(self._path(path)))

    def seal(self, path: str, max_hold_s: float = 0.0) -> cp.Held:
        return self.request(cp.Seal(self._path(path), int(max_hold_s * 1000)))

    def unseal(self, path: str) -> cp.Released:
        return self.request(cp.Unseal(self._path(path)))

    def flush(self, path: str) -> cp.Flushed:
        return self.request(cp.Flush(self._path(path)))

    def mark(self, path: str) -> cp.MarkOut:
        return self.request(cp.Mark(self._path(path)))

    def changes(self, path: str, mark: str | tuple[bytes, int]) -> cp.ChangesOut:
        boot_id, epoch = parse_mark(mark) if isinstance(mark, str) else mark
        return self.request(cp.Changes(self._path(path), boot_id, epoch))

    def status(self, path: str) -> cp.StatusOut:
        return self.request(cp.Status(self._path(path)))


def control_path(given: str | None) -> str:
    """The control socket to use: `given`, else $CLEANLEASE_CONTROL; SystemExit if neither."""
    path = given or os.environ.get(ENV)
    if not path:
        raise SystemExit("cleanlease: which daemon? pass --control SOCKET (the daemon's "
                         "control socket: its guest socket's path + '.control' by default) or "
                         f"set ${ENV}")
    return path


__all__ = ["ControlClient", "ControlError", "control_path", "format_mark", "parse_mark"]
