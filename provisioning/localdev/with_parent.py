"""`python -m provisioning.localdev.with_parent <pid> -- <argv...>`: run argv, dying with <pid>.

`make run`'s supervisor starts each child through this: on Linux the kernel sends the child
SIGTERM when the supervisor dies, however it dies (SIGKILL included), so no web server or fake
is left holding its port. It asks for that (prctl PR_SET_PDEATHSIG), checks the supervisor is
still its parent (it may have died in between), then execs argv in its own place: same pid, same
process group, nothing left in between. Elsewhere it just execs argv (the supervisor's signal
handling still stops the children).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int) -> None:
    """Ask for SIGTERM when our parent dies; exit now if `parent` already is not our parent."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"prctl(PR_SET_PDEATHSIG): {os.strerror(errno)}")
    if os.getppid() != parent:
        raise SystemExit(f"parent {parent} is gone; not starting")


def main(argv: list[str]) -> None:
    if len(argv) < 3 or argv[1] != "--":
        raise SystemExit("usage: python -m provisioning.localdev.with_parent <pid> -- <argv...>")
    die_with_parent(int(argv[0]))
    command = argv[2:]
    os.execvp(command[0], command)  # noqa: S606 - the supervisor's own argv, no shell


if __name__ == "__main__":
    main(sys.argv[1:])
