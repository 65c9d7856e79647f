"""A reader that locks the audit file: another process opens it read-only and holds a real
``flock`` on it (``LOCK_SH``, as a log reader may; read access is all it takes) until released.
What an attacker with read access to the audit file can do to its writers."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from pathlib import Path

# The holder: open read-only, lock, say so, hold until its stdin closes (or it is killed).
_HOLDER = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
fcntl.flock(fd, fcntl.LOCK_SH if sys.argv[2] == "shared" else fcntl.LOCK_EX)
print("locked", flush=True)
sys.stdin.read()
"""


class HeldLock:
    """``HeldLock(path).hold()`` returns once the other process holds the lock; ``release()``
    (or leaving the ``with`` block) ends it. ``shared=False`` takes an exclusive lock."""

    def __init__(self, path: Path, shared: bool = True) -> None:
        self.path = Path(path)
        self.shared = shared
        self.proc: subprocess.Popen[str] | None = None
        self.pid = 0  # the holder's, once held (kept after release, for messages that name it)

    def hold(self) -> HeldLock:
        self.proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(self.path),
                                      "shared" if self.shared else "exclusive"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.pid = self.proc.pid
        assert self.proc.stdout is not None
        if self.proc.stdout.readline() != "locked\n":
            self.release()
            raise RuntimeError(f"the lock holder could not lock {self.path}")
        return self

    def release(self) -> None:
        """Ends the holder (its lock goes with it) and waits for it."""
        if self.proc is None:
            return
        proc, self.proc = self.proc, None
        try:
            proc.communicate("", timeout=30)  # closes its stdin: it exits
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()

    def __enter__(self) -> HeldLock:
        return self.hold()

    def __exit__(self, *exc_info: object) -> None:
        self.release()


def exclusive_lock_free(path: Path) -> bool:
    """Whether a writer could take the file's exclusive lock now (tried without waiting, on an
    open file description of its own, and given back at once)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)  # closing gives the lock back
    return True
