"""A mount's witness connection to the host, as its watchdog process speaks it.

The watchdog (guest/fuse_device.py) can abort the guest's FUSE connection and
purge every inode whatever the guest process does.  Over a connection of its
own (docs/protocol.md, section 8a) it tells the host when it has (PURGED), and
the host may ask it to (PURGE) when the guest owes an ACK past the ack
timeout or has lost its connection: the host's wait for that guest then ends
at once instead of at the end of its term (host/witness.py).

Blocking and small on purpose: the watchdog is a plain poll loop, and this
runs the sans-I/O `Connection` over a blocking socket.  It opens the
connection with HELLO (and AUTH, with the guest's token), offering the same
client_id as the guest's session, then sends WITNESS naming the session's
guest id.  Everything here raises OSError (or ProtocolError) on failure; the
watchdog then watches without a witness, as before.
"""

from __future__ import annotations

import errno
import json
import os
import socket

from protocol import auth, wire
from protocol.address import parse_address
from protocol.connection import NEED_DATA, Connection, Role
from protocol.errors import ProtocolError
from protocol.messages import (
    Auth,
    AuthReply,
    ConnectionClosed,
    Hello,
    HelloReply,
    Purge,
    Purged,
    Witness,
    WitnessReply,
)

HANDSHAKE_TIMEOUT_S = 5.0


def write_config(address: str, token: bytes | None, client_id: bytes, guest_id: int,
                 name: str) -> int:
    """A memfd holding what the watchdog needs to connect (the token is not put
    on a command line, where every user could read it); the caller passes it on
    and closes it."""
    fd = os.memfd_create("cleanlease-witness", os.MFD_CLOEXEC)
    os.write(fd, json.dumps({"address": address, "token": token.hex() if token else None,
                             "client_id": client_id.hex(), "guest_id": guest_id,
                             "name": name}).encode())
    return fd


class WitnessLink:
    """The watchdog's end of a bound witness connection."""

    def __init__(self, config_fd: int):
        config = json.loads(os.pread(config_fd, 1 << 16, 0))
        self.guest_id = config["guest_id"]
        token = bytes.fromhex(config["token"]) if config["token"] else None
        where = parse_address(config["address"])
        if where.kind == "unix":
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            target = where.path
        else:
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            target = (where.host, where.port)
        self.conn = Connection(Role.GUEST, max_frame=wire.MIN_MAX_FRAME)
        try:
            self.sock.settimeout(HANDSHAKE_TIMEOUT_S)
            self.sock.connect(target)
            self._send(Hello(wire.PROTOCOL_VERSION, wire.FEATURE_WITNESS
                             | (wire.FEATURE_AUTH if token else 0), wire.MIN_MAX_FRAME,
                             f"{config['name']}/witness"[:255],
                             bytes.fromhex(config["client_id"])))
            hello = self._expect(HelloReply)
            if hello.error:
                raise OSError(-hello.error, f"the host refused HELLO: {os.strerror(-hello.error)}")
            asked = bool(hello.features & wire.FEATURE_AUTH)
            if (refusal := auth.guest_refusal(asked, token, config["address"])) is not None:
                raise OSError(errno.EACCES, refusal)
            if asked:
                nonce = auth.new_nonce()
                self._send(Auth(nonce, auth.guest_proof(token, hello.nonce, nonce)))
                reply = self._expect(AuthReply)
                if reply.error or not auth.proof_matches(
                        auth.host_proof(token, nonce, hello.nonce), reply.proof):
                    raise OSError(errno.EACCES, "the token exchange failed")
            self._send(Witness(self.guest_id))
            bound = self._expect(WitnessReply)
            if bound.error:
                raise OSError(-bound.error, f"the host refused WITNESS: {os.strerror(-bound.error)}")
            self.sock.setblocking(False)
        except BaseException:
            self.sock.close()
            raise

    def fileno(self) -> int:
        return self.sock.fileno()

    def _send(self, message) -> None:
        self.sock.sendall(self.conn.send(message))

    def _expect(self, kind):
        while True:
            event = self.conn.next_event()
            if event is NEED_DATA:
                data = self.sock.recv(4096)
                self.conn.receive_data(data)
                continue
            if isinstance(event, kind):
                return event
            raise ProtocolError(f"expected {kind.__name__}, got {type(event).__name__}")

    def read(self) -> str | None:
        """Read what arrived: "purge" if the host asks for a purge, "eof" if the
        connection is gone (the host ended, or refused us), else None."""
        try:
            data = self.sock.recv(4096)
        except BlockingIOError:
            return None
        except OSError:
            return "eof"
        try:
            self.conn.receive_data(data)
            while (event := self.conn.next_event()) is not NEED_DATA:
                if isinstance(event, ConnectionClosed):
                    return "eof"
                if isinstance(event, Purge):
                    return "purge"
        except ProtocolError:
            return "eof"
        return None

    def purged(self, reason: int, inodes: int) -> bool:
        """Report the purge (best effort: the host falls back to the term)."""
        try:
            self.sock.setblocking(True)
            self.sock.settimeout(1.0)
            self._send(Purged(reason, min(inodes, 0xFFFFFFFF)))
            return True
        except (OSError, ProtocolError):
            return False

    def close(self) -> None:
        self.sock.close()
