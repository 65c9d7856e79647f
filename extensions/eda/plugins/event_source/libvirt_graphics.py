"""libvirt_graphics: who opens the graphical consoles (VNC, SPICE) of libvirt domains.

An ansible-rulebook event source: one connection per libvirt URI, libvirt's graphics
events (connect, initialize, disconnect) as ``{"graphics": {...}}`` events, and a snapshot of
the clients already connected whenever a connection is (re)established.
"""

from __future__ import annotations

DOCUMENTATION = r"""
---
short_description: Console (VNC, SPICE) sessions of libvirt domains, from libvirt's graphics events.
description:
  - "Opens one connection per libvirt URI, subscribes to libvirt's graphics events
    (C(VIR_DOMAIN_EVENT_ID_GRAPHICS)) and puts one event per libvirt callback on the
    rulebook's queue, as C({\"graphics\": {...}}). docs/payload.md describes every field."
  - When a connection is established, and again after every reconnection, it reports the
    console clients that QEMU already has (C(query-vnc), C(query-spice)) as C(initialize)
    events with C(snapshot=true), and the sessions it knew of that are gone as
    C(disconnect) events with C(snapshot=true).
  - A hypervisor that is down or unreachable is retried with exponential backoff; the other
    URIs keep working.
  - Events are never dropped between libvirt and the queue. libvirt's default event loop runs
    in one thread of the process; its callback appends to an in-memory buffer and one task
    feeds the queue with backpressure. The buffer holds at
    most O(max_buffered_events) raw events; past that the source stops listening to the
    hypervisors whose events overflow, and resynchronises them by snapshot once the queue has
    drained, so the sessions that a gap would hide are reported, never silently lost.
  - Needs libvirt-python. The snapshot uses libvirt's QEMU monitor passthrough, so the
    connection must not be read-only (for C(qemu:///system), root or a member of the
    C(libvirt) group).
options:
  uri:
    description: One libvirt URI or a list of them; one connection per URI.
    type: list
    elements: str
    default: [qemu:///system]
  domains:
    description:
      - Only domains whose name matches one of these shell-style patterns (C(fnmatch)).
        Default, every domain.
    type: list
    elements: str
  keepalive_interval:
    description:
      - Seconds between libvirt keepalive messages, so a dead connection is noticed.
        C(0) disables keepalive.
    type: int
    default: 5
  keepalive_count:
    description: Keepalive messages without an answer after which the connection is closed.
    type: int
    default: 3
  reconnect_delay:
    description: Seconds before the first reconnection attempt; doubled after each failure.
    type: float
    default: 1
  reconnect_max_delay:
    description: Upper bound of the reconnection delay in seconds.
    type: float
    default: 60
  snapshot:
    description:
      - Report the console clients already connected when a connection is (re)established,
        and the known sessions that ended while the source was not connected.
    type: bool
    default: true
  max_buffered_events:
    description:
      - Events held between libvirt and the queue before the source pauses the hypervisors
        that overflow it and resynchronises them by snapshot. Held packed, 200 to 400 bytes
        an event, in memory given back to the system once read.
    type: int
    default: 100000
"""

EXAMPLES = r"""
- name: Watch console sessions on two hypervisors
  hosts: all
  sources:
    - virtguard.console.libvirt_graphics:
        uri:
          - qemu:///system
          - qemu+tls://kvm2.example.com/system
        domains: ["web-*", "db-*"]
  rules:
    - name: Someone opened a console
      condition: event.graphics.phase == "initialize"
      action:
        debug:
          msg: "{{ event.graphics.remote.node }} on {{ event.graphics.domain.name }}"
"""

