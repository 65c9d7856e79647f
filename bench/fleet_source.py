"""The event source in a process of its own for measurement 8 (bench/fleet_scale.py), as an
activation would hold it: ``python -m bench.fleet_source ARGS_JSON`` runs ``main(queue, args)``
with the source's arguments read from the JSON file, its queue drained by a consumer.

It writes one JSON object per line on stdout, each with ``t`` (``time.monotonic()``: the clock
is the machine's, so the bench compares it with its own):
- ``{"base_rss_kib": N}`` once, after the imports and before ``main`` starts (the memory the
  source's hypervisors add is measured from here), then ``{"started": true}``;
- one line per event taken off the queue: ``uri``, ``phase``, ``snapshot``, ``node``, ``service``,
  ``session``;
- one line per change of a hypervisor's health (``health``: the new state, ``uri``, ``reason``);
- one line per connection log of the source (``log``: ``watching``, ``closed``, ``lost``,
  ``cannot_connect``, ``reconnecting``), with ``uri`` and the message.
It runs until SIGTERM or SIGINT.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from bench.stats import rss_kib
from lab.source_runner import source_plugin

# The source's connection log lines, by what they begin with after "URI: ".
LOG_KINDS = (("watching graphics events", "watching"), ("connection closed", "closed"),
             ("connection lost", "lost"), ("cannot connect", "cannot_connect"), ("reconnecting", "reconnecting"))


def emit(record: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps({"t": time.monotonic(), **record}) + "\n")
    sys.stdout.flush()


class ConnectionLog(logging.Handler):
    """Passes the source's connection log lines on as JSON lines (the URI is the first argument
    of each of them)."""

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        uri = str(record.args[0]) if isinstance(record.args, tuple) and record.args else ""
        text = message[len(uri) + 2:] if uri and message.startswith(f"{uri}: ") else message
        for start, kind in LOG_KINDS:
            if text.startswith(start):
                emit({"log": kind, "uri": uri, "msg": text})
                return


async def run(args: dict[str, Any]) -> None:
    logger = logging.getLogger("virtguard.console.libvirt_graphics")
    logger.setLevel(logging.INFO)
    logger.addHandler(ConnectionLog())
    queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize=1)  # as ansible-rulebook's source queue
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    emit({"base_rss_kib": rss_kib()})
    emit({"started": True})
    source = asyncio.create_task(source_plugin().main(queue, args))

    async def consume() -> None:
        while True:
            event = await queue.get()
            if "graphics" not in event:  # a health event ({"hypervisor": ...}): its changes only
                health = event.get("hypervisor", {})
                if health.get("changed"):
                    emit({"health": health["state"], "uri": health["uri"], "reason": health["reason"]})
                continue
            graphics = event["graphics"]
            emit({"uri": graphics["hypervisor"]["uri"], "phase": graphics["phase"],
                  "snapshot": graphics["snapshot"], "node": graphics["remote"]["node"],
                  "service": graphics["remote"]["service"], "session": graphics["session"]["id"]})

    consumer = asyncio.create_task(consume())
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait([source, stopping], return_when=asyncio.FIRST_COMPLETED)
    if source.done():
        source.result()  # the source ended by itself: say why on stderr
    consumer.cancel()


def main() -> None:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    args = json.loads(Path(sys.argv[1]).read_text())
    asyncio.run(run(args))
    sys.stdout.flush()
    os._exit(0)  # libvirt's callbacks and connect threads would outlive the closed loop


if __name__ == "__main__":
    main()
