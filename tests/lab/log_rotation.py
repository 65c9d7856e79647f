"""Real logrotate against the audit writer: the classify filter's AuditWriter appends numbered
records at a steady rate while ``logrotate -f`` rotates the file with a given configuration,
again and again; then every record is looked for in the live file and in every rotated one
(``.gz`` ones decompressed). What is not found anywhere was lost to the rotation.

Used by tests/integration/test_audit_rotation.py and ``python -m bench.audit_rotation``."""

from __future__ import annotations

import dataclasses
import gzip
import json
import shutil
import subprocess
import threading
import time
from pathlib import Path

from ansible_collections.virtguard.console.plugins.module_utils.audit_log import AuditLog, AuditWriter

# logrotate settings under test, as written in a logrotate configuration's block.
CONFIGURATIONS = {
    "create, compress (no delaycompress)": ["create 0640", "compress"],
    "create, compress, delaycompress": ["create 0640", "compress", "delaycompress"],
    "create, nocompress": ["create 0640", "nocompress"],
    "copytruncate, nocompress": ["copytruncate", "nocompress"],
}


@dataclasses.dataclass
class RotationResult:
    settings: list[str]
    rotations: int
    submitted: int
    written: int  # what the writer counted as in the file (the file it had open)
    found: int  # distinct records found in the live file and the rotated ones
    broken_lines: int  # lines that are not a whole record (a truncation in the middle of a write)

    @property
    def lost(self) -> int:
        return self.submitted - self.found


def logrotate() -> str:
    found = shutil.which("logrotate") or shutil.which("logrotate", path="/usr/sbin:/sbin")
    if found is None:
        raise FileNotFoundError("logrotate is not installed (Debian: apt-get install logrotate)")
    return found


def rotate_while_writing(directory: Path, settings: list[str], rotations: int = 10, period: float = 1.0,
                         rate: float = 500.0) -> RotationResult:
    """Writes ``{"n": i}`` records at ``rate`` a second through an AuditWriter to
    DIRECTORY/audit.jsonl while logrotate rotates it ``rotations`` times, ``period`` seconds
    apart; then counts what is found where."""
    path = directory / "audit.jsonl"
    config = directory / "logrotate.conf"
    config.write_text(f"{path} {{\n    rotate 10000\n    missingok\n" + "".join(f"    {s}\n" for s in settings) + "}\n")
    writer = AuditWriter(AuditLog(str(path), fsync="never"))
    stop = threading.Event()
    submitted = 0

    def submit() -> None:
        nonlocal submitted
        started = time.monotonic()
        while not stop.is_set():
            due = int((time.monotonic() - started) * rate)
            while submitted < due:
                writer.submit({"n": submitted})
                submitted += 1
            time.sleep(0.001)

    submitter = threading.Thread(target=submit, daemon=True)
    submitter.start()
    try:
        for _rotation in range(rotations):
            time.sleep(period)
            subprocess.run([logrotate(), "-f", "-s", str(directory / "logrotate.state"), str(config)],
                           check=True, capture_output=True, text=True)
        time.sleep(period)  # the writer follows the last rotation (it looks once a second)
    finally:
        stop.set()
        submitter.join()
        writer.close()
    found: set[int] = set()
    broken = 0
    for file in directory.glob("audit.jsonl*"):
        data = gzip.decompress(file.read_bytes()) if file.suffix == ".gz" else file.read_bytes()
        for line in data.decode("utf-8", "replace").splitlines():
            try:
                found.add(int(json.loads(line)["n"]))
            except (ValueError, KeyError, TypeError):
                broken += 1
    return RotationResult(settings=settings, rotations=rotations, submitted=submitted, written=writer.written,
                          found=len(found), broken_lines=broken)
