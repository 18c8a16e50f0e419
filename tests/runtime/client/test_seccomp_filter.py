"""The seccomp program's shape: valid classic BPF (8-byte instructions, every jump inside the program, every
path ending in a return), for the machines it is built for."""

from __future__ import annotations

import struct

import pytest

from runtime.client import seccomp_filter

_RET = 0x06


@pytest.mark.parametrize("machine", ["x86_64", "aarch64"])
def test_every_jump_lands_inside_and_the_program_ends_in_a_return(machine: str) -> None:
    code = seccomp_filter.program(machine)
    assert code is not None and len(code) % 8 == 0
    ops = [struct.unpack("=HBBI", code[i:i + 8]) for i in range(0, len(code), 8)]
    for at, (op, jt, jf, _) in enumerate(ops):
        if op & 0x07 == 0x05:  # a jump
            assert at + 1 + max(jt, jf) < len(ops)
    assert ops[-1][0] == _RET


def test_no_filter_where_none_is_built() -> None:
    assert seccomp_filter.program("riscv64") is None
