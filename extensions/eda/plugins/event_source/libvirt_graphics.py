"""libvirt_graphics: who opens the graphical consoles (VNC, SPICE) of libvirt domains.

An ansible-rulebook event source: one connection per libvirt URI, libvirt's graphics
events (connect, initialize, disconnect) as ``{"graphics": {...}}`` events, a snapshot of
the clients already connected whenever a connection is (re)established, the disconnect of every
session of a domain that stops, and the health of each connection as ``{"hypervisor": {...}}``
events. The work is done in
plugins/plugin_utils/ (source_arguments, event_buffer, hypervisor_watcher, libvirt_binding,
libvirt_event_loop); this file is the plugin: its documentation and ``main(queue, args)``.

Run by hand from a clone of the repository, after ``make deps`` (docs/payload.md)::

    .venv/bin/python extensions/eda/plugins/event_source/libvirt_graphics.py [URI ...]
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
  - "A domain that stops (shut down, destroyed, crashed, saved, migrated away: libvirt's lifecycle
    event C(VIR_DOMAIN_EVENT_STOPPED)) ends its console sessions, though libvirt reports no graphics
    disconnect for them: the source reports the C(disconnect) of every open channel of each, with
    C(session.ended_by=domain). A paused domain keeps its clients."
  - A hypervisor that is down or unreachable is retried with exponential backoff; the other
    URIs keep working.
  - "The state of each connection (C(connecting), C(connected), C(reconnecting), C(unreachable)) is
    reported as C({\"hypervisor\": {...}}) events: one with C(changed=true) at every change, logged at
    WARNING (INFO for the first C(connected)), and one with C(changed=false) every O(heartbeat_interval)
    seconds, and O(busy_heartbeat_delay) seconds after its graphics events."
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
    description: Seconds (more than 0) before the first reconnection attempt; doubled after each failure.
    type: float
    default: 1
  reconnect_max_delay:
    description: Upper bound of the reconnection delay in seconds; at least O(reconnect_delay).
    type: float
    default: 60
  connect_timeout:
    description:
      - Seconds (more than 0) a reconnection to a C(qemu+tls://), C(qemu+tcp://) or remote C(qemu://)
        URI waits for the host to answer on libvirt's port. Silence counts as a failed attempt, and
        the next one follows the reconnection delay; without it a connection attempt to a
        partitioned host waits for the kernel's SYN retries (over two minutes) and can miss the heal
        by that much. SSH URIs are not probed (ssh's own configuration says where it connects; set
        C(ConnectTimeout) there).
    type: float
    default: 5
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
  heartbeat_interval:
    description:
      - Seconds between the periodic health events of each hypervisor (C(changed=false), the current
        state), which come whatever the connection does; a filter can use them as a clock.
        C(0) switches them off; the events of a change of state stay. Otherwise at least C(0.1).
    type: float
    default: 10
  busy_heartbeat_delay:
    description:
      - A hypervisor's health event (C(changed=false)) also follows its graphics events by this
        many seconds, one at a time; while its consoles are busy, a filter's clock ticks that often
        (the classify filter sends a second remediation run at the start of a storm on it).
        C(0) switches it off. Otherwise at least C(0.1).
    type: float
    default: 0.5
  delivery_check_interval:
    description:
      - Seconds without any event from a hypervisor after which the source checks that its
        connection still delivers events. It sets and then removes a metadata element of its
        own (namespace C(urn:x-virtguard-console:delivery-probe)) in the live definition of one
        running domain, and waits for libvirt's metadata event. A connection whose probe event
        does not come is reported C(blind), dropped and opened again at once; the snapshot of
        the new connection (state C(resynchronised)) reports what was missed.
      - C(0) switches the check off. The check needs a read-write connection, as the snapshot does.
    type: float
    default: 20
  delivery_check_timeout:
    description:
      - Seconds the delivery check waits for its metadata event (more than 0).
    type: float
    default: 10
  max_event_rate:
    description:
      - Graphics events a second from one hypervisor above which the source sheds it. libvirt
        queues events for a listener that reads slower than they come without bound, so a storm
        of console connections would grow libvirtd's memory; instead the source stops listening
        to that hypervisor's graphics events (reported C(shedding)), so the daemon queues none
        for it, listens again after C(shed_seconds) and reports by snapshot the sessions still
        open (C(resynchronised)). The sessions that began and ended meanwhile are not reported
        one by one. Domain stops are still listened to.
      - C(0) never sheds.
    type: int
    default: 4000
  shed_seconds:
    description:
      - Seconds a shed hypervisor's graphics events are not listened to (more than 0).
    type: float
    default: 10
  max_reply_lag:
    description:
      - Seconds libvirtd may take to answer a cheap call (asked every second) before the source
        sheds the hypervisor. libvirtd queues a call's reply behind the events it holds for the
        connection, so a late reply means that queue grows (libvirtd itself dispatches a storm's
        events slower than they come). Only while events still come; a late reply with nothing
        else coming is a partition, which keepalive finds. C(0) (the default) does not check. In
        the lab, shedding on a late reply did not stop libvirtd's growth (docs/performance.md,
        section 15).
    type: float
    default: 0
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
      # once per client: a SPICE client's other channels have session.primary false
      condition: event.graphics.phase == "initialize" and event.graphics.session.primary == true
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
    protocol:
      description:
        - C(vnc) or C(spice). A SPICE client opens several channels (connections), each with its own
          events; they are one session (below).
      type: str
    snapshot: {description: True for events derived from a snapshot of connected clients., type: bool}
    timestamp: {description: ISO-8601 with time zone, when the source received the event., type: str}
    hypervisor: {description: "C(uri) as configured and C(hostname) from libvirt.", type: dict}
    domain: {description: "C(name), C(uuid) and C(id) of the domain.", type: dict}
    local: {description: "The server address, C(family) (ipv4, ipv6, unix), C(node), C(service).", type: dict}
    remote: {description: "The client address, C(family), C(node), C(service), verbatim.", type: dict}
    auth_scheme: {description: The authentication scheme verbatim (none, vnc, vencrypt+x509+sasl...)., type: str}
    subject: {description: "The identities verbatim, in order, as C(type) and C(name).", type: list, elements: dict}
    identity:
      description: "The identities by type: C(x509dname), C(sasl_username); absent when not given."
      type: dict
    session:
      description: The client session the event belongs to.
      type: dict
      contains:
        id:
          description:
            - Stable per client session (32 hex digits); the same on every channel event of one SPICE client.
          type: str
        primary:
          description:
            - True on the events of the connection that opened the session (always for VNC; the main
              channel for SPICE), so C(session.primary) selects one connect, initialize and disconnect
              per client.
          type: bool
        channels: {description: The client's open channels (connections) after the event., type: int}
        authenticated:
          description: True from C(initialize) on; on C(disconnect), whether the session ever initialized.
          type: bool
        duration_s:
          description:
            - On the primary C(disconnect) only. Seconds from when the source first saw the session to
              its end; null for a session the source never saw begin.
          type: float
        duration_exact:
          description:
            - On C(disconnect) only. True when the source saw the session begin (C(connect)) and end
              (this live C(disconnect), or its domain's stop), so C(duration_s) is its length.
            - False otherwise. A disconnect found by a snapshot (the session ended while the source was
              not connected) has an upper bound as C(duration_s); a session first seen by a snapshot
              or after its C(connect) has a lower bound.
          type: bool
        ended_by:
          description:
            - On every C(disconnect). C(client) for a disconnect libvirt reported (and a session a snapshot
              found gone from a domain that still runs); C(domain) when the session's domain stopped
              (lifecycle event, or a snapshot that found the domain's run gone).
          type: str
hypervisor:
  description:
    - The health of one hypervisor's connection, put on the queue as C(event.hypervisor) (no C(graphics)
      key). docs/payload.md describes it.
  type: dict
  returned: >-
    at every change of state, every O(heartbeat_interval) seconds, and O(busy_heartbeat_delay)
    seconds after graphics events
  contains:
    uri: {description: The URI as configured., type: str}
    hostname: {description: The host name libvirt gave at the last connection; null before the first., type: str}
    state: {description: "C(connecting), C(connected), C(reconnecting) or C(unreachable).", type: str}
    previous: {description: The state before the current one; null while C(connecting)., type: str}
    changed: {description: True when the state just changed; false on the periodic events., type: bool}
    reason: {description: Why the current state was entered (null for C(connected))., type: str}
    timestamp: {description: ISO-8601 in UTC, when the source made the event., type: str}
"""

