"""A server whose port another program holds on one of its host's addresses refuses to start, naming it:
gRPC listened on the addresses it could (::1) and only logged the other (127.0.0.1), so the server said it
was up while every site dialing 127.0.0.1 reached the other program."""

from __future__ import annotations

import socket

import pytest

from runtime.errors import ConfigError
from runtime.transport import refuse_taken_addresses


def test_a_port_held_on_one_address_of_the_host_is_refused() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        with pytest.raises(ConfigError) as refused:
            refuse_taken_addresses("localhost", port)
    assert str(refused.value).startswith(f"cannot listen on localhost:{port}: 127.0.0.1 port {port}: ")
    assert "another program holds it" in str(refused.value)
    refuse_taken_addresses("localhost", port)  # once it is let go, the port is free again


def test_an_address_that_is_not_this_machines_is_left_to_grpc() -> None:
    refuse_taken_addresses("192.0.2.1", 8002)  # TEST-NET-1: not local; gRPC's bind says so itself
