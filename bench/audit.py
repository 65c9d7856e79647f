"""Measurement 6: the audit log on its own, and the classify filter for every event in the
audit rulebook (policy verdict, the record handed to the audit writer's thread), per second;
the filter's figure includes waiting for its writer to have written everything."""

from __future__ import annotations

import runpy
import tempfile
import time
from pathlib import Path
from typing import Any

from ansible_collections.virtguard.console.plugins.module_utils.audit_log import AuditLog, event_record
from ansible_collections.virtguard.console.plugins.plugin_utils.graphics_event import address, graphics_payload
from bench import ROOT

CLASSIFY_PATH = ROOT / "extensions" / "eda" / "plugins" / "event_filter" / "classify.py"


def sample_events(count: int, first_session: int = 0) -> list[dict[str, Any]]:
    """Payloads shaped like the source's: whole sessions, a SASL identity on initialize; the
    sessions are numbered from ``first_session``, so that each batch has sessions of its own
    (session ids, client ports) as real traffic does."""
    hypervisor = {"uri": "qemu:///system", "hostname": "bench"}
    local = address({"family": 0, "node": "127.0.0.1", "service": "5900"})
    events = []
    for n in range(count):
        session, phase = divmod(n, 3)
        session += first_session
        domain = {"name": f"vm{session % 4}", "uuid": f"00000000-0000-0000-0000-00000000000{session % 4}",
                  "id": session % 4 + 1}
        remote = address({"family": 0, "node": f"10.0.{session >> 8 & 255}.{session & 255}",
                          "service": str(1024 + session % 60000)})
        subject = [("saslUsername", f"user{session % 97}")] if phase else []
        events.append(graphics_payload(("connect", "initialize", "disconnect")[phase], "2026-01-01T00:00:00+00:00",
                                       hypervisor, domain, local, remote, "sasl", subject,
                                       {"id": f"{session:032x}", "authenticated": bool(phase)}))
    return events


def measure(count: int) -> dict[str, Any]:
    events = sample_events(min(count, 30000))
    with tempfile.TemporaryDirectory(prefix="vgt-bench-audit-", dir=ROOT / "build") as tmp:
        log = AuditLog(str(Path(tmp) / "writer.jsonl"), fsync="interval")
        verdict = {"verdict": "allow", "reasons": [], "remediate": False}
        started = time.perf_counter()
        for n in range(count):
            log.append(event_record(events[n % len(events)]["graphics"], verdict))
        writer = count / (time.perf_counter() - started)
        log.close()
        lines_writer = _count_lines(Path(tmp) / "writer.jsonl")

        plugin = runpy.run_path(str(CLASSIFY_PATH))
        classify = plugin["main"]
        path = str(Path(tmp) / "classify.jsonl")
        kwargs = {"trusted_networks": ["10.0.0.0/8"], "allowed_identities": ["user1"], "audit_log": path,
                  "remediation": False}
        started = time.perf_counter()
        for n in range(count):
            classify({"graphics": dict(events[n % len(events)]["graphics"])}, **kwargs)
        for state in plugin["_STATES"].values():
            state.audit.close()
        filtered = count / (time.perf_counter() - started)
        lines_classify = _count_lines(Path(path))
    return {"records": count, "writer_per_s": writer, "classify_per_s": filtered,
            "lost": (count - lines_writer) + (count - lines_classify)}


def _count_lines(path: Path) -> int:
    with open(path) as lines:
        return sum(1 for _line in lines)
