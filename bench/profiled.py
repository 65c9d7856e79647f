"""``python -m bench.profiled OUT SCRIPT ARGS...``: run SCRIPT under cProfile and write the
profile to OUT whenever the process gets SIGUSR1 (ansible-rulebook does not return from its
main on SIGINT, so a profile written at exit would never appear)."""

from __future__ import annotations

import cProfile
import runpy
import signal
import sys
from types import FrameType


def main() -> None:
    out, script, *args = sys.argv[1:]
    profile = cProfile.Profile()

    def dump(_signum: int, _frame: FrameType | None) -> None:
        profile.disable()
        profile.dump_stats(out)
        profile.enable()

    signal.signal(signal.SIGUSR1, dump)
    sys.argv = [script, *args]
    profile.enable()
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
