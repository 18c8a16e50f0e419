"""The native sandbox's seccomp filter: the system calls a job's code may not make, for bwrap's --seccomp.

Namespaces leave two ways out that no mount closes:
    - sockets of families the job's network namespace does not cover: AF_VSOCK reaches the hypervisor of a
      virtual machine whatever the namespace, AF_PACKET, AF_BLUETOOTH and the rest are kernel surface a
      training job never needs. socket() and socketpair() take AF_UNIX, AF_INET, AF_INET6 (its own loopback,
      where torchrun ranks meet) and AF_NETLINK (name lookups ask the kernel for addresses) only;
    - user namespaces of its own, where it is root again for much of the kernel: unshare() and clone() with
      CLONE_NEWUSER are refused, and clone3() (whose flags the filter cannot read) answers ENOSYS, so C
      libraries fall back to clone(). bwrap's --disable-userns does the same where bwrap maps the namespace
      itself, and cannot where a root site's daemon does (sandbox_native.py);
    - the kernel's keyrings (add_key, request_key, keyctl answer ENOSYS, as Docker's default profile has
      them): a user's keyring outlives the job, so one job could leave what the next job of the same user
      (every job of a root site runs as sandbox.run_as) reads.
A refused call fails with an errno (EAFNOSUPPORT, EPERM, ENOSYS), as on a kernel without that feature, so
libraries take their fallbacks; calls of another ABI (32-bit, x32) are refused whole.

The program is classic BPF, as bwrap takes it (struct sock_filter[]), built here for x86_64 and aarch64; on
another machine there is no filter and the sandbox is namespaces only.
"""

from __future__ import annotations

import errno
import platform
import socket
import struct

# BPF opcodes (linux/filter.h) and seccomp return values (linux/seccomp.h)
_LD_ABS_W, _JEQ, _JSET, _JGE, _RET = 0x20, 0x15, 0x45, 0x35, 0x06
_ALLOW = 0x7FFF0000
_ERRNO = 0x00050000
# struct seccomp_data: int nr; __u32 arch; __u64 instruction_pointer; __u64 args[6] (the low word first)
_NR, _ARCH, _ARG0 = 0, 4, 16
CLONE_NEWUSER = 0x10000000
X32_SYSCALL_BIT = 0x40000000
ALLOWED_FAMILIES = (socket.AF_UNIX, socket.AF_INET, socket.AF_INET6, socket.AF_NETLINK)

# AUDIT_ARCH_* and the calls' numbers on each machine
_MACHINES = {
    "x86_64": (0xC000003E, {"socket": 41, "socketpair": 53, "clone": 56, "unshare": 272, "clone3": 435,
                            "add_key": 248, "request_key": 249, "keyctl": 250}),
    "aarch64": (0xC00000B7, {"socket": 198, "socketpair": 199, "clone": 220, "unshare": 97, "clone3": 435,
                             "add_key": 217, "request_key": 218, "keyctl": 219}),
}
KEYRING_CALLS = ("add_key", "request_key", "keyctl")


def _op(code: int, k: int, jt: int = 0, jf: int = 0) -> bytes:
    return struct.pack("=HBBI", code, jt, jf, k)


def _deny(err: int) -> bytes:
    return _op(_RET, _ERRNO | err)


def _families_only() -> list[bytes]:
    """socket(family, ...): an allowed family returns ALLOW, any other EAFNOSUPPORT."""
    n = len(ALLOWED_FAMILIES)
    checks = [_op(_JEQ, family, jt=n - i) for i, family in enumerate(ALLOWED_FAMILIES)]
    return [_op(_LD_ABS_W, _ARG0), *checks, _deny(errno.EAFNOSUPPORT), _op(_RET, _ALLOW)]


def _no_new_user_namespace() -> list[bytes]:
    """unshare(flags) / clone(flags, ...): EPERM when the flags ask for a user namespace."""
    return [_op(_LD_ABS_W, _ARG0), _op(_JSET, CLONE_NEWUSER, jt=0, jf=1), _deny(errno.EPERM), _op(_RET, _ALLOW)]


def program(machine: str | None = None) -> bytes | None:
    """The filter for this machine (platform.machine()), or None where no filter is built for it."""
    known = _MACHINES.get(machine or platform.machine())
    if known is None:
        return None
    arch, nr = known
    blocks = {nr["socket"]: _families_only(), nr["socketpair"]: _families_only(),
              nr["unshare"]: _no_new_user_namespace(), nr["clone"]: _no_new_user_namespace(),
              nr["clone3"]: [_deny(errno.ENOSYS)], **{nr[call]: [_deny(errno.ENOSYS)] for call in KEYRING_CALLS}}
    out = [_op(_LD_ABS_W, _ARCH), _op(_JEQ, arch, jt=1), _deny(errno.EPERM), _op(_LD_ABS_W, _NR),
           _op(_JGE, X32_SYSCALL_BIT, jt=0, jf=1), _deny(errno.EPERM)]
    for number, block in blocks.items():
        out += [_op(_JEQ, number, jt=0, jf=len(block)), *block]  # not this call: skip its block
    out.append(_op(_RET, _ALLOW))
    return b"".join(out)
