"""What the event source says it did, read from its log as pytest captures it (``caplog``): tests
wait for the source to be subscribed, or to report an overflow, instead of sleeping and hoping.

The ``source_log`` fixture (tests/integration/conftest.py) makes one per test.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from typing import Any

import pytest

# The one logger of the source and its parts (plugins/plugin_utils).
SOURCE_LOGGER = "virtguard.console.libvirt_graphics"


class SourceLog:
    def __init__(self, caplog: pytest.LogCaptureFixture) -> None:
        caplog.set_level(logging.INFO, logger=SOURCE_LOGGER)
        self.caplog = caplog
        self.subscriptions_awaited: collections.Counter[str] = collections.Counter()

    def messages(self, *parts: str) -> list[str]:
        """Every message of the source so far (in this test) that holds all of ``parts``."""
        return [record.getMessage() for record in self.caplog.records
                if record.name == SOURCE_LOGGER and all(part in record.getMessage() for part in parts)]

    async def wait_for(self, count: int, *parts: str, run: Any = None, timeout: float = 30) -> list[str]:
        """Wait until ``count`` messages hold all of ``parts``; ``run`` (a SourceRun) lets a
        source that stopped fail the wait at once, with its own error."""
        deadline = time.monotonic() + timeout
        while len(found := self.messages(*parts)) < count:
            if run is not None and run.task.done():
                run.task.result()
                raise AssertionError(f"the source stopped before logging {parts}")
            if time.monotonic() > deadline:
                raise AssertionError(f"the source logged {len(found)} of {count} messages with {parts} "
                                     f"in {timeout:g}s; it logged: {self.messages()[-10:]}")
            await asyncio.sleep(0.05)
        return found

    async def subscribed(self, uri: str, run: Any = None, timeout: float = 30) -> None:
        """Wait until the source has registered its graphics callback on ``uri`` once more than
        at the previous call for ``uri`` (it logs "watching graphics events" right after).
        Events QEMU raises from then on reach the source."""
        self.subscriptions_awaited[uri] += 1
        await self.wait_for(self.subscriptions_awaited[uri], f"{uri}: watching graphics events",
                            run=run, timeout=timeout)
