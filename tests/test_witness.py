"""Witnesses: a silent or departed holder costs a writer its witness's report,
not the rest of its term (host/witness.py, docs/protocol.md section 8a).

The hole they close (issue 11; `cleanlease chaos-mount --seeds 3` broke its
bound by it): a mount that reads an inode while it owes an ACK is answered at
once, and so is recalled a second time once the modification has landed.
If it ACKed the first recall, was renewed, and then lost its connection (or
stopped) before that second recall, the writer waited out its *new* term:
up to two bounds.  With its watchdog as witness the host asks for a purge
when it loses the connection, and the wait ends at the report.

Each test drives raw guests frame by frame against a real `cleanlease host`
process, and their witnesses too: an ordering comes from the stream or from
a frame the host sent (a PURGE says the host waits for that guest now).
"""

from __future__ import annotations

import errno
import os
import time

import pytest

from protocol import wire
from protocol.messages import Invalidate, Read, Write
from raw_guest import RawGuest, RawWitness

ACK_MS, TERM_MS = 200, 8000
TERM = TERM_MS / 1000
MOUNT_LIKE = wire.SUPPORTED_FEATURES | wire.FEATURE_CACHES_UNLEASED | wire.FEATURE_WITNESS


def _host(start_host, export):
    return start_host(export, "--detector", "none", "--ack-timeout", str(ACK_MS),
                      "--lease-term", str(TERM_MS))


async def test_a_mount_renewed_then_cut_before_its_second_recall_costs_its_witness_report(
        export, start_host):
    """The interleaving of chaos-mount seed 3, forced.  Failed before the fix:
    the host knew no WITNESS (a protocol error), and without a witness the
    writer waited for the mount's renewed term (8 s here) after the landing."""
    (export / "f").write_bytes(b"a" * 64)
    _, address = _host(start_host, export)
    silent = await RawGuest.connect(address, "silent")
    await silent.lease("f")
    silent_witness = await RawWitness.of(address, silent)
    mount = await RawGuest.connect(address, "mount", features=MOUNT_LIKE)
    node, fh = await mount.lease("f")
    mount_witness = await RawWitness.of(address, mount)
    writer = await RawGuest.connect(address, "writer")
    w_node, w_fh = await writer.open("f", os.O_RDWR)

    write = writer.send(w_node, Write(w_fh, 0, b"B" * 64))
    first = await mount.next_invalidation()
    assert isinstance(first, Invalidate) and first.ino == node
    # While it owes the ACK: answered at once, with the old bytes, unleased.
    read = await mount.reply(mount.send(node, Read(fh, 0, 64)), timeout=TERM / 4)
    assert read.error == 0 and read.body.data == b"a" * 64 and not read.lease.granted
    mount.ack(first.seq)
    # The silent holder keeps the recall running; the mount is renewed meanwhile.
    assert (await mount.heartbeat()).error == 0
    assert (await silent_witness.next_purge(timeout=TERM / 4)).reason == wire.PURGE_SILENT
    renewed_at = time.monotonic()
    mount.close()  # lost before its second recall: a lost connection is not an ACK
    assert (await mount_witness.next_purge(timeout=TERM / 4)).reason == wire.PURGE_DEPARTED
    silent_witness.purged()  # the first recall ends: the write lands
    # The second recall now waits for the departed mount: the host asks again.
    assert (await mount_witness.next_purge(timeout=TERM / 4)).reason == wire.PURGE_DEPARTED
    assert not writer._replies[write].done(), "the writer was answered before the mount's purge"
    mount_witness.purged()
    reply = await writer.reply(write, timeout=TERM / 4)
    assert reply.error == 0
    assert time.monotonic() - renewed_at < TERM / 2, "the writer waited for the mount's term"
    assert (export / "f").read_bytes() == b"B" * 64


async def test_a_silent_holder_is_purged_by_its_witness_at_the_ack_timeout(export, start_host):
    """A holder that never ACKs: at the ack timeout the host asks its witness,
    and the write lands at the report, not at the end of the holder's term.
    The holder then learns it was fenced.  Failed before the fix (no WITNESS)."""
    (export / "f").write_bytes(b"a" * 64)
    _, address = _host(start_host, export)
    silent = await RawGuest.connect(address, "silent", features=MOUNT_LIKE)
    await silent.lease("f")
    witness = await RawWitness.of(address, silent)
    writer = await RawGuest.connect(address, "writer")
    w_node, w_fh = await writer.open("f", os.O_RDWR)

    started = time.monotonic()
    write = writer.send(w_node, Write(w_fh, 0, b"B" * 64))
    assert (await witness.next_purge(timeout=TERM / 4)).reason == wire.PURGE_SILENT
    assert not writer._replies[write].done(), "the write landed while a holder was live"
    witness.purged()
    assert (await writer.reply(write, timeout=TERM / 4)).error == 0
    assert time.monotonic() - started < TERM / 2
    assert (await silent.heartbeat()).error == -errno.EKEYEXPIRED


async def test_a_witness_is_refused_for_a_guest_it_cannot_name(export, start_host):
    """A WITNESS must carry its guest's client_id: another's is refused, and
    closed; so is a second witness."""
    (export / "f").write_bytes(b"a" * 64)
    _, address = _host(start_host, export)
    guest = await RawGuest.connect(address, "guest", features=MOUNT_LIKE)
    impostor = RawGuest("guest", os.urandom(wire.CLIENT_ID_SIZE))
    impostor.hello = guest.hello  # names the guest's id, but has another client_id
    with pytest.raises(AssertionError, match=f"error=-{errno.EACCES}"):
        await RawWitness.of(address, impostor)
    await RawWitness.of(address, guest)
    with pytest.raises(AssertionError, match=f"error=-{errno.EEXIST}"):
        await RawWitness.of(address, guest)
    # The guest itself is served as before.
    nodeid, fh = await guest.lease("f")
    assert (await guest.read(nodeid, fh)).body.data == b"a" * 64

