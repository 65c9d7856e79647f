# Copyright: virtguard.console contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""One hypervisor as the event source watches it: the connection's life cycle (connect with
backoff, subscribe, snapshot, wait for close) and the health events that report it, libvirt's
graphics and domain lifecycle callbacks (on libvirt's event thread, into the EventBuffer), the
payloads built from what was buffered (on the loop, in arrival order), the snapshot of the
clients QEMU already has, and the pause of a hypervisor that overflows the buffer. ``feed``
moves the buffered events of every watcher to the queue; ``send_heartbeats`` adds each
hypervisor's periodic health event to them."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import time
from typing import AbstractSet, Any, Dict

from ansible_collections.virtguard.console.plugins.plugin_utils.event_buffer import EventBuffer
from ansible_collections.virtguard.console.plugins.plugin_utils.graphics_event import (
    address,
    clients_from_query_spice,
    clients_from_query_vnc,
    graphics_payload,
    iso_timestamp_utc,
    live_protocol,
    phase_name,
    session_id_for,
    spice_channel_locals,
    spice_ports,
)
from ansible_collections.virtguard.console.plugins.plugin_utils.hypervisor_health import (
    BLIND,
    CONNECTED,
    RECONNECTING,
    RESYNCHRONISED,
    SHEDDING,
    UNREACHABLE,
    HealthPayload,
    HeartbeatClock,
    HypervisorHealth,
)
from ansible_collections.virtguard.console.plugins.plugin_utils.libvirt_binding import (
    GraphicsAddress,
    GraphicsSubject,
    graphics_callback,
    libvirt,
    libvirt_qemu,
)
from ansible_collections.virtguard.console.plugins.plugin_utils.session_tracking import (
    ChannelAddresses,
    PresentClient,
    SessionTracker,
    SpiceChannel,
)
from ansible_collections.virtguard.console.plugins.plugin_utils.source_arguments import (
    SourceArguments,
    direct_endpoint,
)

LOGGER = logging.getLogger("virtguard.console.libvirt_graphics")  # the source's one logger

# virConnectCloseReason, as numbered by libvirt
CLOSE_REASONS = ("error", "end of file (the daemon went away)", "keepalive timeout", "closed by the client")
# virDomainEventStoppedDetailType, as numbered by libvirt
STOPPED_DETAILS = ("shutdown", "destroyed", "crashed", "migrated", "saved", "failed", "from snapshot")

Payload = Dict[str, Dict[str, Any]]

# The delivery probe's metadata element (a namespace of the source's own: no other program's
# metadata is touched), set and removed in a running domain's live definition.
PROBE_NAMESPACE = "urn:x-virtguard-console:delivery-probe"
PROBE_KEY = "virtguard-probe"

# Asking QEMU which client a live SPICE channel belongs to (only when its address already has an
# open session on the domain): at most this many questions a second per hypervisor, each given
# this long; beyond, the channel joins its address's session as without an answer.
SPICE_QUESTIONS_PER_SECOND = 20
SPICE_QUESTION_TIMEOUT = 2.0
GRAPHICS_CONNECT = 0  # VIR_DOMAIN_EVENT_GRAPHICS_CONNECT
GRAPHICS_INITIALIZE = 1  # VIR_DOMAIN_EVENT_GRAPHICS_INITIALIZE
MAX_HELD_CONNECTS = 1000  # SPICE connects held until their channel's next event (per hypervisor)
LAG_CHECK_INTERVAL = 1.0  # seconds between two calls that time libvirtd's replies
SHED_CALL_TIMEOUT = 60.0  # the replies to shedding's calls wait behind what libvirtd had queued


class Budget:
    """At most ``per_second`` uses in each second (fixed one-second windows of the clock the
    caller passes)."""

    def __init__(self, per_second: int) -> None:
        self.per_second = per_second
        self.window = -1
        self.used = 0

    def take(self, now: float) -> bool:
        window = int(now)
        if window != self.window:
            self.window, self.used = window, 0
        if self.used >= self.per_second:
            return False
        self.used += 1
        return True


def now_iso() -> str:
    return iso_timestamp_utc(time.time())


# What the buffer holds besides live graphics events (tuples), in arrival order with them; the
# feeder asks each for its events with payloads().
class Snapshot:
    """The clients QEMU reported on one hypervisor at one moment, to be merged in order."""

    __slots__ = ("watcher", "present", "spice_ports", "generation", "running", "unqueried")

    def __init__(self, watcher: HypervisorWatcher, present: dict[str, PresentClient],
                 spice_ports: dict[str, set[str]], generation: int, running: dict[str, int] | None = None,
                 unqueried: AbstractSet[str] = frozenset()):
        self.watcher = watcher
        self.present = present
        self.spice_ports = spice_ports  # domain UUID -> its SPICE server's ports
        self.generation = generation
        self.running = running  # domain UUID -> id, of every domain running then (None: not known)
        # UUIDs of running domains QEMU could not be asked about (a monitor busy under a storm):
        # their sessions are neither confirmed nor ended by this snapshot
        self.unqueried = unqueried

    def payloads(self) -> list[Payload]:
        return self.watcher.snapshot_payloads(self)


class DomainStopped:
    """A domain of one hypervisor stopped (lifecycle event STOPPED): its sessions have ended,
    though libvirt reports no disconnect for them."""

    __slots__ = ("watcher", "wall", "name", "uuid", "detail")

    def __init__(self, watcher: HypervisorWatcher, wall: float, name: str, uuid: str, detail: int):
        self.watcher = watcher
        self.wall = wall
        self.name = name
        self.uuid = uuid
        self.detail = detail

    def payloads(self) -> list[Payload]:
        return self.watcher.domain_stopped_payloads(self)


class HealthEvent:
    """A health event of one hypervisor (hypervisor_health), built when its state changed or its
    heartbeat was due."""

    __slots__ = ("watcher", "payload", "heartbeat")

    def __init__(self, watcher: HypervisorWatcher, payload: HealthPayload, heartbeat: bool):
        self.watcher = watcher
        self.payload = payload
        self.heartbeat = heartbeat

    def payloads(self) -> list[Payload]:
        if self.heartbeat:
            self.watcher.heartbeat_pending = False
        return [self.payload]


class HypervisorWatcher:
    """One libvirt connection: connect with backoff, subscribe, snapshot, wait for close."""

    def __init__(self, uri: str, config: SourceArguments, buffer: EventBuffer,
                 executor: concurrent.futures.Executor | None = None):
        self.uri = uri
        # blocking libvirt calls (open has no connect timeout: minutes to an unreachable host)
        # run here; the source gives each watcher a thread of its own, so hosts that hang never
        # hold up the others (asyncio's default pool has only cores + 4 threads)
        self.executor = executor
        self.config = config
        self.buffer = buffer
        self.index = buffer.add_watcher(self)
        self.uuids: dict[tuple[str, int], str] = {}  # (name, id) -> UUID, this connection's
        self.hypervisor: dict[str, str | None] = {"uri": uri, "hostname": None}
        self.sessions = SessionTracker()
        self.spice_ports: dict[str, set[str]] = {}  # domain UUID -> SPICE ports, from the last snapshot
        self.conn: Any = None  # libvirt.virConnect while connected
        self.closed = asyncio.Event()
        self.wakeup = asyncio.Event()  # closed, the buffer overflowed, or a shed is due
        # live events seen since the snapshot in flight was taken (session ids)
        self.snapshot_generation = 0
        self.touched_since_snapshot: set[str] | None = None
        self.overflowed = False
        self.dropped = 0
        self.callback_id = -1
        self.lifecycle_callback_id = -1
        self.on_libvirt_graphics = graphics_callback(self.on_graphics, uri)
        # domains (UUIDs) that stopped since the snapshot in flight was taken: its clients there are gone
        self.stopped_since_snapshot: set[str] = set()
        self.close_reason = "connection closed"
        self.health = HypervisorHealth(uri)
        self.heartbeat_pending = False  # a heartbeat of this hypervisor waits in the buffer
        self.busy_heartbeat_due = False  # a heartbeat follows graphics events (busy_heartbeat_delay)
        # the delivery check: when this connection last delivered an event (monotonic, set on
        # libvirt's thread), and the probe event it waits for
        self.last_delivery = 0.0
        self.metadata_callback_id = -1
        self.probe_seen = asyncio.Event()
        self.blind_reason: str | None = None  # why the last connection was found blind
        self.found_blind = False  # the delivery check closed the current connection
        # shedding: the graphics events a second it takes (counted on libvirt's thread), whether
        # it takes none now, and why the watch loop is to shed
        self.event_budget = Budget(config.max_event_rate)
        self.shedding = False
        self.shed_reason: str | None = None
        self.skipped = 0  # graphics events not taken while shedding
        self.spice_questions = Budget(SPICE_QUESTIONS_PER_SECOND)
        # channel id -> the buffered connect of a SPICE channel held until its next event
        self.held_connects: dict[str, tuple[Any, ...]] = {}

    # -- libvirt callbacks (libvirt's event thread: never block, never raise, and reach the
    #    loop's objects through call_soon_threadsafe only). libvirt-python calls
    #    on_libvirt_graphics (libvirt_binding.graphics_callback), which calls on_graphics. --
    def on_graphics(self, _conn: Any, dom: Any, phase: int, local: GraphicsAddress, remote: GraphicsAddress,
                    auth_scheme: str, subject: GraphicsSubject, _opaque: Any) -> None:
        wall = time.time()
        self.last_delivery = time.monotonic()
        if self.shedding:
            self.skipped += 1
            return
        if self.config.max_event_rate and not self.event_budget.take(wall):
            self.shedding = True
            self.skipped += 1
            self.buffer.call_on_loop(self.on_shed)
            return
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
            if self.config.busy_heartbeat_delay and not self.busy_heartbeat_due:
                self.busy_heartbeat_due = True
                self.buffer.call_on_loop(self.schedule_busy_heartbeat)
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

    def on_lifecycle(self, _conn: Any, dom: Any, event: int, detail: int, _opaque: Any) -> None:
        """A domain started, paused, stopped...: only a stop ends its console sessions (a paused
        domain keeps its clients). Rare, so the UUID is asked each time (``ID()`` is -1 once a
        domain has stopped: the graphics callback's cache cannot tell it)."""
        self.last_delivery = time.monotonic()
        if event != libvirt.VIR_DOMAIN_EVENT_STOPPED:
            return
        try:
            name = dom.name()
            if self.config.watches_domain(name):
                self.buffer.append(DomainStopped(self, time.time(), name, dom.UUIDString(), detail))
        except Exception:  # never raise into libvirt
            LOGGER.exception("%s: cannot take the lifecycle event %r", self.uri, (event, detail))

    def on_metadata(self, _conn: Any, _dom: Any, _mtype: int, nsuri: str | None, _opaque: Any) -> None:
        """A domain's metadata changed: any such event shows that this connection delivers; the
        delivery probe's own one ends its wait."""
        self.last_delivery = time.monotonic()
        if nsuri == PROBE_NAMESPACE:
            self.buffer.call_on_loop(self.probe_seen.set)

    def on_close(self, _conn: Any, reason: int, _opaque: Any) -> None:
        why = CLOSE_REASONS[reason] if 0 <= reason < len(CLOSE_REASONS) else f"reason {reason}"
        self.close_reason = f"connection closed: {why}"
        LOGGER.warning("%s: %s", self.uri, self.close_reason)
        self.buffer.call_on_loop(self.on_closed)

    def on_shed(self) -> None:
        """More graphics events in one second than ``max_event_rate`` (on the loop)."""
        self.request_shed(f"more than {self.config.max_event_rate} graphics events in one second")

    def request_shed(self, why: str) -> None:
        """Ask ``watch`` to stop listening to this hypervisor's graphics events for
        ``shed_seconds`` (``shed``); once, however many ask meanwhile."""
        if self.shed_reason is not None:
            return  # shedding already
        self.shed_reason = f"{why}: not listening for {self.config.shed_seconds:g}s"
        LOGGER.warning("%s: shedding: %s", self.uri, self.shed_reason)
        self.wakeup.set()

    def on_closed(self) -> None:
        self.closed.set()
        self.wakeup.set()

    # -- payloads (called by the feeder, in arrival order) --------------------------------
    def live_payload(self, wall: float, name: str, uuid: str, dom_id: int, phase: int, local: GraphicsAddress,
                     remote: GraphicsAddress, auth_scheme: str, subject: GraphicsSubject,
                     spice: SpiceChannel | None = None) -> Payload:
        domain = {"name": name, "uuid": uuid, "id": dom_id}
        remote_address = address(remote)
        local_address = address(local)
        channel_id = session_id_for(self.uri, uuid, remote_address)
        protocol = self.sessions.protocol_of_channel(channel_id) or live_protocol(
            auth_scheme, local_address, self.spice_ports.get(uuid, frozenset()))
        phase_text = phase_name(phase)
        session_id, session = self.sessions.observe(channel_id, phase_text, time.monotonic(),
                                                    (domain, local_address, remote_address, auth_scheme, subject),
                                                    protocol, spice)
        if self.touched_since_snapshot is not None:
            self.touched_since_snapshot.add(session_id)
        timestamp = iso_timestamp_utc(wall)
        return graphics_payload(phase_text, timestamp, self.hypervisor, domain, local_address, remote_address,
                                auth_scheme, subject, session, protocol=protocol)

    def domain_stopped_payloads(self, stop: DomainStopped) -> list[Payload]:
        """The disconnects of every open session (every channel) of a domain that stopped."""
        ended = self.sessions.end_domain(stop.uuid, time.monotonic())
        self.spice_ports.pop(stop.uuid, None)  # a new start may serve other ports
        if self.touched_since_snapshot is not None:
            self.stopped_since_snapshot.add(stop.uuid)
            self.touched_since_snapshot.update(session_id for session_id, *_rest in ended)
        detail = STOPPED_DETAILS[stop.detail] if 0 <= stop.detail < len(STOPPED_DETAILS) else str(stop.detail)
        if ended:
            LOGGER.info("%s: domain %s stopped (%s): %d console session(s) ended", self.uri, stop.name, detail,
                        len({session_id for session_id, *_rest in ended}))
        timestamp = iso_timestamp_utc(stop.wall)
        return [graphics_payload("disconnect", timestamp, self.hypervisor, domain, local, remote, auth_scheme,
                                 subject, session, protocol=protocol)
                for _sid, session, (domain, local, remote, auth_scheme, subject), protocol in ended]

    def snapshot_payloads(self, snap: Snapshot) -> list[Payload]:
        if snap.generation != self.snapshot_generation:
            return []  # superseded by a later snapshot of the same hypervisor
        touched = self.touched_since_snapshot or set()
        self.touched_since_snapshot = None
        stopped, self.stopped_since_snapshot = self.stopped_since_snapshot, set()
        self.spice_ports = snap.spice_ports
        present = snap.present
        if stopped:  # clients QEMU listed just before their domain stopped
            present = {sid: client for sid, client in present.items() if client.details[0]["uuid"] not in stopped}
        if snap.unqueried:  # not listed because QEMU was not asked: not gone, left as they are
            touched = touched | self.sessions.ids_on_domains(snap.unqueried)
        initialized, gone = self.sessions.reconcile(present, time.monotonic(), touched, snap.running)
        timestamp = now_iso()
        payloads: list[Payload] = []
        for phase, entries in (("initialize", initialized), ("disconnect", gone)):
            for _sid, session, (domain, local, remote, auth_scheme, subject), protocol in entries:
                payloads.append(graphics_payload(phase, timestamp, self.hypervisor, domain, local, remote,
                                                 auth_scheme, subject, session, snapshot=True, protocol=protocol))
        return payloads

    # -- which client a SPICE channel is (on the loop, then the executor) ------------------------
    def live_payloads_now(self, item: tuple[Any, ...]) -> tuple[list[Payload], tuple[Any, ...] | None]:
        """The payloads of the live event ``item`` (as buffered) that can be built now, and the
        held connect to ask QEMU about first, if any.

        The connect of a SPICE channel from an address that already has an open session on its
        domain is held until the channel's next event: it may be another client's main channel
        (one that replaces the first client, or a second client behind the same address), which
        QEMU only lists once the channel is initialized. By then the first client may have
        gone (the new one opens a session of its own anyway); if not, QEMU is asked
        (``ask_spice``). VNC events and every other SPICE event pass at once."""
        _index, _wall, _name, uuid, _dom_id, phase, local, remote, auth_scheme, _subject = item
        if not self.sessions.spice_groups and not self.held_connects:
            return [self.payload_of(item)], None
        remote_address = address(remote)
        channel_id = session_id_for(self.uri, uuid, remote_address)
        held = self.held_connects.pop(channel_id, None)
        if held is not None:
            if phase == GRAPHICS_INITIALIZE and self.sessions.spice_group_open(uuid, remote_address["node"]):
                return [], held
            return [self.payload_of(held), self.payload_of(item)], None
        if (phase == GRAPHICS_CONNECT and self.sessions.spice_group_open(uuid, remote_address["node"])
                and not self.sessions.channel_open(channel_id)
                and live_protocol(auth_scheme, address(local), self.spice_ports.get(uuid, frozenset())) == "spice"):
            if len(self.held_connects) >= MAX_HELD_CONNECTS:  # never more than that: the oldest goes as it is
                oldest = next(iter(self.held_connects))
                payloads = [self.payload_of(self.held_connects.pop(oldest))]
            else:
                payloads = []
            self.held_connects[channel_id] = item
            return payloads, None
        return [self.payload_of(item)], None

    def payload_of(self, item: tuple[Any, ...], spice: SpiceChannel | None = None) -> Payload:
        """``live_payload`` of a buffered live event."""
        _index, wall, name, uuid, dom_id, phase, local, remote, auth_scheme, subject = item
        return self.live_payload(wall, name, uuid, dom_id, phase, local, remote, auth_scheme, subject, spice)

    async def live_payloads(self, item: tuple[Any, ...]) -> list[Payload]:
        """The payloads of the live event ``item``, in order (see ``live_payloads_now``)."""
        payloads, held = self.live_payloads_now(item)
        if held is None:
            return payloads
        spice = None
        if self.config.snapshot and self.conn is not None and self.spice_questions.take(time.monotonic()):
            remote = address(held[7])
            spice = await self.ask_spice(held[3], remote["node"], remote["service"])
        return [self.payload_of(held, spice), self.payload_of(item)]

    def flush_held(self) -> list[Payload]:
        """The held connects, as the address's session's channels (before a domain's stop, a
        snapshot or a health event of this hypervisor is reported)."""
        held, self.held_connects = self.held_connects, {}
        return [self.payload_of(item) for item in held.values()]

    async def ask_spice(self, uuid: str, host: str, port: str) -> SpiceChannel | None:
        """What QEMU says of the SPICE channel of ``host``:``port`` (its type and client), or None
        (gone already, no answer in time, an error: the caller groups it by address)."""
        loop = asyncio.get_running_loop()
        try:
            return await asyncio.wait_for(
                loop.run_in_executor(self.executor, self.query_spice_channel, self.conn, uuid, host, port),
                SPICE_QUESTION_TIMEOUT)
        except (asyncio.TimeoutError, libvirt.libvirtError, ValueError, TypeError) as exc:
            LOGGER.debug("%s: no answer from QEMU about the SPICE channel %s:%s: %r", self.uri, host, port, exc)
            return None

    @staticmethod
    def query_spice_channel(conn: Any, uuid: str, host: str, port: str) -> SpiceChannel | None:
        """Blocking: the channel of ``host``:``port`` in QEMU's ``query-spice`` of the domain
        ``uuid`` (executor thread)."""
        dom = conn.lookupByUUIDString(uuid)
        answer = json.loads(libvirt_qemu.qemuMonitorCommand(dom, json.dumps({"execute": "query-spice"}), 0))
        for channel in (answer.get("return") or {}).get("channels", []):
            if str(channel.get("host")) == host and str(channel.get("port")) == port:
                return SpiceChannel(int(channel["channel-type"]), int(channel["connection-id"]))
        return None

    # -- health (on the loop) ---------------------------------------------------------------
    def enter(self, state: str, reason: str | None) -> None:
        """Enter a health state: a change is logged and reported (``changed: true``), in order
        with this hypervisor's other events; the same state again is no news."""
        previous = self.health.state
        payload = self.health.change(state, reason, time.time())
        if payload is None:
            return
        LOGGER.log(logging.INFO if self.health.first_connection else logging.WARNING,
                   "%s: hypervisor %s (was %s)%s", self.uri, state, previous, f": {reason}" if reason else "")
        self.buffer.append(HealthEvent(self, payload, heartbeat=False))

    def schedule_busy_heartbeat(self) -> None:
        """A heartbeat ``busy_heartbeat_delay`` seconds after a graphics event (on the loop)."""
        asyncio.get_running_loop().call_later(self.config.busy_heartbeat_delay, self.send_busy_heartbeat)

    def send_busy_heartbeat(self) -> None:
        self.busy_heartbeat_due = False
        self.send_heartbeat()

    def send_heartbeat(self) -> None:
        """Report the current state (``changed: false``), unless this hypervisor's previous
        heartbeat still waits in the buffer (a stalled queue): they never pile up."""
        if self.heartbeat_pending:
            return
        self.heartbeat_pending = True
        self.buffer.append(HealthEvent(self, self.health.heartbeat(time.time()), heartbeat=True))

    # -- connection life cycle --------------------------------------------------------------
    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        delay = self.config.reconnect_delay
        endpoint = direct_endpoint(self.uri)
        first = True
        while True:
            if not first and endpoint is not None and not await host_answers(*endpoint, self.config.connect_timeout):
                # libvirt.open would wait for the kernel's SYN retries (over two minutes) and
                # miss the heal of a partition by that much: try again at the next turn instead
                LOGGER.warning("%s: %s:%d did not answer within %.1fs; retrying in %.1fs", self.uri, *endpoint,
                               self.config.connect_timeout, delay)
                self.enter(UNREACHABLE, f"{endpoint[0]}:{endpoint[1]} did not answer within "
                                        f"{self.config.connect_timeout:g}s")
                await asyncio.sleep(max(0.0, delay - self.config.connect_timeout))
                delay = min(delay * 2, self.config.reconnect_max_delay)
                continue
            first = False
            try:
                self.conn = await loop.run_in_executor(self.executor, libvirt.open, self.uri)
            except libvirt.libvirtError as exc:
                LOGGER.warning("%s: cannot connect (%s); retrying in %.1fs", self.uri, exc, delay)
                self.enter(RECONNECTING, f"cannot connect: {exc}")
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.config.reconnect_max_delay)
                continue
            self.close_reason = "connection closed"
            self.found_blind = False
            try:
                await self.watch(loop)
                if not self.found_blind:
                    delay = self.config.reconnect_delay
                reason = self.close_reason
            except libvirt.libvirtError as exc:
                LOGGER.warning("%s: connection lost (%s)", self.uri, exc)
                reason = f"connection lost: {exc}"
            except Exception as exc:  # never let one hypervisor's failure end its watch for good
                LOGGER.exception("%s: unexpected error; reconnecting", self.uri)
                reason = f"unexpected error: {exc!r}"
            finally:
                await self.disconnect(loop)
            if self.health.state == SHEDDING:  # closed while shedding: connect again once it is over
                LOGGER.warning("%s: %s; connecting again in %gs", self.uri, reason, self.config.shed_seconds)
                await asyncio.sleep(self.config.shed_seconds)
                continue
            if self.found_blind:
                # at once the first time (leaving may have cleared libvirt's stuck queue); blind
                # again at once means another listener keeps it stuck: back off as for failures
                again = self.health.state == RESYNCHRONISED and self.health.previous == BLIND
                self.enter(BLIND, self.blind_reason)
                if not again:
                    continue
            else:
                self.enter(RECONNECTING, reason)
            LOGGER.info("%s: reconnecting in %.1fs", self.uri, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.config.reconnect_max_delay)

    async def watch(self, loop: asyncio.AbstractEventLoop) -> None:
        conn = self.conn
        self.closed.clear()
        self.uuids = {}  # ids may start over with another daemon
        if self.config.keepalive_interval:
            conn.setKeepAlive(self.config.keepalive_interval, self.config.keepalive_count)
        conn.registerCloseCallback(self.on_close, None)
        skipped = self.skipped
        self.shedding, self.shed_reason, self.skipped = False, None, 0
        self.callback_id = self.subscribe(conn)
        self.hypervisor = {"uri": self.uri, "hostname": await loop.run_in_executor(self.executor, conn.getHostname)}
        LOGGER.info("%s: watching graphics events on %s", self.uri, self.hypervisor["hostname"])
        self.health.hostname = self.hypervisor["hostname"]
        # before the snapshot, whose events follow it
        if self.health.state == BLIND:
            self.enter(RESYNCHRONISED, f"connected again after a blind connection ({self.blind_reason})")
        elif self.health.state == SHEDDING:
            self.enter(RESYNCHRONISED, f"connected again after shedding {skipped} events")
        else:
            self.enter(CONNECTED, None)
        self.last_delivery = connected = time.monotonic()
        check: asyncio.Future[None] | None = None
        lag = asyncio.ensure_future(self.check_lag(loop)) if self.config.max_reply_lag else None
        try:
            if self.config.snapshot:
                await self.take_snapshot(loop)
            if self.config.delivery_check_interval:  # after the snapshot, whose calls it would wait behind
                check = asyncio.ensure_future(self.check_delivery(loop, connected))
            while True:
                self.wakeup.clear()
                if self.closed.is_set():
                    return
                if self.shed_due():
                    if not await self.shed(loop):
                        return
                    continue
                if self.overflowed:
                    await self.resume_after_overflow(loop)
                    continue
                await self.wakeup.wait()
        finally:
            for task in (check, lag):
                if task is not None:
                    task.cancel()

    # -- libvirtd's lag -------------------------------------------------------------------------
    async def check_lag(self, loop: asyncio.AbstractEventLoop) -> None:
        """Every second, a cheap call (``getLibVersion``) whose reply libvirtd queues behind the
        events it has queued for this connection: no reply within ``max_reply_lag`` seconds
        means that queue grows (libvirtd dispatches a storm's events slower than they come, and
        holds them all). Then the hypervisor is shed, as for ``max_event_rate``, if events still
        come meanwhile: a late reply with nothing else coming is a partition or a hung daemon,
        which keepalive finds (the connection is closed, and opened again)."""
        limit = self.config.max_reply_lag
        while True:
            await asyncio.sleep(LAG_CHECK_INTERVAL)
            if self.shed_due() or self.shedding or self.conn is None:
                continue
            call = loop.run_in_executor(None, self.conn.getLibVersion)
            try:
                await asyncio.wait_for(asyncio.shield(call), limit)
            except asyncio.TimeoutError:
                if time.monotonic() - self.last_delivery > limit + LAG_CHECK_INTERVAL:
                    # nothing comes either: a partition or a hung daemon, keepalive's to find
                    await asyncio.gather(call, return_exceptions=True)
                    continue
                self.request_shed(f"libvirtd answered no call within {limit:g}s (its queue of events for "
                                  "this source grows)")
                await asyncio.gather(call, return_exceptions=True)  # the reply, however late, before the next
            except libvirt.libvirtError:
                return  # the connection's end is the close callback's to report

    # -- the delivery check -------------------------------------------------------------------
    async def check_delivery(self, loop: asyncio.AbstractEventLoop, connected: float) -> None:
        """Whenever this connection has delivered no event for ``delivery_check_interval``
        seconds, probe it; a probe whose event does not come marks the connection blind and
        closes it (``run`` connects again at once). A connection where no probe can be made
        (read-only, no running domain) is said so in the log, and checked again later.

        A new connection is probed at once, unless an event came already: subscribing during
        a storm can meet libvirt's race itself, and a daemon may keep an earlier listener's
        stuck queue, so a blind start is found within ``delivery_check_timeout``. ``connected``
        is when the connection was made (``last_delivery`` then)."""
        interval = self.config.delivery_check_interval
        probe_now = self.last_delivery == connected  # nothing came since the connection
        warned = False
        while True:
            quiet = time.monotonic() - self.last_delivery
            if quiet < interval and not probe_now:
                await asyncio.sleep(interval - quiet)
                continue
            probe_now = False
            outcome = await self.probe_delivery(loop)
            if outcome is None:
                warned = False
                continue
            blind, reason = outcome
            if blind:
                self.blind_reason, self.found_blind = reason, True
                LOGGER.error("%s: blind: %s; connecting again", self.uri, reason)
                self.close_reason = f"blind: {reason}"
                self.on_closed()
                return
            if not warned:
                LOGGER.warning("%s: delivery not checked: %s", self.uri, reason)
                warned = True
            self.last_delivery = time.monotonic()  # try again one interval later

    async def probe_delivery(self, loop: asyncio.AbstractEventLoop) -> tuple[bool, str] | None:
        """Set and remove the probe's metadata element on one running watched domain and wait
        for libvirt's metadata event: None when it came (or any other event did), (True, why)
        when the connection is blind, (False, why) when no probe could be made."""
        started = time.monotonic()
        self.probe_seen.clear()
        timeout = self.config.delivery_check_timeout
        try:
            probed = await asyncio.wait_for(loop.run_in_executor(self.executor, self.set_probe, self.conn), timeout)
        except asyncio.TimeoutError:
            return True, f"the delivery probe's libvirt calls did not return within {timeout:g}s"
        except libvirt.libvirtError as exc:
            return False, f"the delivery probe cannot set a domain's metadata ({exc})"
        if probed is None:
            return False, "no running domain to probe"
        try:
            await asyncio.wait_for(self.probe_seen.wait(), max(0.0, timeout - (time.monotonic() - started)))
        except asyncio.TimeoutError:
            if self.last_delivery > started:
                return None  # another event came: this connection delivers
            return True, f"the delivery probe on domain {probed} got no event within {timeout:g}s"
        return None

    def set_probe(self, conn: Any) -> str | None:
        """Blocking: set, then remove, the probe's metadata element in the live definition of the
        first running watched domain; its name, or None when none runs (executor thread)."""
        for dom in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
            name: str = dom.name()
            if not self.config.watches_domain(name):
                continue
            dom.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, "<probe/>", PROBE_KEY, PROBE_NAMESPACE,
                            libvirt.VIR_DOMAIN_AFFECT_LIVE)
            dom.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, None, None, PROBE_NAMESPACE,
                            libvirt.VIR_DOMAIN_AFFECT_LIVE)
            return name
        return None

    def subscribe(self, conn: Any) -> int:
        """Register the graphics callback: once, then drop it and register it again; then the
        lifecycle callback (``lifecycle_callback_id``), after that dance, which needs this
        connection to have no other listener for a moment.

        libvirt (seen with 9.0; the race is in virObjectEventStateQueueRemote) can keep an event
        stuck in a daemon's queue when the last listener leaves just as QEMU reports one, for
        example an earlier run of this source stopped during a burst. Every listener after that
        receives nothing until all of them have left at once. Dropping our only callback makes
        this connection leave for a moment, which clears such a queue when no other program
        listens. While the source stays subscribed the queue cannot get stuck, so this is needed
        once per connection. The snapshot that follows reports the sessions that opened meanwhile."""
        first = conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_GRAPHICS, self.on_libvirt_graphics, None)
        conn.domainEventDeregisterAny(first)
        callback_id: int = conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_GRAPHICS,
                                                       self.on_libvirt_graphics, None)
        # a domain that stops raises no graphics disconnect for its clients: its lifecycle event tells
        self.lifecycle_callback_id = conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE,
                                                                 self.on_lifecycle, None)
        # the delivery check's probe comes back as a metadata event
        self.metadata_callback_id = conn.domainEventRegisterAny(
            None, libvirt.VIR_DOMAIN_EVENT_ID_METADATA_CHANGE, self.on_metadata, None)
        return callback_id

    def shed_due(self) -> bool:
        """Whether a storm above ``max_event_rate`` waits to be shed (``on_shed`` said so)."""
        return self.shed_reason is not None

    async def shed(self, loop: asyncio.AbstractEventLoop) -> bool:
        """Stop listening to graphics events for ``shed_seconds``, so that libvirtd queues none
        for this connection, then listen again and take a snapshot. The lifecycle and metadata
        callbacks stay: the daemon never sees this connection leave (which could leave its event
        queue stuck, see ``subscribe``), and a domain's stop still ends its sessions. False when
        the connection did not answer (the caller closes it; ``run`` waits, then connects again).
        A snapshot may have stopped listening already (``stop_listening``): the wait starts then."""
        conn = self.conn
        if self.callback_id != -1 and not await self.stop_listening(loop):
            return False
        try:
            await asyncio.wait_for(self.closed.wait(), self.config.shed_seconds)
            return False  # the connection closed meanwhile
        except asyncio.TimeoutError:
            pass
        done, callback_id = await self.call_unless_closed(loop, conn.domainEventRegisterAny, None,
                                                          libvirt.VIR_DOMAIN_EVENT_ID_GRAPHICS,
                                                          self.on_libvirt_graphics, None)
        if not done:
            return False
        self.callback_id = callback_id
        skipped, self.skipped = self.skipped, 0
        self.shedding, self.shed_reason = False, None
        self.enter(RESYNCHRONISED, f"listening again after shedding {skipped} events")
        if self.config.snapshot:
            await self.take_snapshot(loop)
        return True

    async def stop_listening(self, loop: asyncio.AbstractEventLoop) -> bool:
        """Shedding's first step, as soon as it is due: deregister the graphics callback.
        libvirtd stops queueing graphics events for this connection as soon as it reads the
        call; its reply waits behind the events it had queued already, however many. False
        when the connection did not answer (``close_reason`` says why)."""
        self.shedding = True
        self.enter(SHEDDING, self.shed_reason)
        done, _result = await self.call_unless_closed(loop, self.conn.domainEventDeregisterAny, self.callback_id)
        if done:
            self.callback_id = -1
        return done

    async def call_unless_closed(self, loop: asyncio.AbstractEventLoop, call: Any, *args: Any) -> tuple[bool, Any]:
        """Run a libvirt call of shedding (its reply may wait behind all that libvirtd has queued
        for this connection, up to SHED_CALL_TIMEOUT): ``(True, its result)``; ``(False, None)``,
        with the reason to close the connection, when it failed, did not return in time, or the
        connection closed first."""
        future = loop.run_in_executor(None, call, *args)
        closing = asyncio.ensure_future(self.closed.wait())
        done, _pending = await asyncio.wait([future, closing], timeout=SHED_CALL_TIMEOUT,
                                            return_when=asyncio.FIRST_COMPLETED)
        closing.cancel()
        if future in done and future.exception() is None:
            return True, future.result()
        if future in done:
            self.close_reason = f"shedding: libvirt refused a call ({future.exception()!r})"
        elif not self.closed.is_set():
            self.close_reason = f"shedding: libvirtd did not answer within {SHED_CALL_TIMEOUT:g}s"
        return False, None

    async def resume_after_overflow(self, loop: asyncio.AbstractEventLoop) -> None:
        """Wait until the queue has drained the buffer to half, then listen again and let a
        snapshot tell what the dropped events would have."""
        while len(self.buffer) > self.buffer.limit // 2 and not self.closed.is_set():
            await asyncio.sleep(0.05)
        LOGGER.warning("%s: resuming after dropping %d events; resynchronising by snapshot",
                       self.uri, self.dropped)
        self.overflowed = False
        self.dropped = 0
        await self.take_snapshot(loop)

    async def take_snapshot(self, loop: asyncio.AbstractEventLoop) -> None:
        self.snapshot_generation += 1
        generation = self.snapshot_generation
        # Live events from here on win over what the snapshot says about the same session.
        self.touched_since_snapshot = set()
        self.stopped_since_snapshot = set()
        query = loop.run_in_executor(self.executor, self.query_clients, self.conn)
        # the questions' replies wait behind the events libvirtd queued for this connection: a
        # storm that comes meanwhile is shed at once, not once they are answered (libvirtd
        # would queue its events all along)
        while not query.done():
            self.wakeup.clear()
            woken: asyncio.Future[Any] = asyncio.ensure_future(self.wakeup.wait())
            await asyncio.wait([query, woken], return_when=asyncio.FIRST_COMPLETED)
            woken.cancel()
            due = self.shed_due() and self.callback_id != -1 and not self.closed.is_set()
            if due and not await self.stop_listening(loop):
                self.on_closed()  # the caller's loop closes the connection once the questions end
        present, ports, running, unqueried = query.result()
        self.buffer.append(Snapshot(self, present, ports, generation, running, unqueried))

    def query_clients(self, conn: Any) -> tuple[dict[str, PresentClient], dict[str, set[str]], dict[str, int],
                                                set[str]]:
        """Blocking: every console client QEMU reports, keyed by session id, each domain's SPICE
        ports by domain UUID, the id of every running domain by UUID, and the UUIDs of the
        domains QEMU could not be asked about (executor thread)."""
        present: dict[str, PresentClient] = {}
        ports: dict[str, set[str]] = {}
        unqueried: set[str] = set()
        listed = [(dom, {"name": dom.name(), "uuid": dom.UUIDString(), "id": dom.ID()})
                  for dom in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)]
        running = {domain["uuid"]: domain["id"] for _dom, domain in listed}
        for dom, domain in listed:
            if not self.config.watches_domain(domain["name"]):
                continue
            for command, parse in (("query-vnc", clients_from_query_vnc), ("query-spice", clients_from_query_spice)):
                try:
                    answer = libvirt_qemu.qemuMonitorCommand(dom, json.dumps({"execute": command}), 0)
                except libvirt.libvirtError as exc:
                    if exc.get_error_code() == libvirt.VIR_ERR_OPERATION_DENIED:
                        LOGGER.warning("%s: no snapshot of console clients: %s (the source needs a "
                                       "read-write connection)", self.uri, exc)
                        return present, ports, running, unqueried
                    if command == "query-vnc" or "CommandNotFound" not in str(exc):
                        # a domain stopping now, or a monitor busy under a storm: its sessions stay
                        LOGGER.warning("%s: %s on %s failed, its sessions are kept as they were: %s",
                                       self.uri, command, domain["name"], exc)
                        unqueried.add(domain["uuid"])
                        break  # a busy monitor would make the next question wait as long
                    continue
                result = json.loads(answer).get("return")
                channel_locals = {}
                if command == "query-spice":
                    ports[domain["uuid"]] = spice_ports(result)
                    channel_locals = spice_channel_locals(result)
                for local, remote, auth_scheme, subject, protocol, channel_remotes in parse(result):
                    channels = [session_id_for(self.uri, domain["uuid"], channel) for channel in channel_remotes]
                    addresses: list[ChannelAddresses] = [
                        (channel_locals.get((channel["node"], channel["service"]), local), channel)
                        for channel in channel_remotes]
                    present[channels[0]] = PresentClient((domain, local, remote, auth_scheme, subject), protocol,
                                                         channels, addresses)
        return present, ports, running, unqueried

    async def disconnect(self, loop: asyncio.AbstractEventLoop) -> None:
        conn, self.conn = self.conn, None
        if conn is None:
            return
        for undo in (lambda: conn.domainEventDeregisterAny(self.callback_id),
                     lambda: conn.domainEventDeregisterAny(self.lifecycle_callback_id),
                     lambda: conn.domainEventDeregisterAny(self.metadata_callback_id),
                     conn.unregisterCloseCallback):
            try:
                undo()
            except (libvirt.libvirtError, AttributeError):
                pass
        try:
            await loop.run_in_executor(self.executor, conn.close)
        except libvirt.libvirtError:
            pass


