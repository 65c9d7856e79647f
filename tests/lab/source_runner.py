"""Runs the event source's ``main(queue, args)`` in the test's event loop and collects what it
puts on a bounded queue, the way ansible-rulebook would feed it; and the pieces unit tests use to
drive the source's callbacks without a daemon (FakeDomain, watcher_without_daemon)."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import queue
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from ansible_collections.virtguard.console.plugins.plugin_utils.event_buffer import EventBuffer
from ansible_collections.virtguard.console.plugins.plugin_utils.hypervisor_watcher import HypervisorWatcher
from ansible_collections.virtguard.console.plugins.plugin_utils.source_arguments import SourceArguments

SOURCE_PATH = (Path(__file__).resolve().parents[2] / "build" / "collections" / "ansible_collections"
               / "virtguard" / "console" / "extensions" / "eda" / "plugins" / "event_source"
               / "libvirt_graphics.py")

_plugin: ModuleType | None = None


def source_plugin() -> ModuleType:
    """The plugin file loaded from the collection's installed path, as a module (once per
    process): its ``main``, DOCUMENTATION, EXAMPLES and RETURN."""
    global _plugin
    if _plugin is None:
        spec = importlib.util.spec_from_file_location("virtguard_console_libvirt_graphics_plugin", SOURCE_PATH)
        assert spec is not None and spec.loader is not None, SOURCE_PATH
        plugin = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(plugin)
        _plugin = plugin
    return _plugin


class SourceRun:
    """``async with SourceRun(args) as run:`` starts the source; ``run.events`` fills up with
    its graphics events (``event["graphics"]``), ``run.health`` with its health events
    (``event["hypervisor"]``)."""

    def __init__(self, args: dict[str, Any], maxsize: int = 1):
        self.args = args
        self.queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize=maxsize)
        self.events: list[dict[str, Any]] = []
        self.health: list[dict[str, Any]] = []
        self.events_before_health: list[int] = []  # len(self.events) when each health event came
        self.others: list[dict[str, Any]] = []  # any other event the source put on the queue
        self._new = asyncio.Event()
        self.draining = asyncio.Event()  # clear it to stall the consumer, as a busy engine would
        self.draining.set()

    async def __aenter__(self) -> SourceRun:
        self.task = asyncio.create_task(source_plugin().main(self.queue, self.args))
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
            if "graphics" in event:
                self.events.append(event["graphics"])
            elif "hypervisor" in event:
                self.health.append(event["hypervisor"])
                self.events_before_health.append(len(self.events))
            else:
                self.others.append(event)
            self._new.set()

    def matching(self, **where: Any) -> list[dict[str, Any]]:
        return [e for e in self.events if all(_get(e, k) == v for k, v in where.items())]

    def health_matching(self, **where: Any) -> list[dict[str, Any]]:
        return [e for e in self.health if all(_get(e, k) == v for k, v in where.items())]

    async def wait_for(self, count: int = 1, timeout: float = 30, **where: Any) -> list[dict[str, Any]]:
        """Wait until ``count`` graphics events match ``where`` (keys use __ for nesting: remote__service)."""
        return await self._wait(self.matching, count, timeout, where)

    async def wait_for_health(self, count: int = 1, timeout: float = 30, **where: Any) -> list[dict[str, Any]]:
        """Wait until ``count`` health events match ``where`` (state="connected", changed=True...)."""
        return await self._wait(self.health_matching, count, timeout, where)

    async def _wait(self, matching: Callable[..., list[dict[str, Any]]], count: int, timeout: float,
                    where: dict[str, Any]) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while True:
            found: list[dict[str, Any]] = matching(**where)
            if len(found) >= count:
                return found
            if self.task.done():
                self.task.result()  # raises the source's error
                raise AssertionError("the source stopped")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"timed out waiting for {count} events matching {where}; "
                                     f"have {len(found)}; last events: {self.events[-5:]}; "
                                     f"last health events: {self.health[-3:]}")
            self._new.clear()
            try:
                await asyncio.wait_for(self._new.wait(), remaining)
            except TimeoutError:
                pass


def _get(event: dict[str, Any], dotted: str) -> object:
    value: object = event
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


def watcher_without_daemon(loop: asyncio.AbstractEventLoop, limit: int = 100) -> HypervisorWatcher:
    """A HypervisorWatcher and its EventBuffer, never connected: for driving its callbacks."""
    return HypervisorWatcher("qemu:///system", SourceArguments({}), EventBuffer(limit, loop))


class HandRun:
    """The source run by hand from the clone, as docs/payload.md documents it:
    ``.venv/bin/python extensions/eda/plugins/event_source/libvirt_graphics.py URI...`` from the
    repository root, with no PYTHONPATH. Its stdout (one JSON event a line) and stderr (the log)
    are read by threads; ``stop()`` sends SIGINT, as Ctrl-C would, and returns the exit code."""

    ROOT = Path(__file__).resolve().parents[2]
    SCRIPT = Path("extensions") / "eda" / "plugins" / "event_source" / "libvirt_graphics.py"

    def __init__(self, *uris: str):
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        self.process = subprocess.Popen([".venv/bin/python", str(self.SCRIPT), *uris], cwd=self.ROOT, env=env,
                                        text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.stdout: queue.Queue[str] = queue.Queue()
        self.log: list[str] = []
        self._log_changed = threading.Condition()
        threading.Thread(target=self._read_stdout, daemon=True).start()
        threading.Thread(target=self._read_stderr, daemon=True).start()

    def _read_stdout(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.stdout.put(line)

    def _read_stderr(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            with self._log_changed:
                self.log.append(line)
                self._log_changed.notify_all()

    def wait_for_log(self, text: str, timeout: float = 60) -> str:
        """The first log line that contains ``text``; AssertionError after ``timeout`` or exit."""
        deadline = time.monotonic() + timeout
        with self._log_changed:
            while True:
                found = [line for line in self.log if text in line]
                if found:
                    return found[0]
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self.process.poll() is not None:
                    raise AssertionError(f"no log line with {text!r} (exit {self.process.poll()}); "
                                         f"log: {''.join(self.log[-20:])}")
                self._log_changed.wait(min(remaining, 0.5))

    def events(self, count: int, timeout: float = 30, **where: Any) -> list[dict[str, Any]]:
        """The next ``count`` printed events that match ``where`` (as SourceRun.wait_for)."""
        deadline = time.monotonic() + timeout
        found: list[dict[str, Any]] = []
        while len(found) < count:
            try:
                line = self.stdout.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"{len(found)} of {count} events matching {where} printed; "
                                     f"log: {''.join(self.log[-20:])}") from None
            graphics = json.loads(line).get("graphics")
            if graphics is None:  # a health event ({"hypervisor": ...})
                continue
            if all(_get(graphics, k) == v for k, v in where.items()):
                found.append(graphics)
        return found

    def stop(self, timeout: float = 30) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError("the hand run did not stop on SIGINT") from None
