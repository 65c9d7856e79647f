"""The source's documented hand run (docs/payload.md) from a clone: the plugin finds the
collection's code without PYTHONPATH, starts, and stops on Ctrl-C. With a real hypervisor:
tests/integration/test_source_hand_run.py."""

from __future__ import annotations

import os

from lab.source_runner import HandRun


def test_the_hand_run_starts_from_the_clone_and_stops_on_ctrl_c():
    unreachable = f"qemu+unix:///session?socket=/nonexistent/vgt{os.getpid()}-hand-run/libvirt-sock"
    run = HandRun(unreachable)
    try:
        line = run.wait_for_log("cannot connect", timeout=60)
    finally:
        code = run.stop()
    assert unreachable in line  # the source itself runs: its retry of the unreachable URI
    assert not any("Traceback" in line for line in run.log), "".join(run.log)
    assert code == 0
