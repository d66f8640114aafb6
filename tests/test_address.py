"""The one address parser every process uses."""

import pytest

from protocol.address import Address, parse_address


@pytest.mark.parametrize("text, expected", [
    ("unix:/tmp/cl.sock", Address("unix", path="/tmp/cl.sock")),
    ("tcp:10.0.0.1:9000", Address("tcp", host="10.0.0.1", port=9000)),
    ("tcp::9000", Address("tcp", host="127.0.0.1", port=9000)),
])
def test_accepted_forms(text, expected):
    assert parse_address(text) == expected


@pytest.mark.parametrize("text", ["", "unix:", "/tmp/cl.sock", "tcp:host", "tcp:host:port",
                                  "tcp:host:70000", "udp:host:1"])
def test_anything_else_is_refused_naming_the_forms(text):
    with pytest.raises(ValueError, match="use unix:PATH or tcp:HOST:PORT"):
        parse_address(text)