RETURN = r"""
graphics:
  description:
    - One event per libvirt graphics callback, put on the queue as C(event.graphics).
    - docs/payload.md describes every field, with captured examples.
  type: dict
  returned: always
  contains:
    phase: {description: C(connect), C(initialize) or C(disconnect)., type: str}
    snapshot: {description: True for events derived from a snapshot of connected clients., type: bool}
    timestamp: {description: ISO-8601 with time zone, when the source received the event., type: str}
    hypervisor: {description: "C(uri) as configured and C(hostname) from libvirt.", type: dict}
    domain: {description: "C(name), C(uuid) and C(id) of the domain.", type: dict}
    local: {description: "The server address, C(family) (ipv4, ipv6, unix), C(node), C(service).", type: dict}
    remote: {description: "The client address, C(family), C(node), C(service), verbatim.", type: dict}
    auth_scheme: {description: The authentication scheme verbatim (none, vnc, vencrypt+x509+sasl...)., type: str}
    subject: {description: "The identities verbatim, in order, as C(type) and C(name).", type: list, elements: dict}
    identity: {description: "The identities by type: C(x509dname), C(sasl_username); absent when not given.", type: dict}
    session: {description: "C(id) (stable per client session), C(authenticated), C(duration_s) on disconnect.", type: dict}
"""

import asyncio
import collections
import ctypes
import fnmatch
import importlib.metadata
import json
import logging
import marshal
import mmap
import os
import struct
import sys
import threading
import time
from typing import Any
from urllib.parse import urlsplit


def _import_collection_utils():
    """ansible-rulebook loads this file by path; make ``ansible_collections`` importable from
    the collection tree it was loaded from when it is not already."""
    try:
        from ansible_collections.virtguard.console.plugins.module_utils import (  # noqa: F401
            graphics_event,
        )
    except ImportError:
        here = os.path.abspath(__file__)
        parts = here.split(os.sep)
        if "ansible_collections" not in parts:
            raise
        top = os.sep.join(parts[: len(parts) - 1 - parts[::-1].index("ansible_collections")])
        sys.path.append(top or os.sep)


_import_collection_utils()

from ansible_collections.virtguard.console.plugins.module_utils.graphics_event import (  # noqa: E402
    address,
    clients_from_query_spice,
    clients_from_query_vnc,
    graphics_payload,
    iso_timestamp_utc,
    phase_name,
    session_id_for,
)
from ansible_collections.virtguard.console.plugins.module_utils.session_tracking import (  # noqa: E402
    SessionTracker,
)

try:
    import libvirt
    import libvirt_qemu
except ImportError as exc:  # pragma: no cover - reported at start, with what to install
    libvirt = None
    LIBVIRT_IMPORT_ERROR = exc
else:
    LIBVIRT_IMPORT_ERROR = None
try:
    import libvirtaio
except ImportError:
    libvirtaio = None

LOGGER = logging.getLogger("virtguard.console.libvirt_graphics")

# libvirt-python keeps one reference to the two address dicts and the subject list of every
# graphics event it hands to Python: libvirt-override.c releases them only when the callback
# fails (since 1.2.21, 2015). About 1 KB per event, never freed; the source gives those
# references back (release_leaked_references). Checked up to 12.8.0: a later version is left
# alone until checked, since giving back a reference the binding did release would free
# objects still in use.
GRAPHICS_REFERENCES_LEAK_IN = ("1.2.21", "12.8.0")


def version_tuple(version: str) -> tuple[int, ...] | None:
    try:
        return tuple(int(part) for part in version.split("."))
    except ValueError:
        return None


def graphics_references_leak(version: str | None) -> bool:
    """Whether this libvirt-python version is one known to keep the graphics arguments."""
    found = version_tuple(version) if version else None
    first, last = (version_tuple(v) for v in GRAPHICS_REFERENCES_LEAK_IN)
    return found is not None and first <= found <= last


def installed_libvirt_python() -> str | None:
    try:
        return importlib.metadata.version("libvirt-python")
    except importlib.metadata.PackageNotFoundError:
        return None


LIBVIRT_PYTHON_VERSION = installed_libvirt_python()
RELEASE_GRAPHICS_REFERENCES = LIBVIRT_IMPORT_ERROR is None and graphics_references_leak(LIBVIRT_PYTHON_VERSION)
PY_DECREF = ctypes.pythonapi.Py_DecRef  # pythonapi keeps the GIL held during the call
PY_DECREF.argtypes = (ctypes.py_object,)
PY_DECREF.restype = None


def release_leaked_references(*objects) -> None:
    """Give back the reference libvirt-python kept to each of ``objects`` (see above)."""
    for obj in objects:
        PY_DECREF(obj)


