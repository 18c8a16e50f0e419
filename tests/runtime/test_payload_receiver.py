"""runtime/transport.py PayloadReceiver: memory follows the bytes that arrived, not the size a peer
declared, and the declared size, the limit and the hash are still enforced."""

from __future__ import annotations

import hashlib
import tracemalloc

import pytest

from runtime.errors import UpdateRejected
from runtime.transport import PayloadReceiver

GIB = 1 << 30


def test_a_declared_size_costs_nothing_until_the_data_arrives() -> None:
    tracemalloc.start()
    try:
        receiver = PayloadReceiver(GIB, GIB, "")
        receiver.add(b"x" * 1024)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert peak < 16 << 20, f"{peak} bytes allocated for 1 KiB received"


def test_a_grown_buffer_holds_exactly_what_arrived_and_checks_its_hash() -> None:
    data = bytes(range(256)) * 5000
    receiver = PayloadReceiver(len(data), len(data), hashlib.sha256(data).hexdigest())
    for start in range(0, len(data), 4096):
        receiver.add(data[start:start + 4096])

    assert bytes(receiver.finish()) == data


def test_a_reused_buffer_of_the_right_size_is_filled_in_place() -> None:
    old = bytearray(1000)
    data = b"y" * 1000
    receiver = PayloadReceiver(1000, 2000, hashlib.sha256(data).hexdigest(), buffer=old)
    receiver.add(data)

    assert receiver.finish() is old and bytes(old) == data


def test_the_declared_size_and_the_limit_still_hold() -> None:
    with pytest.raises(UpdateRejected, match="exceeds the limit"):
        PayloadReceiver(2001, 2000)
    receiver = PayloadReceiver(10, 100)
    with pytest.raises(UpdateRejected, match="longer than the declared"):
        receiver.add(b"z" * 11)
    short = PayloadReceiver(10, 100)
    short.add(b"z" * 5)
    with pytest.raises(UpdateRejected, match="ended after 5 of 10"):
        short.finish(hashlib.sha256(b"z" * 5).hexdigest())
