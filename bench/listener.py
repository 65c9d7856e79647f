"""One listener process of the side-by-side burst: ``python -m bench.listener bare|source URI...``.

``bare`` is the floor to compare with: libvirt-python with libvirtaio and a graphics callback
that appends a timestamp, nothing else. ``source`` is the event source's ``main(queue, args)``,
loaded by path as ansible-rulebook loads it, feeding an ``asyncio.Queue(maxsize=1)`` that a
consumer drains, the way ansible-rulebook's source queue is drained.

Protocol, one JSON object per line: the process writes ``{"ready": true}`` once every
connection is subscribed, then answers commands read from stdin:
``{"cmd": "mark"}`` forgets what was seen and starts counting (CPU time too);
``{"cmd": "count"}`` answers ``{"count": N}``;
``{"cmd": "report"}`` answers the counts, times, CPU seconds, RSS and (source) latencies since
the mark. ``--profile FILE`` (source) profiles from the mark to the report (cProfile).
"""

from __future__ import annotations

import abc
import argparse
import asyncio
import cProfile
import datetime
import json
import logging
import os
import sys
import threading
import time
from typing import Any

from bench.stats import percentile, rss_kib, thread_cpu_s
from lab.source_runner import source_plugin


class Listener(abc.ABC):
    kind = ""

    def __init__(self, uris: list[str]):
        self.uris = uris
        self.cpu_mark = time.process_time()
        self.threads_mark = thread_cpu_s()

    @abc.abstractmethod
    async def start(self) -> None:
        """Subscribe to every URI; return once the events flow."""

    @abc.abstractmethod
    def clear(self) -> None:
        """Forget what was seen."""

    @abc.abstractmethod
    def count(self) -> int:
        """The events seen since the mark."""

    @abc.abstractmethod
    def report(self) -> dict[str, Any]:
        """The figures since the mark."""

    def mark(self) -> None:
        self.clear()
        self.cpu_mark = time.process_time()
        self.threads_mark = thread_cpu_s()

    def base_report(self, times: list[float]) -> dict[str, Any]:
        return {
            "count": len(times),
            "first": min(times) if times else None,
            "last": max(times) if times else None,
            "cpu_s": time.process_time() - self.cpu_mark,
            "cpu_s_by_thread": self.cpu_by_thread(),
            "rss_kib": rss_kib(),
        }

    def cpu_by_thread(self) -> dict[str, Any]:
        """CPU since the mark: the asyncio loop's thread, libvirt's event thread (the source's),
        the rest (executor, the bench's stdin reader)."""
        now = thread_cpu_s()
        spent = {tid: cpu - self.threads_mark.get(tid, 0.0) for tid, cpu in now.items()}
        names = {thread.native_id: thread.name for thread in threading.enumerate()}
        loop_tid = threading.main_thread().native_id
        by_role = {"loop": 0.0, "libvirt_events": 0.0, "other": 0.0}
        for tid, cpu in spent.items():
            if tid == loop_tid:
                by_role["loop"] += cpu
            elif "libvirt" in names.get(tid, ""):
                by_role["libvirt_events"] += cpu
            else:
                by_role["other"] += cpu
        return by_role


class BareListener(Listener):
    """libvirtaio and a callback that appends a timestamp."""

    kind = "bare"

    def __init__(self, uris: list[str]):
        super().__init__(uris)
        self.seen: list[float] = []
        self.conns: list[Any] = []

    def on_graphics(self, _conn: Any, _dom: Any, _phase: int, _local: Any, _remote: Any, _auth: str, _subject: Any,
                    _opaque: Any) -> None:
        self.seen.append(time.time())

    async def start(self) -> None:
        import libvirt
        import libvirtaio

        loop = asyncio.get_running_loop()
        libvirtaio.virEventRegisterAsyncIOImpl(loop=loop)
        for uri in self.uris:
            conn = await loop.run_in_executor(None, libvirt.open, uri)
            conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_GRAPHICS, self.on_graphics, None)
            self.conns.append(conn)

    def clear(self) -> None:
        self.seen = []

    def count(self) -> int:
        return len(self.seen)

    def report(self) -> dict[str, Any]:
        return self.base_report(self.seen)


