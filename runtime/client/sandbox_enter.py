"""Put this process into a worker's cgroups and resource limits, then exec the sandbox (bwrap).

Why a separate process: a cgroup is inherited at fork, so the only race-free way to have every process of a
job inside its cgroups is to join them *before* bwrap forks anything. Python offers no portable way to do
that between fork and exec (preexec_fn is unsafe in a threaded daemon), so the daemon starts this tiny
script (`python -I -S sandbox_enter.py ...`), which joins, sets the fallback rlimits, and execs bwrap with
the same pid, stdin and stdout.

It imports only the standard library and never reads job input.
"""

from __future__ import annotations

import os
import resource
import sys


def main(argv: list[str]) -> int:
    if "--" not in argv:
        print("sandbox_enter: usage: [--procs FILE]... [--rlimit-as BYTES] [--cpus N] [--nproc UID:PIDS] -- "
              "COMMAND...", file=sys.stderr)
        return 2
    split = argv.index("--")
    options, command = argv[:split], argv[split + 1:]
    it = iter(options)
    for flag in it:
        value = next(it)
        try:
            if flag == "--procs":
                with open(value, "w") as f:
                    f.write(str(os.getpid()))
            elif flag == "--rlimit-as":
                resource.setrlimit(resource.RLIMIT_AS, (int(value), int(value)))
            elif flag == "--cpus":  # fallback without a cpu cgroup: pin to as many cores as allowed
                cores = sorted(os.sched_getaffinity(0))[:max(1, int(float(value) + 0.999))]
                os.sched_setaffinity(0, cores)
            elif flag == "--nproc":  # fallback without a pids cgroup: UID may run PIDS more threads than now
                uid, pids = (int(part) for part in value.split(":"))
                limit = threads_of(uid) + pids
                resource.setrlimit(resource.RLIMIT_NPROC, (limit, limit))
            else:
                print(f"sandbox_enter: unknown option {flag}", file=sys.stderr)
                return 2
        except (OSError, ValueError) as e:
            print(f"sandbox_enter: cannot apply {flag} {value}: {e}", file=sys.stderr)
            return 125
    os.execvp(command[0], command)
    return 127  # not reached


def threads_of(uid: int) -> int:
    """Threads whose real user is `uid` (what RLIMIT_NPROC counts), from /proc."""
    count = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
        except OSError:  # it ended meanwhile
            continue
        if int(fields.get("Uid", "-1 ").split()[0]) == uid:
            count += int(fields.get("Threads", "1"))
    return count


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