import asyncio
import concurrent.futures
import json
import logging
import os
import sys
from typing import Any


def make_collection_importable() -> None:
    """Make ``ansible_collections.virtguard.console`` importable when it is not already.

    ansible-rulebook loads this file by path (runpy) from an installed collection,
    .../ansible_collections/virtguard/console/extensions/eda/plugins/event_source/: the
    directory above ``ansible_collections`` goes on sys.path. Run by hand from a clone, the
    file is not under ``ansible_collections``: the link that ``make deps`` makes,
    build/collections/ansible_collections/virtguard/console, stands for the collection."""
    try:
        import ansible_collections.virtguard.console.plugins.plugin_utils  # noqa: F401
        return
    except ImportError:
        pass
    parts = os.path.abspath(__file__).split(os.sep)
    if "ansible_collections" in parts:
        top = os.sep.join(parts[: len(parts) - 1 - parts[::-1].index("ansible_collections")])
        sys.path.append(top or os.sep)
        return
    clone = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), *[os.pardir] * 4))
    collections_dir = os.path.join(clone, "build", "collections")
    if os.path.isdir(os.path.join(collections_dir, "ansible_collections", "virtguard", "console")):
        sys.path.append(collections_dir)


make_collection_importable()

from ansible_collections.virtguard.console.plugins.plugin_utils.event_buffer import EventBuffer  # noqa: E402
from ansible_collections.virtguard.console.plugins.plugin_utils.hypervisor_watcher import (  # noqa: E402
    HypervisorWatcher,
    feed,
    send_heartbeats,
)
from ansible_collections.virtguard.console.plugins.plugin_utils.libvirt_binding import (  # noqa: E402
    LIBVIRT_IMPORT_ERROR,
    log_libvirt_errors,
    warn_if_unchecked,
)
from ansible_collections.virtguard.console.plugins.plugin_utils.libvirt_event_loop import (  # noqa: E402
    ensure_libvirt_event_loop,
)
from ansible_collections.virtguard.console.plugins.plugin_utils.source_arguments import (  # noqa: E402
    SourceArguments,
)


