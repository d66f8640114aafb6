"""The frame layer: vhost-user style headers and the non-FUSE payloads.

A frame is a 12-byte little-endian header `request:u32, flags:u32, size:u32`
and `size` bytes of payload.  flags bits 0-1 hold the version (1), 0x4 marks a
reply, 0x8 asks for one.  File-system payloads are FUSE structures
(`protocol/fuse.py`); this module defines the rest once.
"""

from __future__ import annotations

import enum

from construct import (
    Bytes,
    Int8ul,
    Int16ul,
    Int32sl,
    Int32ul,
    Int64ul,
    PascalString,
    Struct,
    Terminated,
)

PROTOCOL_VERSION = 1
FLAG_VERSION_MASK = 0x3
FLAG_REPLY = 0x4
FLAG_NEED_REPLY = 0x8
KNOWN_FLAGS = FLAG_VERSION_MASK | FLAG_REPLY | FLAG_NEED_REPLY

HEADER_SIZE = 12
# Before HELLO has negotiated a maximum, frames larger than this are refused.
DEFAULT_MAX_FRAME = 1 << 20
# Neither side may negotiate more: it bounds what a peer can make us buffer.
ABSOLUTE_MAX_FRAME = 16 << 20
MIN_MAX_FRAME = 8192
# Until the handshake is over (HELLO, and AUTH if asked) no frame needs more
# (the largest, a HELLO with a 255-byte name, is 288 bytes): a peer that has
# proved nothing cannot make us buffer more than this per connection.
HANDSHAKE_MAX_FRAME = 1024

# Feature bits negotiated in HELLO (the intersection of both sides' sets).
FEATURE_LEASES = 1 << 0
FEATURE_HEARTBEAT = 1 << 1
SUPPORTED_FEATURES = FEATURE_LEASES | FEATURE_HEARTBEAT
# Not negotiated but decided by the host: in a HELLO it says "I have a token",
# in the HELLO reply "prove it: AUTH comes next" (protocol/auth.py).
FEATURE_AUTH = 1 << 2
# Offered by a guest whose cache may keep what an *unleased* reply carried
# until it drops it (a mount: the kernel's page cache takes every READ reply).
# The host then counts such a guest as one to recall before the inode's next
# modification, even while the inode is DIRTY.  Negotiated like the others,
# but not in a plain guest's offer.
FEATURE_CACHES_UNLEASED = 1 << 3
# A guest that has a witness (a mount's watchdog, a process of its own that can
# purge the guest's kernel caches whatever the guest process does) opens a second
# connection for it (WITNESS); the host may then end a wait for a silent holder as
# soon as its witness reports the purge (PURGED), instead of at the end of its term.
FEATURE_WITNESS = 1 << 4
NEGOTIABLE_FEATURES = SUPPORTED_FEATURES | FEATURE_CACHES_UNLEASED | FEATURE_WITNESS

CLIENT_ID_SIZE = 16  # a guest's identity across its sessions (HELLO)
NONCE_SIZE = 16  # random bytes each side contributes to an AUTH exchange
PROOF_SIZE = 32  # an HMAC-SHA256


class Request(enum.IntEnum):
    """Frame request codes.  A reply carries the code of its request."""

    HELLO = 1
    FS = 2
    INVALIDATE = 3
    INVAL_ENTRY = 4
    HEARTBEAT = 5
    AUTH = 6
    WITNESS = 7
    PURGE = 8
    PURGED = 9


FrameHeader = Struct("request" / Int32ul, "flags" / Int32ul, "size" / Int32ul)

HelloPayload = Struct(
    "version" / Int32ul,
    "features" / Int64ul,
    "max_frame" / Int32ul,
    # Random, chosen once by a guest and kept across its reconnections, so that
    # the host can carry out a retried request at most once (its reply cache).
    "client_id" / Bytes(CLIENT_ID_SIZE),
    "name" / PascalString(Int8ul, "utf8"),
    Terminated,
)

HelloReplyPayload = Struct(
    "error" / Int32sl,
    "version" / Int32ul,
    "features" / Int64ul,
    "policy" / Int8ul,
    "detector" / Int8ul,
    "granularity" / Int8ul,  # 0 inode, 1 range (was the low byte of a u16 reserved = 0)
    "reserved" / Int8ul,
    "lease_term_ms" / Int32ul,
    "ttl_ms" / Int32ul,
    "max_frame" / Int32ul,
    "guest_id" / Int32ul,
    "boot_id" / Bytes(16),
    "nonce" / Bytes(NONCE_SIZE),  # the host's challenge under FEATURE_AUTH, else zeros
    Terminated,
)  # 68 bytes

# Guest -> host after a HELLO reply with FEATURE_AUTH: the guest's nonce and its proof.
AuthPayload = Struct("nonce" / Bytes(NONCE_SIZE), "proof" / Bytes(PROOF_SIZE), Terminated)
# Host -> guest: 0 and the host's proof, or -EACCES and zeros (then the host closes).
AuthReplyPayload = Struct("error" / Int32sl, "proof" / Bytes(PROOF_SIZE), Terminated)

# Follows the FUSE part of every FS reply: frame size = fuse_out_header.len + 24.
LeaseTrailer = Struct(
    "ino" / Int64ul, "generation" / Int64ul, "term_ms" / Int32ul, "flags" / Int32ul
)
LEASE_TRAILER_SIZE = 24

# Follows the FUSE notification in INVALIDATE and INVAL_ENTRY frames.
NotifyTrailer = Struct("seq" / Int64ul, "generation" / Int64ul, Terminated)
NOTIFY_TRAILER_SIZE = 16

AckPayload = Struct("seq" / Int64ul, Terminated)
HeartbeatPayload = Struct("seq" / Int64ul, Terminated)
# Host -> guest: 0 (the term is renewed from when the HEARTBEAT was sent),
# -EAGAIN (not renewed: an invalidation sent to this guest is not ACKed yet),
# or -EKEYEXPIRED (this session was fenced: drop every cache, say HELLO again).
HeartbeatReplyPayload = Struct("seq" / Int64ul, "error" / Int32sl, "reserved" / Int32ul,
                               Terminated)

# A witness connection (docs/protocol.md, section 8a).  Witness -> host: bind this
# connection to the session `guest_id` (which must have the same client_id).
WitnessPayload = Struct("guest_id" / Int32ul, Terminated)
# Host -> witness: 0, or a negative errno (then the host closes).
WitnessReplyPayload = Struct("error" / Int32sl, Terminated)
# Host -> witness, no reply: the witnessed guest is silent; purge its mount now.
PurgePayload = Struct("reason" / Int32ul, Terminated)
# Witness -> host, no reply: the witnessed mount's connection is aborted and every
# inode it had cached is purged; the guest serves nothing from now on.
PurgedPayload = Struct("reason" / Int32ul, "inodes" / Int32ul, Terminated)
PURGE_SILENT = 1  # it owes an ACK past the ack timeout
PURGE_DEPARTED = 2  # its connection was lost while it held leases
PURGED_ASKED = 1  # the host asked (PURGE)
PURGED_GUEST_DIED = 2
PURGED_TERM_RAN_OUT = 3
PURGED_GUEST_ASKED = 4  # the guest process asked (it lost its connection, or stops)
# What each PURGED reason says, in the host's log and in the mount's last line.
PURGED_REASONS = {
    PURGED_ASKED: "the host fenced it (an ACK owed past the ack timeout, or its connection lost)",
    PURGED_GUEST_DIED: "the guest process died",
    PURGED_TERM_RAN_OUT: "the lease term ran out",
    PURGED_GUEST_ASKED: "the guest asked",
}
