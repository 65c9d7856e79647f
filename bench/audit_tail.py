"""Reading an audit log (JSON Lines) as it grows: the bench's activations append to it while
the measurements read it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class AuditTail:
    """The records appended to an audit log since the last read. Reads only the new bytes, and
    parses each record once: re-reading the whole log on every poll would cost the bench more
    CPU the longer the log grows, and take it from the activation being measured."""

    def __init__(self, path: Path):
        self.path = path
        self.offset = 0
        self.partial = b""

    def read_new(self) -> list[dict[str, Any]]:
        try:
            with open(self.path, "rb") as log:
                log.seek(self.offset)
                data = log.read()
        except FileNotFoundError:
            return []
        self.offset += len(data)
        *lines, self.partial = (self.partial + data).split(b"\n")
        return [json.loads(line) for line in lines if line.strip()]
