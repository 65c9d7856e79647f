"""A test event source: puts the events it is given on the queue, in order, then waits.

Lets a test feed the classify filter events that real libvirt never sends (an unparsable
address, a malformed payload) through the real ansible-rulebook."""

from __future__ import annotations

import asyncio
from typing import Any


async def main(queue: asyncio.Queue[Any], args: dict[str, Any]) -> None:
    for event in args.get("events", []):
        await queue.put(event)
    await asyncio.Event().wait()