async def host_answers(host: str, port: int, timeout: float) -> bool:
    """Whether ``host`` answers a TCP connection to ``port`` within ``timeout`` seconds. A
    refusal or a name that does not resolve is an answer too: libvirt's own attempt then fails
    at once and says why; only silence (a partition, a host that is down) is not."""
    try:
        _reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except asyncio.TimeoutError:
        return False
    except OSError:
        return True
    writer.close()
    try:
        await writer.wait_closed()
    except OSError:
        pass
    return True


async def feed(queue: asyncio.Queue[dict[str, Any]], buffer: EventBuffer) -> None:
    """Move events from the buffer to the queue in arrival order, waiting for room."""
    while True:
        item = await buffer.get()
        if not isinstance(item, tuple):  # a Snapshot, DomainStopped or HealthEvent
            try:
                payloads = item.watcher.flush_held() + item.payloads()
            except Exception:  # one failure must not stop the others
                LOGGER.exception("%s: cannot build the events of %s", item.watcher.uri, type(item).__name__)
                continue
            for payload in payloads:
                await queue.put(payload)
            continue
        watcher = buffer.watchers[item[0]]
        try:
            payloads = await watcher.live_payloads(item)
        except Exception:  # one malformed event must not stop the others
            LOGGER.exception("%s: cannot build the event for %r", watcher.uri, item[5:])
            continue
        for payload in payloads:
            await queue.put(payload)


async def send_heartbeats(watchers: list[HypervisorWatcher], interval: float) -> None:
    """Every ``interval`` seconds, each hypervisor's health event with ``changed: false``,
    whatever its connection does (a filter uses them as a clock)."""
    clock = HeartbeatClock(interval, time.monotonic())
    while True:
        await asyncio.sleep(clock.delay(time.monotonic()))
        if clock.due(time.monotonic()):
            for watcher in watchers:
                watcher.send_heartbeat()