INTERNAL_ARG_PREFIX = "eda_"  # arguments ansible-rulebook adds itself (eda_feedback_queue)


class ArgumentError(ValueError):
    """A source argument is wrong; the message names it."""


class SourceArguments:
    """The source's arguments, checked once at start."""

    DEFAULTS = {
        "uri": ["qemu:///system"],
        "domains": None,
        "keepalive_interval": 5,
        "keepalive_count": 3,
        "reconnect_delay": 1.0,
        "reconnect_max_delay": 60.0,
        "snapshot": True,
        "max_buffered_events": 100000,
    }

    def __init__(self, args: dict[str, Any]):
        unknown = sorted(k for k in args if k not in self.DEFAULTS and not k.startswith(INTERNAL_ARG_PREFIX))
        if unknown:
            raise ArgumentError(
                f"unknown argument(s) {', '.join(unknown)}; known: {', '.join(self.DEFAULTS)}"
            )

        def get(name):
            return args[name] if args.get(name) is not None else self.DEFAULTS[name]

        self.uris = self._uris(get("uri"))
        self.domains = self._patterns(get("domains"))
        self.keepalive_interval = self._number("keepalive_interval", get("keepalive_interval"), int)
        self.keepalive_count = self._number("keepalive_count", get("keepalive_count"), int)
        self.reconnect_delay = self._number("reconnect_delay", get("reconnect_delay"), float, positive=True)
        self.reconnect_max_delay = self._number("reconnect_max_delay", get("reconnect_max_delay"), float,
                                                positive=True)
        if self.reconnect_max_delay < self.reconnect_delay:
            raise ArgumentError(
                f"reconnect_max_delay ({self.reconnect_max_delay}) must not be less than "
                f"reconnect_delay ({self.reconnect_delay})"
            )
        self.snapshot = self._bool("snapshot", get("snapshot"))
        self.max_buffered_events = self._number("max_buffered_events", get("max_buffered_events"), int,
                                                positive=True)

    @staticmethod
    def _uris(value) -> list[str]:
        uris = [value] if isinstance(value, str) else value
        if not isinstance(uris, list):
            raise ArgumentError(f"uri must be a libvirt URI or a list of them, not {type(value).__name__}")
        if not uris:
            raise ArgumentError("uri must name at least one libvirt URI, got an empty list")
        for uri in uris:
            if not isinstance(uri, str):
                raise ArgumentError(f"uri: every element must be a string, got {type(uri).__name__} {uri!r}")
            parts = urlsplit(uri)
            if not parts.scheme or "://" not in uri or any(ch.isspace() for ch in uri):
                raise ArgumentError(f"uri: {uri!r} is not a libvirt URI (like qemu:///system)")
        duplicates = sorted({u for u in uris if uris.count(u) > 1})
        if duplicates:
            raise ArgumentError(f"uri: {', '.join(duplicates)} given more than once")
        return list(uris)

    def watches_domain(self, name: str) -> bool:
        """Whether ``domains`` lets the domain called ``name`` through (all, without patterns)."""
        return not self.domains or any(fnmatch.fnmatchcase(name, p) for p in self.domains)

    @staticmethod
    def _patterns(value) -> list[str] | None:
        if value is None:
            return None
        patterns = [value] if isinstance(value, str) else value
        if not isinstance(patterns, list) or not patterns or not all(isinstance(p, str) and p for p in patterns):
            raise ArgumentError(f"domains must be a non-empty list of name patterns, got {value!r}")
        return list(patterns)

    @staticmethod
    def _number(name, value, kind, positive=False):
        if isinstance(value, bool):
            raise ArgumentError(f"{name} must be a number, got {value!r}")
        try:
            number = kind(value)
        except (TypeError, ValueError):
            raise ArgumentError(f"{name} must be a{'n integer' if kind is int else ' number'}, got {value!r}") from None
        if kind is int and isinstance(value, float) and value != number:
            raise ArgumentError(f"{name} must be an integer, got {value!r}")
        if number < 0 or (positive and number == 0):
            raise ArgumentError(f"{name} must be {'greater than 0' if positive else 'zero or more'}, got {value!r}")
        return number

    @staticmethod
    def _bool(name, value) -> bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "on", "false", "no", "off"):
            return value.lower() in ("true", "yes", "on")
        raise ArgumentError(f"{name} must be true or false, got {value!r}")


