"""Makes the collection importable as ``ansible_collections.virtguard.console`` (through the
link that hacking/bootstrap.sh makes) and the lab harness importable as ``lab``, and moves the
run into a network namespace of its own (``lab/own_network.py``), where the machine's firewall
does not reach the lab.

All asyncio tests share one event loop (pytest.ini), as every source of one ansible-rulebook
run does."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COLLECTIONS = ROOT / "build" / "collections"
for path in (COLLECTIONS, ROOT / "tests"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))


def pytest_configure(config: object) -> None:
    from lab.own_network import enter_own_network

    enter_own_network()
