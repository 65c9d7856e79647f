"""Runs the event source's ``main(queue, args)`` in the test's event loop and collects what it
puts on a bounded queue, the way ansible-rulebook would feed it."""

from __future__ import annotations

import asyncio
import runpy
import time
from pathlib import Path

SOURCE_PATH = (Path(__file__).resolve().parents[2] / "build" / "collections" / "ansible_collections"
               / "virtguard" / "console" / "extensions" / "eda" / "plugins" / "event_source"
               / "libvirt_graphics.py")

_module = None


def source_module() -> dict:
    """The plugin, loaded by path as ansible-rulebook loads it (runpy), once per process."""
    global _module
    if _module is None:
        _module = runpy.run_path(str(SOURCE_PATH))
    return _module


class SourceRun:
    """``async with SourceRun(args) as run:`` starts the source; ``run.events`` fills up."""

    def __init__(self, args: dict, maxsize: int = 1):
        self.args = args
        self.queue: asyncio.Queue = asyncio.Queue(maxsize=maxsize)
        self.events: list[dict] = []
        self._new = asyncio.Event()
        self.draining = asyncio.Event()  # clear it to stall the consumer, as a busy engine would
        self.draining.set()

    async def __aenter__(self) -> "SourceRun":
        self.task = asyncio.create_task(source_module()["main"](self.queue, self.args))
        self.consumer = asyncio.create_task(self._consume())
        return self

    async def __aexit__(self, *exc) -> None:
        for task in (self.task, self.consumer):
            task.cancel()
        await asyncio.gather(self.task, self.consumer, return_exceptions=True)

    async def _consume(self) -> None:
        while True:
            await self.draining.wait()
            event = await self.queue.get()
            self.events.append(event["graphics"])
            self._new.set()

    def matching(self, **where) -> list[dict]:
        return [e for e in self.events if all(_get(e, k) == v for k, v in where.items())]

    async def wait_for(self, count: int = 1, timeout: float = 30, **where) -> list[dict]:
        """Wait until ``count`` events match ``where`` (keys use __ for nesting: remote__service)."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.matching(**where)
            if len(found) >= count:
                return found
            if self.task.done():
                self.task.result()  # raises the source's error
                raise AssertionError("the source stopped")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"timed out waiting for {count} events matching {where}; "
                                     f"have {len(found)}; last events: {self.events[-5:]}")
            self._new.clear()
            try:
                await asyncio.wait_for(self._new.wait(), remaining)
            except asyncio.TimeoutError:
                pass


def _get(event: dict, dotted: str):
    value = event
    for part in dotted.split("__"):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


class FakeDomain:
    """What the graphics callback gets from libvirt: a virDomain whose name, id and UUID are
    local. Counts the UUIDString() calls, which let go of Python's lock in libvirt-python."""

    def __init__(self, name: str, dom_id: int, uuid: str):
        self._name, self._id, self._uuid = name, dom_id, uuid
        self.uuid_calls = 0

    def name(self):
        return self._name

    def ID(self):  # noqa: N802 (libvirt's name)
        return self._id

    def UUIDString(self):  # noqa: N802
        self.uuid_calls += 1
        return self._uuid


def watcher_without_daemon(loop: asyncio.AbstractEventLoop, limit: int = 100):
    """A HypervisorWatcher and its EventBuffer, never connected: for driving its callbacks."""
    module = source_module()
    buffer = module["EventBuffer"](limit, loop)
    return module["HypervisorWatcher"]("qemu:///system", module["SourceArguments"]({}), buffer)
