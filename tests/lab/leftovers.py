"""What a killed lab process left on this machine, removed before a run starts.

Every lab name carries its owner's process id (``vgt<pid>…`` users, namespaces and links,
``vgb…<pid>`` attacker hosts, ``vg_…<pid>`` and ``virtguard_b<pid>`` nftables tables). A
suite or bench killed mid-run (a session's end, a CI timeout, a ``kill -9``) leaves them behind,
and the next run meets them: a stale attacker host's ``198.18.0.0/16`` route takes the new
one's traffic, a stale table's blocks refuse its clients. ``remove_dead_owners()`` removes what
belongs to processes that are gone, and never touches what a live process (another suite on this
machine) owns, nor any name without a process id (the product's own tables, such as
``virtguard_console``).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

# A lab name, and the process id in it (names cut at 15 characters keep at least 5 digits).
LAB_NAME = re.compile(r"^(?:vg|virtguard_)[a-z_]*?(\d{2,7})(?:\D|$)")
Log = Callable[[str], object]


def live_owner_ids() -> set[int]:
    """Every live process id, whole and as the ``pid % 100000`` that short names carry."""
    ids: set[int] = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            pid = int(entry)
            ids.update((pid, pid % 100000))
    return ids


def dead_owner(name: str, live: set[int]) -> bool:
    match = LAB_NAME.match(name)
    return match is not None and int(match.group(1)) not in live


def _run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, check=False)


def remove_dead_owners(log: Log | None = None) -> list[str]:
    """Remove every lab leftover whose owner is gone; returns what was removed (``kind name``)."""
    live = live_owner_ids()
    removed: list[str] = []

    def gone(kind: str, name: str) -> None:
        removed.append(f"{kind} {name}")
        if log is not None:
            log(f"removed a dead run's {kind} {name}")

    for name in _run(["ip", "netns", "list"]).stdout.split():
        if dead_owner(name, live) and not name.startswith("("):
            for pid in _run(["ip", "netns", "pids", name]).stdout.split():
                _run(["kill", "-KILL", pid])
            _run(["ip", "netns", "del", name])
            gone("network namespace", name)
    for line in _run(["ip", "-o", "link", "show"]).stdout.splitlines():
        fields = line.split(":", 2)
        if len(fields) > 1:
            name = fields[1].strip().split("@", 1)[0]
            if dead_owner(name, live):
                _run(["ip", "link", "del", name])
                gone("link", name)
    for line in _run(["nft", "list", "tables"]).stdout.splitlines():
        fields = line.split()
        if len(fields) == 3 and fields[0] == "table" and dead_owner(fields[2], live):
            _run(["nft", "delete", "table", fields[1], fields[2]])
            gone("nftables table", f"{fields[1]} {fields[2]}")
    for line in Path("/etc/passwd").read_text(encoding="utf-8").splitlines():
        name = line.split(":", 1)[0]
        if name.startswith("vgt") and dead_owner(name, live):
            _run(["pkill", "-KILL", "-u", name])
            _run(["userdel", "-r", name])
            _run(["userdel", name])
            gone("user", name)
    for path in Path(tempfile.gettempdir()).glob("vgt*"):
        if dead_owner(path.name, live):
            shutil.rmtree(path, ignore_errors=True)
            gone("directory", str(path))
    return removed
