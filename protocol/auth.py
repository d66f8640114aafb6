"""Token authentication: a challenge-response in the HELLO exchange.

Both ends know a shared token; it never travels.  The exchange, after the
guest's HELLO (docs/protocol.md, section 3):

    host  -> guest   HELLO reply with FEATURE_AUTH and a 16-byte host nonce hn
    guest -> host    AUTH(gn, HMAC-SHA256(token, "cleanlease-guest" | hn | gn))
    host  -> guest   AUTH reply(0, HMAC-SHA256(token, "cleanlease-host" | gn | hn))
                     or AUTH reply(-EACCES, zeros), then the host closes

Each side proves it knows the token over a nonce the *other* side chose
freshly, so a recorded exchange cannot be replayed; the two proofs carry
different labels, so one side's proof can never be reflected back as the
other's.  The host sends its proof only after it has checked the guest's:
a peer without the token learns nothing computed from it.

What this does not do: encrypt or sign the frames that follow.  Anyone who
can rewrite TCP segments between an authenticated guest and the host can
still inject frames; use a network you trust, or a tunnel (ssh -L,
WireGuard), for more.  An eavesdropper who records one exchange can try to
guess the token offline, which is why tokens must be long and random
(`cleanlease token FILE` makes one) and why short ones are refused.

Pure functions, no I/O except `read_token_file` and `write_token_file`.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import stat

from protocol import wire

MIN_TOKEN_BYTES = 16
TOKEN_ENV = "CLEANLEASE_TOKEN"
_GUEST_LABEL = b"cleanlease-guest"
_HOST_LABEL = b"cleanlease-host"


class TokenError(ValueError):
    """A token that cannot be used; the message says what to do instead."""


def new_token() -> str:
    """A fresh token: 32 random bytes as 64 hex digits."""
    return secrets.token_hex(32)


def new_nonce() -> bytes:
    return os.urandom(wire.NONCE_SIZE)


def check_token(token: bytes) -> bytes:
    """Return `token` if it is long enough to resist guessing.

    Raises TokenError for one shorter than MIN_TOKEN_BYTES bytes."""
    if len(token) < MIN_TOKEN_BYTES:
        raise TokenError(f"the token is {len(token)} bytes; use at least {MIN_TOKEN_BYTES} "
                         f"random bytes (`cleanlease token FILE` makes one)")
    return token


def guest_proof(token: bytes, host_nonce: bytes, guest_nonce: bytes) -> bytes:
    return hmac.new(token, _GUEST_LABEL + host_nonce + guest_nonce, hashlib.sha256).digest()


def host_proof(token: bytes, guest_nonce: bytes, host_nonce: bytes) -> bytes:
    return hmac.new(token, _HOST_LABEL + guest_nonce + host_nonce, hashlib.sha256).digest()


def proof_matches(expected: bytes, received: bytes) -> bool:
    """Compare in constant time, so that timing does not tell how much of a guess was right."""
    return hmac.compare_digest(expected, received)


def guest_refusal(asked: bool, token: bytes | None, where: str) -> str | None:
    """Why a guest must not go on with the host at `where`, whose HELLO reply
    did or did not ask for a token (`asked`), or None.  A guest with a token
    refuses a host that does not ask for it: any host could answer so."""
    if asked and token is None:
        return (f"the host at {where} requires a token: give this guest the host's "
                f"(--token-file FILE, or ${TOKEN_ENV})")
    if not asked and token is not None:
        return (f"the host at {where} did not ask for a token, but we have one: "
                f"refusing it, since any host could answer like that (give the host the "
                f"same token, or give this guest none)")
    return None


def read_token_file(path: str) -> bytes:
    """The token in the file at `path`, without surrounding whitespace.

    Raises TokenError if the file cannot be read, is readable by group or
    others (as ssh refuses such a key), or holds too short a token."""
    try:
        with open(path, "rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            token = f.read(4096).strip()
    except OSError as exc:
        raise TokenError(f"cannot read the token file {path}: {exc.strerror}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise TokenError(f"the token file {path} is readable by others (mode {mode & 0o777:03o}); "
                         f"chmod 600 {path}")
    return check_token(token)


def write_token_file(path: str) -> None:
    """Create `path`, mode 600, holding a new token.

    Raises OSError (FileExistsError for an existing file: a token file is
    never overwritten, since guests may hold the old token)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(new_token() + "\n")


def token_from(value: str | None, path: str | None, environ) -> bytes | None:
    """The token a command should use: `--token`, else `--token-file`, else
    $CLEANLEASE_TOKEN, else None (no authentication).

    Raises TokenError for both options at once or for an unusable token."""
    if value is not None and path is not None:
        raise TokenError("give --token or --token-file, not both")
    if path is not None:
        return read_token_file(path)
    if value is None:
        value = environ.get(TOKEN_ENV) or None
    return None if value is None else check_token(value.strip().encode())
