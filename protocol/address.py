"""Where a host listens and a guest connects: `unix:PATH` or `tcp:HOST:PORT`.

One parser for the daemon, the guests and the tools, so that every one of
them accepts the same forms and refuses the rest with the same message.
"""

from __future__ import annotations

from dataclasses import dataclass

FORMS = "unix:PATH or tcp:HOST:PORT"


@dataclass(frozen=True)
class Address:
    kind: str  # "unix" or "tcp"
    path: str = ""  # unix
    host: str = ""  # tcp; 127.0.0.1 when the text leaves it empty
    port: int = 0  # tcp


def parse_address(text: str) -> Address:
    """Parse `unix:PATH` or `tcp:HOST:PORT` (`tcp::PORT` means loopback).

    Raises ValueError, naming the accepted forms, for anything else.
    """
    kind, _, rest = text.partition(":")
    if kind == "unix" and rest:
        return Address("unix", path=rest)
    if kind == "tcp":
        host, _, port = rest.rpartition(":")
        if port.isdigit() and int(port) < 65536:
            return Address("tcp", host=host or "127.0.0.1", port=int(port))
    raise ValueError(f"address {text!r}: use {FORMS}")
