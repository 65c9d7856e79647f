# Copyright: virtguard.console contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The event source's buffer between libvirt's event thread and the asyncio loop: events in
arrival order, the first ones as tuples, a backlog packed (marshal) into memory maps that go
back to the system once read."""

from __future__ import annotations

import asyncio
import collections
import marshal
import mmap
import struct
import threading
from collections.abc import Callable
from typing import Any, Dict, List, Tuple, Union

# A live event as the buffer holds it: a tuple of plain data, which marshal packs as it is
# (a runtime alias, so typing's generics: plugins/ is held to Python 3.8).
EventRecord = Tuple[Union[str, int, float, Dict[str, Any], List[Any]], ...]


class PackedChunk:
    """Events packed one after the other (a 4-byte length, then marshal's bytes) in an
    anonymous memory map: the system takes the memory back when the map is closed."""

    __slots__ = ("memory", "start", "end")
    LENGTH = struct.Struct("<I")

    def __init__(self, size: int):
        self.memory = mmap.mmap(-1, size)
        self.start = 0  # the next event to read
        self.end = 0  # where the next event goes

    def room_for(self, size: int) -> bool:
        return len(self.memory) - self.end >= self.LENGTH.size + size

    def write(self, data: bytes) -> None:
        at = self.end + self.LENGTH.size
        self.LENGTH.pack_into(self.memory, self.end, len(data))
        self.end = at + len(data)
        self.memory[at:self.end] = data

    def read(self) -> bytes:
        at = self.start + self.LENGTH.size
        self.start = at + self.LENGTH.unpack_from(self.memory, self.start)[0]
        return self.memory[at:self.start]


class EventBuffer:
    """Between libvirt's callbacks and the queue, in arrival order: live events and the
    objects in between (snapshots, domain stops, health events). The first PACK_AFTER events
    held stay tuples (a steady flow costs nothing more); the events of a backlog beyond that are
    packed with marshal into memory maps of CHUNK_BYTES (a few hundred bytes an event, none of
    them a Python object, so the memory a backlog took goes back to the system once the feeder
    has read it).

    Any thread appends (libvirt's event thread for graphics events and domain stops, the loop's
    for snapshots and health events); one feeder on the loop takes. Both hold ``lock`` briefly.
    A feeder that finds nothing says so (``waiting``) under the lock, and the append that
    follows wakes it through the loop, once per batch."""

    CHUNK_BYTES = 1 << 20
    PACK_AFTER = 10_000  # about 10 MB of Python objects at most

    def __init__(self, limit: int, loop: asyncio.AbstractEventLoop):
        self.limit = limit
        self.loop = loop
        self.lock = threading.Lock()
        self.parts: collections.deque[Any] = collections.deque()  # PackedChunk or object, in order
        self.added = 0
        self.taken = 0
        self.waiting = False
        self.ready = asyncio.Event()
        self.watchers: list[Any] = []  # an event names its watcher by index here

    def add_watcher(self, watcher: Any) -> int:
        self.watchers.append(watcher)
        return len(self.watchers) - 1

    def __len__(self) -> int:
        return self.added - self.taken

    def full(self) -> bool:
        return len(self) >= self.limit

    def append_event(self, record: EventRecord) -> None:
        """Any thread: a live event as a tuple of plain data (str, int, float, dict, list)."""
        if len(self) < self.PACK_AFTER:
            self.append(record)
            return
        data = marshal.dumps(record)
        with self.lock:
            tail = self.parts[-1] if self.parts else None
            if not isinstance(tail, PackedChunk) or not tail.room_for(len(data)):
                tail = PackedChunk(max(self.CHUNK_BYTES, PackedChunk.LENGTH.size + len(data)))
                self.parts.append(tail)
            tail.write(data)
            self._added()

    def append(self, item: object) -> None:
        """Any thread: an object (a snapshot, a domain stop, a health event), kept as it is, in
        order with the events. Never refused: the limit is the graphics callback's to keep."""
        with self.lock:
            self.parts.append(item)
            self._added()

    def _added(self) -> None:  # under the lock
        self.added += 1
        if self.waiting:
            self.waiting = False
            self.call_on_loop(self.ready.set)

    def call_on_loop(self, function: Callable[[], object]) -> None:
        """Any thread: run ``function`` on the loop's thread, unless the loop has closed (a
        callback libvirt was already running when the source stopped)."""
        try:
            self.loop.call_soon_threadsafe(function)
        except RuntimeError:
            pass

    def take(self) -> Any:
        """The feeder: the next event (a tuple) or object, or None, and then ``waiting``."""
        with self.lock:
            while self.parts:
                head = self.parts[0]
                if not isinstance(head, PackedChunk):
                    self.parts.popleft()
                    break
                if head.start < head.end:
                    head = head.read()
                    break
                if len(self.parts) == 1:  # read to the end, and still written to: start over
                    head.start = head.end = 0
                    self.waiting = True
                    return None
                self.parts.popleft()
                head.memory.close()
            else:
                self.waiting = True
                return None
            self.taken += 1
            self.waiting = False
        return marshal.loads(head) if isinstance(head, bytes) else head

    async def get(self) -> Any:
        """The feeder, on the loop: the next event or object, waiting for one."""
        while True:
            self.ready.clear()
            item = self.take()
            if item is not None:
                return item
            await self.ready.wait()
