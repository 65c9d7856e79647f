# Copyright: virtguard.console contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Remediation in batches, one run at a time per hypervisor host, so that its cost grows with
hypervisors, not with offending addresses.

Every offender the policy finds (an open console session to cut, or a network to block for
brute force) waits in its host's queue. The queue is sent as one batch (one playbook run that
blocks every network and cuts every session of it) when no run of that host is in flight, on
the event that found the offender or on the first event after the run in flight ended.

A run is in flight until every session it was sent to cut has disconnected: that disconnect is
the run's own result coming back through libvirt, so the event that ends one run carries the
next batch. A run that does not cut everything (the playbook failed, the host was unreachable)
is given up after ``lease`` seconds; its sessions that are still open go into the next batch.
An offending session is never taken as "covered": it stays in the queue until its disconnect.

Pure logic: times come from the caller (monotonic seconds), nothing here does I/O.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Any

DEFAULT_MAX_BATCH = 1000
DEFAULT_MAX_OFFENDERS = 100_000


@dataclass
class Offender:
    """One offending session (``session_id`` set) or one network to block (brute force)."""

    session_id: str
    address: str
    network: str
    client_port: int | None
    console_port: int | None
    reasons: list[str]
    sent_at: float | None = None

    def as_batch_entry(self) -> dict[str, Any]:
        return {"session_id": self.session_id, "address": self.address, "network": self.network,
                "client_port": self.client_port, "console_port": self.console_port,
                "reasons": list(self.reasons)}


@dataclass
class HostQueue:
    """The offenders of one hypervisor host and the run in flight."""

    # session id (or "net:" + network for block-only offenders) -> offender, in arrival order
    offenders: collections.OrderedDict[str, Offender] = field(default_factory=collections.OrderedDict)
    in_flight: set[str] = field(default_factory=set)
    sent_at: float | None = None
    runs: int = 0


class RemediationBatches:
    """The queues of every hypervisor host of one activation.

    ``lease`` bounds how long a run is waited for; ``max_batch`` how many offenders one run
    takes; ``max_offenders`` the offenders held over all hosts (the oldest are forgotten first;
    the run that blocks their network still cuts every console connection from it)."""

    def __init__(self, lease: float, max_batch: int = DEFAULT_MAX_BATCH,
                 max_offenders: int = DEFAULT_MAX_OFFENDERS) -> None:
        self.lease = lease
        self.max_batch = max_batch
        self.max_offenders = max_offenders
        self.hosts: dict[str, HostQueue] = {}
        self.held = 0
        self.forgotten = 0

    def add(self, host: str, offender: Offender) -> None:
        """Queue an offender (a session already queued keeps its place and its state)."""
        queue = self.hosts.setdefault(host, HostQueue())
        key = offender.session_id or f"net:{offender.network}"
        known = queue.offenders.get(key)
        if known is not None:
            if offender.session_id:
                for reason in offender.reasons:
                    if reason not in known.reasons:
                        known.reasons.append(reason)
                return
            if known.sent_at is not None:  # a network to block again: a new attempt
                del queue.offenders[key]
                self.held -= 1
        if key not in queue.offenders:
            queue.offenders[key] = offender
            self.held += 1
            self._bound()

    def ended(self, host: str, session_id: str) -> bool:
        """A session disconnected; True when it was an offender."""
        queue = self.hosts.get(host)
        if queue is None or not session_id:
            return False
        queue.in_flight.discard(session_id)
        known = queue.offenders.pop(session_id, None) is not None
        if known:
            self.held -= 1
        if not queue.offenders and not queue.in_flight:
            del self.hosts[host]
        return known

    def in_flight(self, host: str, now: float) -> bool:
        queue = self.hosts.get(host)
        return bool(queue and queue.in_flight and queue.sent_at is not None and now - queue.sent_at < self.lease)

    def take_batch(self, host: str, now: float) -> list[Offender]:
        """The next batch of ``host`` if one should be sent now (nothing in flight, offenders
        waiting, or the run in flight has outlived its lease); empty otherwise."""
        queue = self.hosts.get(host)
        if queue is None or not queue.offenders or self.in_flight(host, now):
            return []
        batch: list[Offender] = []
        for offender in queue.offenders.values():
            waiting = offender.sent_at is None or now - offender.sent_at >= self.lease
            if waiting:
                batch.append(offender)
                if len(batch) >= self.max_batch:
                    break
        if not batch:
            return []
        queue.in_flight = {o.session_id for o in batch if o.session_id}
        queue.sent_at = now
        queue.runs += 1
        for offender in batch:
            offender.sent_at = now
            if not offender.session_id:  # nothing comes back for a block alone
                del queue.offenders[f"net:{offender.network}"]
                self.held -= 1
        if not queue.offenders and not queue.in_flight:
            del self.hosts[host]
        return batch

    def waiting(self, host: str) -> int:
        queue = self.hosts.get(host)
        return sum(1 for o in queue.offenders.values() if o.sent_at is None) if queue else 0

    def _bound(self) -> None:
        while self.held > self.max_offenders:
            host, queue = next((h, q) for h, q in self.hosts.items() if q.offenders)
            key, _offender = queue.offenders.popitem(last=False)
            queue.in_flight.discard(key)
            self.held -= 1
            self.forgotten += 1
            if not queue.offenders and not queue.in_flight:
                del self.hosts[host]
