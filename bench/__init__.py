"""``make bench``: the event source's performance figures (docs/performance.md).

Run from the repository root: ``python -m bench`` (``--help`` for the sizes). It builds its own
hypervisors (per-user libvirt session daemons with tiny paused domains, tests/lab), drives real
VNC sessions at them and removes everything it made when it ends, also on failure or Ctrl-C.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COLLECTIONS = ROOT / "build" / "collections"
for _path in (COLLECTIONS, ROOT / "tests"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))
