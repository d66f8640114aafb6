"""Protocol errors, split the way h11 splits them.

`LocalProtocolError`: this side tried to do something the protocol forbids
(a bug in the caller); nothing was sent or recorded, so the connection is left
as it was and the caller may go on (e.g. answer with an errno instead).
`RemoteProtocolError`: the peer sent something malformed or out of turn; the
connection enters state ERROR and cannot continue; the message names what was
wrong.
"""


class ProtocolError(Exception):
    """Base class; `.args[0]` is a sentence naming the field or rule broken."""


class LocalProtocolError(ProtocolError):
    pass


class RemoteProtocolError(ProtocolError):
    pass
