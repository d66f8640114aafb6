"""The reply cache on its own: what it keeps, and for how long."""

from __future__ import annotations

from host.replies import ReplyCache

A, B = b"a" * 16, b"b" * 16


async def test_a_recorded_attempt_is_found_until_forgotten():
    cache = ReplyCache(per_client=4)
    first = cache.record(A, 7)
    assert cache.first_attempt(A, 7) is first and cache.answered == 1
    assert cache.first_attempt(B, 7) is None  # keyed by client too
    cache.forget(A, 7)
    assert cache.first_attempt(A, 7) is None and len(cache) == 0


async def test_each_client_keeps_its_last_per_client_requests():
    cache = ReplyCache(per_client=2)
    for unique in (1, 2, 3):
        cache.record(A, unique)
    cache.record(B, 1)
    assert cache.first_attempt(A, 1) is None
    assert cache.first_attempt(A, 2) is not None and cache.first_attempt(A, 3) is not None
    assert cache.first_attempt(B, 1) is not None


async def test_other_clients_churning_push_nobody_out_below_the_total():
    cache = ReplyCache(per_client=4, total=300)
    cache.record(A, 1)
    for n in range(256):  # one request each from 256 other clients
        cache.record(n.to_bytes(16, "little"), 1)
    assert cache.first_attempt(A, 1) is not None
    for n in range(256, 300):
        cache.record(n.to_bytes(16, "little"), 1)
    assert cache.first_attempt(A, 1) is None  # the oldest of all went first
    assert len(cache) == 300