async def main(queue: asyncio.Queue[dict[str, Any]], args: dict[str, Any]) -> None:
    """Watch the graphics and lifecycle events of every configured hypervisor, and report the
    health of each connection, until cancelled."""
    config = SourceArguments(args)
    if LIBVIRT_IMPORT_ERROR is not None:
        raise RuntimeError(f"libvirt-python is required: {LIBVIRT_IMPORT_ERROR}")
    log_libvirt_errors()
    ensure_libvirt_event_loop()
    warn_if_unchecked()
    buffer = EventBuffer(config.max_buffered_events, asyncio.get_running_loop())
    # a thread per hypervisor for its blocking libvirt calls: unreachable hosts never starve the others
    executor = concurrent.futures.ThreadPoolExecutor(max_workers=len(config.uris),
                                                     thread_name_prefix="libvirt_graphics connect")
    watchers = [HypervisorWatcher(uri, config, buffer, executor) for uri in config.uris]
    tasks = [asyncio.create_task(w.run(), name=f"libvirt_graphics {w.uri}") for w in watchers]
    if config.heartbeat_interval:
        tasks.append(asyncio.create_task(send_heartbeats(watchers, config.heartbeat_interval),
                                         name="libvirt_graphics heartbeats"))
    try:
        await feed(queue, buffer)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        executor.shutdown(wait=False, cancel_futures=True)


class PrintingQueue(asyncio.Queue[dict[str, Any]]):
    """The hand run's queue: every event printed as one line of JSON on stdout."""

    async def put(self, item: dict[str, Any]) -> None:
        print(json.dumps(item), flush=True)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    try:
        asyncio.run(main(PrintingQueue(), {"uri": sys.argv[1:] or ["qemu:///system"]}))
    except KeyboardInterrupt:
        pass
