"""Protocol errors, split the way h11 splits them.

`LocalProtocolError`: this side tried to do something the protocol forbids
(a bug in the caller); nothing was sent.  `RemoteProtocolError`: the peer sent
something malformed or out of turn; the connection cannot continue and the
message names what was wrong.  Both leave the connection in state ERROR.
"""


class ProtocolError(Exception):
    """Base class; `.args[0]` is a sentence naming the field or rule broken."""


class LocalProtocolError(ProtocolError):
    pass


class RemoteProtocolError(ProtocolError):
    pass
