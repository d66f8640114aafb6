"""Token authentication (issue 5, item 5): TCP needs a token, the token never
travels, and a peer without it is served nothing.

The pure part (proofs, token files) is tested directly.  The rest runs a real
`cleanlease host` process on a real TCP socket, with scripted guest processes
or raw sockets as peers; a relay in this process records every byte both ways.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import hmac
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading

import pytest
from conftest import ROOT, Child

from guest.client import AuthenticationFailed, GuestClient
from protocol import auth, codec, wire
from protocol.connection import NEED_DATA, Connection, Role
from protocol.messages import (
    Auth,
    AuthReply,
    Detector,
    FsRequest,
    Hello,
    HelloReply,
    Lookup,
    Policy,
)

TOKEN = "0123456789abcdef" * 4


# --- the pure part --------------------------------------------------------------------------


def test_proofs_are_hmac_sha256_over_both_nonces_with_distinct_labels():
    key, hn, gn = b"k" * 16, bytes(range(16)), bytes(range(16, 32))
    assert auth.guest_proof(key, hn, gn) == hmac.new(
        key, b"cleanlease-guest" + hn + gn, hashlib.sha256).digest()
    assert auth.host_proof(key, gn, hn) == hmac.new(
        key, b"cleanlease-host" + gn + hn, hashlib.sha256).digest()
    # A proof from one side is never the other side's, whatever the nonces.
    assert auth.guest_proof(key, hn, gn) != auth.host_proof(key, hn, gn)
    assert auth.guest_proof(key, hn, gn) != auth.guest_proof(b"j" * 16, hn, gn)
    assert auth.guest_proof(key, hn, gn) != auth.guest_proof(key, gn, hn)
    assert auth.new_nonce() != auth.new_nonce() and len(auth.new_nonce()) == 16
    assert len(auth.new_token()) == 64 and auth.new_token() != auth.new_token()


def test_tokens_from_options_files_and_environment(tmp_path):
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    path.chmod(0o600)
    assert auth.token_from(None, str(path), {}) == TOKEN.encode()
    assert auth.token_from(TOKEN, None, {}) == TOKEN.encode()
    assert auth.token_from(None, None, {auth.TOKEN_ENV: TOKEN}) == TOKEN.encode()
    assert auth.token_from(None, None, {}) is None
    assert auth.token_from(None, None, {auth.TOKEN_ENV: ""}) is None
    with pytest.raises(auth.TokenError, match="not both"):
        auth.token_from(TOKEN, str(path), {})
    with pytest.raises(auth.TokenError, match="at least 16"):
        auth.token_from("short", None, {})
    path.chmod(0o640)
    with pytest.raises(auth.TokenError, match="chmod 600"):
        auth.token_from(None, str(path), {})
    with pytest.raises(auth.TokenError, match="cannot read"):
        auth.token_from(None, str(tmp_path / "missing"), {})


# --- the daemon's command line --------------------------------------------------------------


def _cleanlease(*args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "workload.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)


def test_host_refuses_tcp_without_a_token(export):
    env = {k: v for k, v in os.environ.items() if k != auth.TOKEN_ENV}
    done = _cleanlease("host", "--export", str(export), "--listen", "tcp:127.0.0.1:0", env=env)
    assert done.returncode != 0
    assert "needs a token" in done.stderr and "cleanlease token" in done.stderr
    assert "READY" not in done.stdout


def test_host_refuses_a_token_file_others_can_read(export, tmp_path):
    path = tmp_path / "token"
    path.write_text(TOKEN)
    path.chmod(0o644)
    done = _cleanlease("host", "--export", str(export), "--listen", "tcp:127.0.0.1:0",
                       "--token-file", str(path))
    assert done.returncode != 0 and f"chmod 600 {path}" in done.stderr


def test_cleanlease_token_makes_a_usable_private_token_file(tmp_path):
    done = _cleanlease("token")
    assert done.returncode == 0
    token = done.stdout.strip()
    assert len(token) == 64 and auth.check_token(token.encode())
    path = tmp_path / "new.token"
    assert _cleanlease("token", str(path)).returncode == 0
    assert path.stat().st_mode & 0o777 == 0o600
    first = auth.read_token_file(str(path))
    assert len(first) == 64 and first != token.encode()
    again = _cleanlease("token", str(path))
    assert again.returncode != 0 and "never overwritten" in again.stderr
    assert auth.read_token_file(str(path)) == first


# --- a real host on TCP ----------------------------------------------------------------------


@pytest.fixture
def token_file(tmp_path):
    path = tmp_path / "cl.token"
    path.write_text(TOKEN + "\n")
    path.chmod(0o600)
    return path


@pytest.fixture
def tcp_host(export, start_host, token_file, tmp_path):
    """A host on an ephemeral loopback port that requires TOKEN; (Child, host, port, stats)."""
    (export / "data").write_bytes(b"the export's bytes")
    stats = tmp_path / "host-stats.json"
    host, address = start_host(export, "--token-file", str(token_file), "--stats", str(stats),
                               "--handshake-timeout", "1000", address="tcp:127.0.0.1:0")
    _, name, port = address.split(":")
    return host, name, int(port), stats


def _guest(address: str, name: str, token: str | None) -> Child:
    env = {k: v for k, v in os.environ.items() if k != auth.TOKEN_ENV}
    if token is not None:
        env[auth.TOKEN_ENV] = token
    return Child([sys.executable, os.path.join(ROOT, "tests", "scripted_guest.py"), address, name],
                 name, env=env)


def _read_data(guest: Child) -> str:
    guest.do(op="open", path="data")
    return guest.do(op="read", path="data", size=100)["data"]


def _a_guest_with_the_token_reads(address: str) -> None:
    guest = _guest(address, "g", TOKEN)
    try:
        assert "ready" in guest.result(30)
        assert _read_data(guest) == "the export's bytes"
    finally:
        guest.stop()


def test_right_token_is_served_wrong_or_none_is_refused(tcp_host):
    host, name, port, stats = tcp_host
    address = f"tcp:{name}:{port}"
    good = _guest(address, "good", TOKEN)
    try:
        assert "ready" in good.result(30)
        assert _read_data(good) == "the export's bytes"
        wrong = _guest(address, "wrong", "f" * 64)
        assert "refused our token" in wrong.result(30)["refused"]
        nothing = _guest(address, "nothing", None)
        assert "requires a token" in nothing.result(30)["refused"]
        # The daemon keeps serving the guest that has the token.
        assert good.do(op="read", path="data", size=100)["data"] == "the export's bytes"
        assert good.do(op="stats")["sessions"] == 1
    finally:
        good.stop()
    host.stop()
    counters = json.loads(stats.read_text())
    assert counters["auth_failures"] == 1  # the wrong token; no token never sent AUTH
    assert counters["sessions"] == 1


def test_a_guest_authenticates_again_after_the_host_restarts(export, start_host, token_file,
                                                            tcp_host):
    host, name, port, _ = tcp_host
    guest = _guest(f"tcp:{name}:{port}", "g", TOKEN)
    try:
        assert "ready" in guest.result(30)
        assert _read_data(guest) == "the export's bytes"
        host.proc.send_signal(signal.SIGKILL)
        host.proc.wait(10)
        (export / "data").write_bytes(b"written while it was down")
        start_host(export, "--token-file", str(token_file), address=f"tcp:{name}:{port}")
        r = guest.do(op="read", path="data", size=100)
        assert (r["data"], r["hit"]) == ("written while it was down", False)
        assert guest.do(op="stats")["sessions"] == 2
    finally:
        guest.stop()


def test_a_guest_gives_up_at_once_when_a_restarted_host_has_another_token(
        export, start_host, tcp_host, tmp_path):
    host, name, port, _ = tcp_host
    guest = _guest(f"tcp:{name}:{port}", "g", TOKEN)
    try:
        assert "ready" in guest.result(30)
        guest.do(op="open", path="data")
        host.proc.send_signal(signal.SIGKILL)
        host.proc.wait(10)
        other = tmp_path / "other.token"
        other.write_text(auth.new_token())
        other.chmod(0o600)
        start_host(export, "--token-file", str(other), address=f"tcp:{name}:{port}")
        guest.proc.stdin.write(b'{"op": "read", "path": "data", "size": 100}\n')
        guest.proc.stdin.flush()
        # Well before the client's 30 s of reconnection attempts would run out.
        result = guest.result(10)
        assert result["ok"] is False and "refused our token" in result["error"]
    finally:
        guest.stop()


class Relay:
    """A TCP relay between one guest and the host that keeps every byte, both ways."""

    def __init__(self, host: str, port: int):
        self.target = (host, port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.to_host = bytearray()
        self.to_guest = bytearray()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        guest, _ = self.listener.accept()
        host = socket.create_connection(self.target)
        threads = [threading.Thread(target=self._pump, args=(guest, host, self.to_host)),
                   threading.Thread(target=self._pump, args=(host, guest, self.to_guest))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket, record: bytearray) -> None:
        while True:
            try:
                data = src.recv(65536)
            except OSError:
                data = b""
            if not data:
                try:
                    dst.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                return
            record += data
            dst.sendall(data)


def _frames(stream: bytes) -> list[tuple[int, int, bytes]]:
    out, pos = [], 0
    while pos + 12 <= len(stream):
        request, flags, size = struct.unpack_from("<III", stream, pos)
        out.append((request, flags, bytes(stream[pos + 12: pos + 12 + size])))
        pos += 12 + size
    return out


def test_the_token_never_travels_and_a_recorded_auth_cannot_be_replayed(tcp_host):
    _, name, port, _ = tcp_host
    relay = Relay(name, port)
    _a_guest_with_the_token_reads(f"tcp:127.0.0.1:{relay.port}")
    relay.thread.join(10)
    sent, received = bytes(relay.to_host), bytes(relay.to_guest)
    # The exchange happened on this wire (or this test proves nothing) ...
    auth_frames = [f for f in _frames(sent) if f[0] == wire.Request.AUTH]
    assert len(auth_frames) == 1 and len(auth_frames[0][2]) == 48
    assert [f[0] for f in _frames(received)][:2] == [wire.Request.HELLO, wire.Request.AUTH]
    assert b"the export's bytes" in received
    # ... and no form of the token is in it.
    for form in (TOKEN.encode(), bytes.fromhex(TOKEN), TOKEN.encode()[:16]):
        assert form not in sent and form not in received
    # A recorded AUTH frame answers an old challenge: replayed, it is refused.
    conn, sock = _raw_hello(name, port)
    recorded = auth_frames[0][2]
    reply = _raw_exchange(conn, sock, Auth(recorded[:16], recorded[16:]))
    assert reply == AuthReply(-errno.EACCES)
    assert sock.recv(1) == b""  # and the host closed
    sock.close()


def _raw_hello(name: str, port: int) -> tuple[Connection, socket.socket]:
    """A raw TCP peer that has said HELLO, without a token; its HELLO reply checked."""
    sock = socket.create_connection((name, port), timeout=20)
    conn = Connection(Role.GUEST)
    reply = _raw_exchange(conn, sock, Hello(wire.PROTOCOL_VERSION, wire.SUPPORTED_FEATURES,
                                            wire.DEFAULT_MAX_FRAME, "raw"))
    assert reply.error == 0 and reply.features & wire.FEATURE_AUTH
    assert reply.nonce != bytes(16)
    return conn, sock


def _raw_exchange(conn: Connection, sock: socket.socket, message):
    sock.sendall(conn.send(message))
    while (event := conn.next_event()) is NEED_DATA:
        conn.receive_data(sock.recv(65536))
    return event


def test_a_peer_without_the_token_is_served_nothing(tcp_host):
    """An FS request before AUTH (bytes built by hand: our Connection would refuse
    to send it) closes the connection without a reply; so does a wrong proof."""
    _, name, port, _ = tcp_host
    conn, sock = _raw_hello(name, port)
    code, flags, payload = codec.encode_payload(FsRequest(1, 1, Lookup(b"data")))
    sock.sendall(codec.encode_header(code, flags, len(payload)) + payload)
    received = b""
    while chunk := sock.recv(65536):
        received += chunk
    assert received == b""  # nothing at all came back: no reply, no error, no bytes
    sock.close()
    conn, sock = _raw_hello(name, port)
    assert _raw_exchange(conn, sock, Auth(bytes(16), bytes(32))) == AuthReply(-errno.EACCES)
    assert sock.recv(1) == b""
    sock.close()


def test_a_silent_peer_is_closed_after_the_handshake_timeout(tcp_host):
    """Connections that never finish HELLO do not hold sockets (the host was started
    with --handshake-timeout 1000); a guest with the token is served meanwhile."""
    _, name, port, _ = tcp_host
    silent = [socket.create_connection((name, port), timeout=30) for _ in range(3)]
    _, sock = _raw_hello(name, port)
    _a_guest_with_the_token_reads(f"tcp:{name}:{port}")
    for peer in [*silent, sock]:
        assert peer.recv(1) == b""  # closed by the host (the 30 s timeout would raise)
        peer.close()


# --- the guest's side: it trusts no host that cannot prove the token ---------------------------


class _FakeHost(asyncio.Protocol):
    """Asks for AUTH (or not) and answers it with `answer`: a host that cannot prove
    it knows the token, or one that refuses for another reason."""

    def __init__(self, ask: bool, answer: AuthReply):
        self.ask, self.answer = ask, answer
        self.conn = Connection(Role.HOST)

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.conn.receive_data(data)
        while (event := self.conn.next_event()) is not NEED_DATA:
            if isinstance(event, Hello):
                features = wire.SUPPORTED_FEATURES | (wire.FEATURE_AUTH if self.ask else 0)
                self.transport.write(self.conn.send(HelloReply(
                    0, 1, features, Policy.NEVER, Detector.NONE, 1000, 1000, 65536, 1,
                    bytes(16), os.urandom(16))))
            elif isinstance(event, Auth):
                self.transport.write(self.conn.send(self.answer))


@pytest.mark.parametrize("ask,answer,error,why", [
    (True, AuthReply(0, bytes(32)), AuthenticationFailed, "could not prove"),
    (False, None, AuthenticationFailed, "did not ask"),
    (True, AuthReply(-errno.EACCES), AuthenticationFailed, "refused our token"),
    (True, AuthReply(-errno.EUSERS), ConnectionError, "Too many users"),
])
async def test_guest_refuses_a_host_that_cannot_prove_the_token(tmp_path, ask, answer, error,
                                                                why):
    path = str(tmp_path / "fake.sock")
    server = await asyncio.get_running_loop().create_unix_server(
        lambda: _FakeHost(ask, answer), path)
    try:
        with pytest.raises(error, match=why) as info:
            await GuestClient.connect(f"unix:{path}", token=TOKEN.encode(), request_timeout=10,
                                      reconnect=False)
        # Only a token problem is final; a full host may take us later.
        assert isinstance(info.value, AuthenticationFailed) == (error is AuthenticationFailed)
    finally:
        server.close()
