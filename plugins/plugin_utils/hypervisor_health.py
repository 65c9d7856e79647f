# Copyright: virtguard.console contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The health of the event source's connection to each hypervisor, as events a rule or the
classify filter can match: the one place that says what ``event.hypervisor`` looks like.

::

    {"hypervisor": {"uri": str, "hostname": str|None, "state": str, "previous": str|None,
                    "changed": bool, "reason": str|None, "timestamp": ISO-8601 UTC}}

One event with ``changed: true`` at every change of state, and every heartbeat interval one
with ``changed: false`` and the current state, whatever the connection does (a filter uses them
as a clock). Pure logic with the time passed in, so tests need no clock and no daemon.

A state is a name in ``STATES``; every change goes through ``HypervisorHealth.change``, which
accepts any move between two known states other than back to ``connecting``: ``blind`` (a
connection that is up but delivers no event, found by the source's delivery probe) and
``shedding`` (a storm above ``max_event_rate``: the connection closed for a while) and
``resynchronised`` (the new connection after a blind one or after shedding, with its snapshot)
included.
"""

from __future__ import annotations

from typing import Any, Dict

from ansible_collections.virtguard.console.plugins.plugin_utils.graphics_event import iso_timestamp_utc

CONNECTING = "connecting"
CONNECTED = "connected"
RECONNECTING = "reconnecting"
UNREACHABLE = "unreachable"
BLIND = "blind"
SHEDDING = "shedding"
RESYNCHRONISED = "resynchronised"

# Every state and what it means (docs/payload.md says the same).
STATES = {
    CONNECTING: "not connected yet since the source started (the initial state, never reported as a change)",
    CONNECTED: "connected and subscribed: console events of this hypervisor reach the source",
    RECONNECTING: "the connection was lost or could not be opened; the source retries with backoff",
    UNREACHABLE: "the host did not answer on libvirt's port within connect_timeout; the source retries",
    BLIND: "connected, but a delivery probe's event did not come back: the source drops the connection and "
           "connects again at once",
    SHEDDING: "more graphics events a second than max_event_rate: the source has closed the connection "
              "for shed_seconds, so that the daemon queues nothing for it, then connects again",
    RESYNCHRONISED: "connected again after a blind connection or after shedding: the snapshot that follows "
                    "reports the sessions that opened or ended while the source did not listen",
}

HealthPayload = Dict[str, Dict[str, Any]]


def health_payload(uri: str, hostname: str | None, state: str, previous: str | None, changed: bool,
                   reason: str | None, timestamp: str) -> HealthPayload:
    """The event put on the rulebook queue: ``{"hypervisor": {...}}``."""
    return {
        "hypervisor": {
            "uri": uri,
            "hostname": hostname,
            "state": state,
            "previous": previous,
            "changed": changed,
            "reason": reason,
            "timestamp": timestamp,
        }
    }


class HypervisorHealth:
    """The state of one hypervisor's connection, and the events that report it.

    ``previous`` is the state before the current one (None while still ``connecting``), on the
    change events and the heartbeats alike; ``reason`` says why the current state was entered.
    ``hostname`` is the one libvirt gave at the last connection (None until the first)."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.hostname: str | None = None
        self.state = CONNECTING
        self.previous: str | None = None
        self.reason: str | None = None
        self.connections = 0  # how many times the state became connected

    def change(self, state: str, reason: str | None, wall: float) -> HealthPayload | None:
        """Enter ``state`` at the wall-clock time ``wall``: the event that reports the change, or
        None when the hypervisor is in that state already (a retry that fails again changes
        nothing). ValueError for a name not in STATES, or ``connecting`` again."""
        if state not in STATES or state == CONNECTING:
            raise ValueError(f"{state!r} is not a state a hypervisor can enter (known: {', '.join(STATES)})")
        if state == self.state:
            return None
        self.previous, self.state, self.reason = self.state, state, reason
        if state in (CONNECTED, RESYNCHRONISED):
            self.connections += 1
        return self.payload(True, wall)

    @property
    def first_connection(self) -> bool:
        """Whether the current state is the first ``connected`` of this hypervisor: the one
        change that is no news (logged at INFO; every other change is a WARNING)."""
        return self.state == CONNECTED and self.connections == 1

    def heartbeat(self, wall: float) -> HealthPayload:
        """The periodic event: the current state, unchanged."""
        return self.payload(False, wall)

    def payload(self, changed: bool, wall: float) -> HealthPayload:
        return health_payload(self.uri, self.hostname, self.state, self.previous, changed, self.reason,
                              iso_timestamp_utc(wall))


class HeartbeatClock:
    """When the periodic health events are due: every ``interval`` seconds from ``now`` (a
    monotonic clock). A beat that could not be taken in time (the loop was busy) is taken once,
    late, and the next one follows ``interval`` after it: beats missed never come in a burst."""

    def __init__(self, interval: float, now: float) -> None:
        if interval <= 0:
            raise ValueError(f"a heartbeat interval must be more than 0, got {interval!r}")
        self.interval = interval
        self.next_at = now + interval

    def delay(self, now: float) -> float:
        """Seconds from ``now`` until the next beat is due (0 when it is due)."""
        return max(0.0, self.next_at - now)

    def due(self, now: float) -> bool:
        """Whether a beat is due at ``now``; if so it is taken, and the next one scheduled."""
        if now < self.next_at:
            return False
        self.next_at += self.interval
        if self.next_at <= now:
            self.next_at = now + self.interval
        return True
