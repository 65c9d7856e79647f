"""The hosts' side of measurement 8 (bench/fleet_scale.py): ``python -m bench.fleet_witness
URI...`` subscribes to the graphics events of each fleet host through its daemon's unix socket
(``FleetHost.local_uri``: a partition of the management network leaves it alone) and writes one
JSON line per event (``t`` = ``time.monotonic()``, ``uri``, ``phase``, ``node``, ``service``);
``{"ready": true}`` once every host is subscribed. It runs until SIGTERM or SIGINT.

It is the count the source's output is compared with: every event libvirt raised on a host.
libvirt's own event loop (C) runs in a thread, as in the source."""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
from typing import Any

import libvirt

PHASES = {libvirt.VIR_DOMAIN_EVENT_GRAPHICS_CONNECT: "connect",
          libvirt.VIR_DOMAIN_EVENT_GRAPHICS_INITIALIZE: "initialize",
          libvirt.VIR_DOMAIN_EVENT_GRAPHICS_DISCONNECT: "disconnect"}
_out = threading.Lock()


def emit(record: dict[str, Any]) -> None:
    with _out:
        sys.stdout.write(json.dumps({"t": time.monotonic(), **record}) + "\n")
        sys.stdout.flush()


def run_event_loop() -> None:
    while True:
        libvirt.virEventRunDefaultImpl()


def on_graphics(_conn: Any, _dom: Any, phase: int, _local: Any, remote: dict[str, str], _auth: str,
                _subject: Any, uri: str) -> None:
    emit({"uri": uri, "phase": PHASES.get(phase, str(phase)), "node": remote["node"], "service": remote["service"]})


def main() -> None:
    libvirt.virEventRegisterDefaultImpl()
    threading.Thread(target=run_event_loop, name="libvirt events", daemon=True).start()
    connections = []
    for uri in sys.argv[1:]:
        conn = libvirt.open(uri)
        conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_GRAPHICS, on_graphics, uri)
        connections.append(conn)
    emit({"ready": True})
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda _signum, _frame: stop.set())
    while not stop.wait(1):
        pass


if __name__ == "__main__":
    main()
