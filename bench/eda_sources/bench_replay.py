"""bench_replay: the engine's ceiling for the end-to-end measurement (bench/endtoend.py).

An ansible-rulebook event source (loaded with ``-S bench/eda_sources``) that puts pre-built
``{"graphics": ...}`` payloads, shaped like libvirt_graphics's, on the queue as fast as the
engine takes them: ``events`` per round, one round each time a file ``go-N`` appears in
``trigger_dir`` (N = 1, 2, ...), so the bench can alternate it with the real source's bursts.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.audit import sample_events  # noqa: E402

LOGGER = logging.getLogger("bench_replay")


async def main(queue: asyncio.Queue[Any], args: dict[str, Any]) -> None:
    trigger_dir = Path(args["trigger_dir"])
    count = int(args["events"])
    LOGGER.info("bench_replay: ready, %d events per round", count)
    round_number = 1
    while True:
        # built before the round, so that only the queue and the engine are timed; new sessions
        # every round, as the real source's bursts have
        events = sample_events(count, first_session=(round_number - 1) * (count // 3 + 1))
        while not (trigger_dir / f"go-{round_number}").exists():
            await asyncio.sleep(0.05)
        for event in events:
            await queue.put(event)
        round_number += 1