def now_iso() -> str:
    return iso_timestamp_utc(time.time())


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
    snapshots in between. The first PACK_AFTER events held stay tuples (a steady flow costs
    nothing more); the events of a backlog beyond that are packed with marshal into memory
    maps of CHUNK_BYTES (a few hundred bytes an event, none of them a Python object, so the
    memory a backlog took goes back to the system once the feeder has read it).

    Any thread appends (libvirt's event thread, the loop's for snapshots); one feeder on the
    loop takes. Both hold ``lock`` briefly. A feeder that finds nothing says so (``waiting``)
    under the lock, and the append that follows wakes it through the loop, once per batch."""

    CHUNK_BYTES = 1 << 20
    PACK_AFTER = 10_000  # about 10 MB of Python objects at most

    def __init__(self, limit: int, loop: asyncio.AbstractEventLoop):
        self.limit = limit
        self.loop = loop
        self.lock = threading.Lock()
        self.parts: collections.deque = collections.deque()  # PackedChunk or snapshot, in order
        self.added = 0
        self.taken = 0
        self.waiting = False
        self.ready = asyncio.Event()
        self.watchers: list = []  # an event names its watcher by index here

    def add_watcher(self, watcher) -> int:
        self.watchers.append(watcher)
        return len(self.watchers) - 1

    def __len__(self):
        return self.added - self.taken

    def full(self) -> bool:
        return len(self) >= self.limit

    def append_event(self, record: tuple) -> None:
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

    def append(self, item) -> None:
        """Any thread: an object (a snapshot), kept as it is, in order with the events."""
        with self.lock:
            self.parts.append(item)
            self._added()

    def _added(self) -> None:  # under the lock
        self.added += 1
        if self.waiting:
            self.waiting = False
            self.call_on_loop(self.ready.set)

    def call_on_loop(self, function) -> None:
        """Any thread: run ``function`` on the loop's thread, unless the loop has closed (a
        callback libvirt was already running when the source stopped)."""
        try:
            self.loop.call_soon_threadsafe(function)
        except RuntimeError:
            pass

    def take(self):
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

    async def get(self):
        """The feeder, on the loop: the next event or object, waiting for one."""
        while True:
            self.ready.clear()
            item = self.take()
            if item is not None:
                return item
            await self.ready.wait()


class Snapshot:
    """The clients QEMU reported on one hypervisor at one moment, to be merged in order."""

    __slots__ = ("watcher", "present", "generation")

    def __init__(self, watcher, present, generation):
        self.watcher = watcher
        self.present = present
        self.generation = generation


class HypervisorWatcher:
    """One libvirt connection: connect with backoff, subscribe, snapshot, wait for close."""

    def __init__(self, uri: str, config: SourceArguments, buffer: EventBuffer):
        self.uri = uri
        self.config = config
        self.buffer = buffer
        self.index = buffer.add_watcher(self)
        self.uuids: dict[tuple[str, int], str] = {}  # (name, id) -> UUID, this connection's
        self.hypervisor = {"uri": uri, "hostname": None}
        self.sessions = SessionTracker()
        self.conn = None
        self.closed = asyncio.Event()
        self.wakeup = asyncio.Event()  # closed, or the buffer overflowed
        # live events seen since the snapshot in flight was taken (session ids)
        self.snapshot_generation = 0
        self.touched_since_snapshot: set[str] | None = None
        self.overflowed = False
        self.dropped = 0

    # -- libvirt callbacks (libvirt's event thread: never block, never raise, and reach the
    #    loop's objects through call_soon_threadsafe only) ---------------------------------
    def on_libvirt_graphics(self, conn, dom, phase, local, remote, auth_scheme, subject, opaque):
        """The callback libvirt-python calls: on_graphics, then the references it keeps. It
        must return normally: when a callback raises, the binding releases the arguments
        itself, and giving them back as well would free them twice."""
        try:
            self.on_graphics(conn, dom, phase, local, remote, auth_scheme, subject, opaque)
        except Exception:  # never raise into libvirt-python (see above)
            LOGGER.exception("%s: the graphics callback failed", self.uri)
        if RELEASE_GRAPHICS_REFERENCES:
            release_leaked_references(local, remote, subject)

    def on_graphics(self, _conn, dom, phase, local, remote, auth_scheme, subject, _opaque):
        wall = time.time()
        if self.overflowed:
            self.dropped += 1
            return
        if self.buffer.full():
            self.overflowed = True
            self.dropped += 1
            self.buffer.call_on_loop(self.wakeup.set)
            LOGGER.error("%s: %d events buffered; pausing this hypervisor until the queue drains, "
                         "then resynchronising it by snapshot", self.uri, len(self.buffer))
            return
        try:
            name = dom.name()
            if not self.config.watches_domain(name):
                return
            dom_id = dom.ID()
            uuid = self.uuids.get((name, dom_id))
            if uuid is None:
                uuid = self.remember_uuid(name, dom_id, dom.UUIDString())
            self.buffer.append_event((self.index, wall, name, uuid, dom_id, phase, local, remote,
                                      auth_scheme, subject))
        except Exception:  # one malformed event must not stop the others
            LOGGER.exception("%s: cannot take the event %r", self.uri, (phase, local, remote, auth_scheme, subject))

    def remember_uuid(self, name: str, dom_id: int, uuid: str) -> str:
        """The UUID of the running domain ``name`` with id ``dom_id``. ``UUIDString()`` lets
        go of Python's lock, and taking it back on libvirt's thread costs the engine's thread a
        hand-over per event; ``name()`` and ``ID()`` do not. A running domain cannot be renamed,
        and libvirt gives every start a new id, so (name, id) names one domain until this
        connection ends (the cache is emptied on every connection)."""
        if len(self.uuids) >= 4096:
            self.uuids = {}
        self.uuids[(name, dom_id)] = uuid
        return uuid

    def on_close(self, _conn, reason, _opaque):
        LOGGER.warning("%s: connection closed (reason %s)", self.uri, reason)
        self.buffer.call_on_loop(self.on_closed)

    def on_closed(self) -> None:
        self.closed.set()
        self.wakeup.set()

    # -- payloads (called by the feeder, in arrival order) --------------------------------
    def live_payload(self, wall, name, uuid, dom_id, phase, local, remote, auth_scheme, subject) -> dict:
        domain = {"name": name, "uuid": uuid, "id": dom_id}
        remote = address(remote)
        local = address(local)
        session_id = session_id_for(self.uri, domain["uuid"], remote)
        if self.touched_since_snapshot is not None:
            self.touched_since_snapshot.add(session_id)
        phase = phase_name(phase)
        session = self.sessions.observe(session_id, phase, time.monotonic(),
                                        (domain, local, remote, auth_scheme, subject))
        timestamp = iso_timestamp_utc(wall)
        return graphics_payload(phase, timestamp, self.hypervisor, domain, local, remote,
                                auth_scheme, subject, session)

    def snapshot_payloads(self, snap: Snapshot) -> list[dict]:
        if snap.generation != self.snapshot_generation:
            return []  # superseded by a later snapshot of the same hypervisor
        touched = self.touched_since_snapshot or set()
        self.touched_since_snapshot = None
        initialized, gone = self.sessions.reconcile(snap.present, time.monotonic(), touched)
        timestamp = now_iso()
        payloads = []
        for phase, entries in (("initialize", initialized), ("disconnect", gone)):
            for _sid, session, (domain, local, remote, auth_scheme, subject) in entries:
                payloads.append(graphics_payload(phase, timestamp, self.hypervisor, domain, local, remote,
                                                 auth_scheme, subject, session, snapshot=True))
        return payloads

    # -- connection life cycle --------------------------------------------------------------
    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        delay = self.config.reconnect_delay
        while True:
            try:
                self.conn = await loop.run_in_executor(None, libvirt.open, self.uri)
            except libvirt.libvirtError as exc:
                LOGGER.warning("%s: cannot connect (%s); retrying in %.1fs", self.uri, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.config.reconnect_max_delay)
                continue
            try:
                await self.watch(loop)
                delay = self.config.reconnect_delay
            except libvirt.libvirtError as exc:
                LOGGER.warning("%s: connection lost (%s)", self.uri, exc)
            except Exception:  # never let one hypervisor's failure end its watch for good
                LOGGER.exception("%s: unexpected error; reconnecting", self.uri)
            finally:
                await self.disconnect(loop)
            LOGGER.info("%s: reconnecting in %.1fs", self.uri, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.config.reconnect_max_delay)

    async def watch(self, loop) -> None:
        conn = self.conn
        self.closed.clear()
        self.uuids = {}  # ids may start over with another daemon
        if self.config.keepalive_interval:
            conn.setKeepAlive(self.config.keepalive_interval, self.config.keepalive_count)
        conn.registerCloseCallback(self.on_close, None)
        self.callback_id = self.subscribe(conn)
        self.hypervisor = {"uri": self.uri, "hostname": await loop.run_in_executor(None, conn.getHostname)}
        LOGGER.info("%s: watching graphics events on %s", self.uri, self.hypervisor["hostname"])
        if self.config.snapshot:
            await self.take_snapshot(loop)
        while True:
            self.wakeup.clear()
            if self.closed.is_set():
                return
            if self.overflowed:
                await self.resume_after_overflow(loop)
                continue
            await self.wakeup.wait()

    def subscribe(self, conn) -> int:
        """Register the graphics callback: once, then drop it and register it again.

        libvirt (seen with 9.0; the race is in virObjectEventStateQueueRemote) can keep an event
        stuck in a daemon's queue when the last listener leaves just as QEMU reports one, for
        example an earlier run of this source stopped during a burst. Every listener after that
        receives nothing until all of them have left at once. Dropping our only callback makes
        this connection leave for a moment, which clears such a queue when no other program
        listens. While the source stays subscribed the queue cannot get stuck, so this is needed
        once per connection. The snapshot that follows reports the sessions that opened meanwhile."""
        first = conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_GRAPHICS, self.on_libvirt_graphics, None)
        conn.domainEventDeregisterAny(first)
        return conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_GRAPHICS, self.on_libvirt_graphics, None)

    async def resume_after_overflow(self, loop) -> None:
        """Wait until the queue has drained the buffer to half, then listen again and let a
        snapshot tell what the dropped events would have."""
        while len(self.buffer) > self.buffer.limit // 2 and not self.closed.is_set():
            await asyncio.sleep(0.05)
        LOGGER.warning("%s: resuming after dropping %d events; resynchronising by snapshot",
                       self.uri, self.dropped)
        self.overflowed = False
        self.dropped = 0
        await self.take_snapshot(loop)

    async def take_snapshot(self, loop) -> None:
        self.snapshot_generation += 1
        generation = self.snapshot_generation
        # Live events from here on win over what the snapshot says about the same session.
        self.touched_since_snapshot = set()
        present = await loop.run_in_executor(None, self.query_clients, self.conn)
        self.buffer.append(Snapshot(self, present, generation))

    def query_clients(self, conn) -> dict:
        """Blocking: every console client QEMU reports, keyed by session id (executor thread)."""
        present = {}
        for dom in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
            domain = {"name": dom.name(), "uuid": dom.UUIDString(), "id": dom.ID()}
            if not self.config.watches_domain(domain["name"]):
                continue
            for command, parse in (("query-vnc", clients_from_query_vnc), ("query-spice", clients_from_query_spice)):
                try:
                    answer = libvirt_qemu.qemuMonitorCommand(dom, json.dumps({"execute": command}), 0)
                except libvirt.libvirtError as exc:
                    if exc.get_error_code() == libvirt.VIR_ERR_OPERATION_DENIED:
                        LOGGER.warning("%s: no snapshot of console clients: %s (the source needs a "
                                       "read-write connection)", self.uri, exc)
                        return present
                    if command == "query-vnc" or "CommandNotFound" not in str(exc):
                        LOGGER.debug("%s: %s on %s failed: %s", self.uri, command, domain["name"], exc)
                    continue
                for local, remote, auth_scheme, subject in parse(json.loads(answer).get("return")):
                    session_id = session_id_for(self.uri, domain["uuid"], remote)
                    present[session_id] = (domain, local, remote, auth_scheme, subject)
        return present

    async def disconnect(self, loop) -> None:
        conn, self.conn = self.conn, None
        if conn is None:
            return
        for undo in (lambda: conn.domainEventDeregisterAny(self.callback_id), conn.unregisterCloseCallback):
            try:
                undo()
            except (libvirt.libvirtError, AttributeError):
                pass
        try:
            await loop.run_in_executor(None, conn.close)
        except libvirt.libvirtError:
            pass


EVENT_THREAD_NAME = "libvirt default event loop (virtguard.console)"


def ensure_libvirt_event_loop() -> None:
    """libvirt's default event loop, run by one daemon thread per process and shared by every
    source of that process (ansible-rulebook loads each source afresh, so the thread's name
    is what marks it as started). libvirt's RPC decoding then runs in C beside the asyncio
    loop; the callbacks hand their events over in batches (docs/performance.md). A process
    that registered libvirt's asyncio integration (libvirtaio) before the first source keeps
    it: libvirt allows one event loop per process."""
    current = libvirtaio.getCurrentImpl() if libvirtaio is not None else None
    if current is not None:
        if current.loop is not asyncio.get_running_loop():
            raise RuntimeError(
                "libvirt's asyncio event implementation is already registered on another event loop "
                "in this process, and libvirt allows only one registration per process"
            )
        return
    if any(thread.name == EVENT_THREAD_NAME for thread in threading.enumerate()):
        return
    if libvirt.virEventRegisterDefaultImpl() < 0:
        raise RuntimeError("libvirt's default event loop could not be registered")
    threading.Thread(target=_run_libvirt_events, name=EVENT_THREAD_NAME, daemon=True).start()


def _run_libvirt_events() -> None:
    while True:
        if libvirt.virEventRunDefaultImpl() < 0:
            LOGGER.error("libvirt's event loop failed: %s", libvirt.virGetLastErrorMessage())
            time.sleep(0.1)


async def feed(queue: asyncio.Queue, buffer: EventBuffer) -> None:
    """Move events from the buffer to the queue in arrival order, waiting for room."""
    while True:
        item = await buffer.get()
        if isinstance(item, Snapshot):
            for payload in item.watcher.snapshot_payloads(item):
                await queue.put(payload)
            continue
        watcher = buffer.watchers[item[0]]
        try:
            payload = watcher.live_payload(*item[1:])
        except Exception:  # one malformed event must not stop the others
            LOGGER.exception("%s: cannot build the event for %r", watcher.uri, item[5:])
            continue
        await queue.put(payload)


async def main(queue: asyncio.Queue, args: dict[str, Any]) -> None:
    """Watch the graphics events of every configured hypervisor until cancelled."""
    config = SourceArguments(args)
    if LIBVIRT_IMPORT_ERROR is not None:
        raise RuntimeError(f"libvirt-python is required: {LIBVIRT_IMPORT_ERROR}")
    ensure_libvirt_event_loop()
    if not RELEASE_GRAPHICS_REFERENCES:
        LOGGER.warning("libvirt-python %s is not one of the versions checked for keeping the arguments of "
                       "graphics callbacks (%s to %s); if this process grows with console events, it still "
                       "does", LIBVIRT_PYTHON_VERSION or "(version unknown)", *GRAPHICS_REFERENCES_LEAK_IN)
    buffer = EventBuffer(config.max_buffered_events, asyncio.get_running_loop())
    watchers = [HypervisorWatcher(uri, config, buffer) for uri in config.uris]
    tasks = [asyncio.create_task(w.run(), name=f"libvirt_graphics {w.uri}") for w in watchers]
    try:
        await feed(queue, buffer)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


if __name__ == "__main__":
    # Run by hand against a real system: python libvirt_graphics.py [URI ...]

    class PrintingQueue(asyncio.Queue):
        async def put(self, item):
            print(json.dumps(item), flush=True)

    logging.basicConfig(level=logging.INFO)
    asyncio.run(main(PrintingQueue(), {"uri": sys.argv[1:] or ["qemu:///system"]}))