class _ReadyHandler(logging.Handler):
    """Counts the source's "watching graphics events" log lines: one per subscribed URI."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.watching = 0
        self.changed = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if "watching graphics events" in record.getMessage():
            self.watching += 1
            self.changed.set()


class SourceListener(Listener):
    """The event source's main() feeding an asyncio.Queue(maxsize=1) drained by a consumer."""

    kind = "source"

    def __init__(self, uris: list[str], args: dict[str, Any] | None = None, profile: str | None = None):
        super().__init__(uris)
        # the source's capacity is measured: it must not shed (max_event_rate) a burst it keeps up with
        self.args = {"uri": uris, "max_event_rate": 0, **(args or {})}
        self.records: list[tuple[float, str, str, str]] = []
        self.profile_path = profile
        self.profile: cProfile.Profile | None = None

    async def start(self) -> None:
        ready = _ReadyHandler()
        logger = logging.getLogger("virtguard.console.libvirt_graphics")
        logger.setLevel(logging.INFO)
        logger.addHandler(ready)
        self.queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=1)
        self.task = asyncio.create_task(source_plugin().main(self.queue, self.args))
        self.consumer = asyncio.create_task(self.consume())
        while ready.watching < len(self.uris):
            ready.changed.clear()
            waiter = asyncio.create_task(ready.changed.wait())
            await asyncio.wait([waiter, self.task], timeout=60, return_when=asyncio.FIRST_COMPLETED)
            if self.task.done():
                self.task.result()
                raise RuntimeError("the source stopped before subscribing")
            waiter.cancel()
        await asyncio.sleep(0.2)  # the (empty) snapshots

    async def consume(self) -> None:
        while True:
            event = await self.queue.get()
            if "graphics" not in event:  # a health event ({"hypervisor": ...})
                continue
            graphics = event["graphics"]
            self.records.append((time.time(), graphics["timestamp"], graphics["phase"], graphics["session"]["id"]))

    def mark(self) -> None:
        super().mark()
        if self.profile_path:
            self.profile = cProfile.Profile()
            self.profile.enable()

    def clear(self) -> None:
        self.records = []

    def count(self) -> int:
        return len(self.records)

    def report(self) -> dict[str, Any]:
        if self.profile is not None and self.profile_path:
            self.profile.disable()
            self.profile.dump_stats(self.profile_path)
            self.profile = None
        report = self.base_report([r[0] for r in self.records])
        latencies = sorted(
            (seen - datetime.datetime.fromisoformat(stamp).timestamp()) * 1000.0
            for seen, stamp, _phase, _sid in self.records
        )
        # an event seen twice has the same session, phase and callback time; two sessions may
        # share a session id (the client's port is reused) but not the microsecond of a callback
        report["unique"] = len({(sid, phase, stamp) for _s, stamp, phase, sid in self.records})
        report["session_ids_reused"] = len(self.records) - len({(sid, phase) for _s, _t, phase, sid in self.records})
        report["phases"] = {phase: sum(1 for r in self.records if r[2] == phase)
                            for phase in ("connect", "initialize", "disconnect")}
        report["latency_ms"] = {
            "p50": percentile(latencies, 50), "p99": percentile(latencies, 99),
            "max": latencies[-1] if latencies else None,
        }
        return report


def _stdin_commands(loop: asyncio.AbstractEventLoop, commands: asyncio.Queue[Any]) -> None:
    for line in sys.stdin:
        loop.call_soon_threadsafe(commands.put_nowait, line)
    loop.call_soon_threadsafe(commands.put_nowait, None)


def write(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


async def serve(listener: Listener) -> None:
    await listener.start()
    commands: asyncio.Queue[Any] = asyncio.Queue()
    threading.Thread(target=_stdin_commands, args=(asyncio.get_running_loop(), commands), daemon=True).start()
    write({"ready": True, "pid": os.getpid()})
    while True:
        line = await commands.get()
        if line is None:  # the bench went away
            return
        cmd = json.loads(line)["cmd"]
        if cmd == "mark":
            listener.mark()
            write({"marked": True})
        elif cmd == "count":
            write({"count": listener.count()})
        elif cmd == "report":
            write(listener.report())
        elif cmd == "exit":
            return


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=("bare", "source"))
    parser.add_argument("uri", nargs="+")
    parser.add_argument("--profile", help="cProfile output file (source only), mark to report")
    parser.add_argument("--args", default="{}", help="extra source arguments, JSON")
    options = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    listener: Listener
    if options.kind == "bare":
        listener = BareListener(options.uri)
    else:
        listener = SourceListener(options.uri, json.loads(options.args), options.profile)
    try:
        asyncio.run(serve(listener))
    except KeyboardInterrupt:
        pass
    sys.stdout.flush()
    os._exit(0)  # libvirtaio's callbacks would outlive the closed loop and complain


if __name__ == "__main__":
    main()
