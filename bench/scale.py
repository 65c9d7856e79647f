"""Measurement 4: one source over many hypervisors with many running domains. From the call
of ``main()`` to every connection subscribed (the source's "watching graphics events" log line
per URI) and to every hypervisor's snapshot delivered on the queue (one console client is kept
open on each hypervisor, so each snapshot yields one ``initialize`` event with snapshot=true).

``python -m bench.scale URI...`` prints one JSON line; the bench runs it in its own process so
that libvirt's event loop starts afresh, as in a new activation.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import time
from typing import Any

from bench.listener import _ReadyHandler
from lab.source_runner import source_plugin


async def measure(uris: list[str]) -> dict[str, Any]:
    ready = _ReadyHandler()
    logger = logging.getLogger("virtguard.console.libvirt_graphics")
    logger.setLevel(logging.INFO)
    logger.addHandler(ready)
    queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=1)
    started = time.monotonic()
    task = asyncio.create_task(source_plugin().main(queue, {"uri": uris}))
    registered = None
    snapshot_uris: set[str] = set()
    events = 0
    deadline = started + 300
    getter = asyncio.create_task(queue.get())
    while len(snapshot_uris) < len(uris) and time.monotonic() < deadline:
        done = (await asyncio.wait([getter, task], timeout=0.01, return_when=asyncio.FIRST_COMPLETED))[0]
        if task in done:
            task.result()
            raise RuntimeError("the source stopped")
        if getter in done:
            graphics = getter.result().get("graphics")
            getter = asyncio.create_task(queue.get())
            if graphics is None:  # a health event ({"hypervisor": ...})
                continue
            events += 1
            if graphics["snapshot"]:
                snapshot_uris.add(graphics["hypervisor"]["uri"])
        if registered is None and ready.watching >= len(uris):
            registered = time.monotonic() - started
    snapshot = time.monotonic() - started
    if registered is None and ready.watching >= len(uris):
        registered = snapshot
    task.cancel()
    return {"hypervisors": len(uris), "registered_s": registered, "snapshot_s": snapshot,
            "snapshots_delivered": len(snapshot_uris), "events": events}


def main() -> None:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    result = asyncio.run(measure(sys.argv[1:]))
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()
    os._exit(0)  # libvirt's callbacks would outlive the closed loop


if __name__ == "__main__":
    main()
