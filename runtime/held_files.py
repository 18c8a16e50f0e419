"""Whether this process can still read a file: through a descriptor it holds or a map of it.

fedkit writes a model-sized file over an earlier round's, instead of a new one, only once nothing reads
the earlier one (runtime/model_bytes.py on the server, runtime/client/reused_files.py on a site). Linux's
/proc/self tells; elsewhere, or when it cannot be read, the answer is "held", so nothing is written over.
"""

from __future__ import annotations

import os


def held_here(inode: int) -> bool:
    """Whether this process holds open, or maps, a file with `inode`. The inode alone is compared: a map
    under overlayfs may name another device, and a false "held" only costs a new file."""
    try:
        for fd in os.listdir("/proc/self/fd"):
            try:
                if os.stat(f"/proc/self/fd/{fd}").st_ino == inode:
                    return True
            except OSError:  # closed meanwhile (the listing's own descriptor among them)
                continue
        wanted = str(inode)
        with open("/proc/self/maps") as maps:
            return any(len(fields := line.split(maxsplit=5)) >= 5 and fields[4] == wanted for line in maps)
    except OSError:
        return True
