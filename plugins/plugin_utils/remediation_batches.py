# Copyright: virtguard.console contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Remediation in batches, at most two runs at a time per hypervisor host, so that its cost
grows with hypervisors, not with offending addresses.

Every offender the policy finds (an open console session to cut, or a network to block for
brute force) waits in its host's queue. The queue is sent as one batch (one playbook run that
blocks every network and cuts every session of it) when no run of that host is in flight, on
the event that found the offender or on the first event after the run in flight ended.

A run is in flight until every session it was sent to cut has disconnected: that disconnect is
the run's own result coming back through libvirt, so the event that ends one run carries the
next batch. A run that does not cut everything (the playbook failed, the host was unreachable)
is given up after ``lease`` seconds; its sessions that are still open go into the next batch.
An offending session is never taken as "covered": it stays in the queue until its disconnect.

A second run goes beside the first only at the start of a storm: while the run in flight is
young (sent less than ``second_run_window`` seconds ago, so most of its ansible-playbook run is
still ahead), on the first heartbeat of the host at which an offender has waited
``second_run_wait`` seconds. A heartbeat, not any event: the source sends it after every event
it had by then (its busy heartbeat follows a host's graphics events by 0.5 s), so the second
run takes every offender that had arrived, where an event in the middle of a storm would send
the few the filter had seen so far. Otherwise those offenders would wait the whole first run,
then their own: about two runs from their connect to their cut. Never more than two:
on 2 cores, runs side by side each get slower (each ansible-playbook run is about 1.5 s of CPU),
and an unbounded number of them made a storm slower than waiting (docs/performance.md).

A network to block with no session (brute force) holds nothing, since nothing comes back for it;
it is sent once per ``lease``: further failures from it meanwhile are refused by that block.

Pure logic: times come from the caller (monotonic seconds), nothing here does I/O.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Any

DEFAULT_MAX_BATCH = 1000
DEFAULT_MAX_OFFENDERS = 100_000
MAX_RUNS_IN_FLIGHT = 2
DEFAULT_SECOND_RUN_WAIT = 0.25
DEFAULT_SECOND_RUN_WINDOW = 1.0


@dataclass
class Offender:
    """One offending session (``session_id`` set) or one network to block (brute force).

    ``block`` False: the session is cut alone, by its exact connection (address and client
    port), and nothing is blocked: its address is one the policy may never block (trusted, or a
    console proxy's, shared by everyone behind it)."""

    session_id: str
    address: str
    network: str
    client_port: int | None
    console_port: int | None
    reasons: list[str]
    sent_at: float | None = None
    block: bool = True
    queued_at: float = 0.0

    def as_batch_entry(self) -> dict[str, Any]:
        return {"session_id": self.session_id, "address": self.address, "network": self.network,
                "client_port": self.client_port, "console_port": self.console_port,
                "reasons": list(self.reasons), "block": self.block}


@dataclass
class Run:
    """A run sent and not known to be over: the sessions it was sent to cut, still open."""

    sent_at: float
    sessions: set[str]


@dataclass
class HostQueue:
    """The offenders of one hypervisor host and its runs in flight (oldest first)."""

    # session id (or "net:" + network for block-only offenders) -> offender, in arrival order
    offenders: collections.OrderedDict[str, Offender] = field(default_factory=collections.OrderedDict)
    running: list[Run] = field(default_factory=list)


class RemediationBatches:
    """The queues of every hypervisor host of one activation.

    ``lease`` bounds how long a run is waited for; ``max_batch`` how many offenders one run
    takes; ``max_offenders`` the offenders held over all hosts (the oldest are forgotten first;
    the run that blocks their network still cuts every console connection from it).
    ``second_run_wait`` and ``second_run_window``: when a second run goes beside a young one
    (module docstring); a wait of 0 keeps one run in flight per host."""

    def __init__(self, lease: float, max_batch: int = DEFAULT_MAX_BATCH,
                 max_offenders: int = DEFAULT_MAX_OFFENDERS, second_run_wait: float = DEFAULT_SECOND_RUN_WAIT,
                 second_run_window: float = DEFAULT_SECOND_RUN_WINDOW) -> None:
        self.lease = lease
        self.max_batch = max_batch
        self.max_offenders = max_offenders
        self.second_run_wait = second_run_wait
        self.second_run_window = second_run_window
        self.hosts: dict[str, HostQueue] = {}
        self.held = 0
        self.forgotten = 0
        # (host, network) -> when a block alone was sent, so a brute force sends it once a lease
        self.blocks_sent: collections.OrderedDict[tuple[str, str], float] = collections.OrderedDict()

    def add(self, host: str, offender: Offender, now: float = 0.0) -> None:
        """Queue an offender (a session already queued keeps its place and its state; a block
        alone already sent within the lease is not queued again)."""
        queue = self.hosts.setdefault(host, HostQueue())
        if not offender.session_id:
            sent = self.blocks_sent.get((host, offender.network))
            if sent is not None and now - sent < self.lease:
                return
        key = offender.session_id or f"net:{offender.network}"
        known = queue.offenders.get(key)
        if known is not None:
            for reason in offender.reasons:
                if reason not in known.reasons:
                    known.reasons.append(reason)
            return
        offender.queued_at = now
        queue.offenders[key] = offender
        self.held += 1
        self._bound()

    def ended(self, host: str, session_id: str) -> bool:
        """A session disconnected; True when it was an offender."""
        queue = self.hosts.get(host)
        if queue is None or not session_id:
            return False
        for run in queue.running:
            run.sessions.discard(session_id)
        known = queue.offenders.pop(session_id, None) is not None
        if known:
            self.held -= 1
        self._forget_if_idle(host, queue)
        return known

    def holds(self, host: str, session_id: str) -> bool:
        """Whether the session is a queued or sent offender of ``host``."""
        queue = self.hosts.get(host)
        return bool(session_id) and queue is not None and session_id in queue.offenders

    def in_flight(self, host: str, now: float) -> list[Run]:
        """The runs of ``host`` still in flight (sessions of them still open, within the lease),
        oldest first."""
        queue = self.hosts.get(host)
        if queue is None:
            return []
        queue.running = [run for run in queue.running if run.sessions and now - run.sent_at < self.lease]
        return queue.running

    def take_batch(self, host: str, now: float, heartbeat: bool = False) -> list[Offender]:
        """The next batch of ``host`` if one should be sent now (``heartbeat``: the event is the
        host's heartbeat, which may send a second run); empty otherwise."""
        queue = self.hosts.get(host)
        if queue is None or not queue.offenders:
            return []
        waiting = [o for o in queue.offenders.values() if o.sent_at is None or now - o.sent_at >= self.lease]
        if not waiting or not self._may_send(self.in_flight(host, now), waiting, now, heartbeat):
            return []
        batch = waiting[:self.max_batch]
        queue.running.append(Run(now, {o.session_id for o in batch if o.session_id}))
        for offender in batch:
            offender.sent_at = now
            if not offender.session_id:  # nothing comes back for a block alone
                del queue.offenders[f"net:{offender.network}"]
                self.held -= 1
                self.blocks_sent.pop((host, offender.network), None)
                self.blocks_sent[(host, offender.network)] = now
                if len(self.blocks_sent) > self.max_offenders:
                    self.blocks_sent.popitem(last=False)
        self._forget_if_idle(host, queue)
        return batch

    def _may_send(self, running: list[Run], waiting: list[Offender], now: float, heartbeat: bool) -> bool:
        """No run in flight; or, on a heartbeat, one young run and an offender that has waited
        long enough."""
        if not running:
            return True
        if not heartbeat or len(running) >= MAX_RUNS_IN_FLIGHT or self.second_run_wait <= 0:
            return False
        return (now - running[0].sent_at < self.second_run_window
                and now - min(o.queued_at for o in waiting) >= self.second_run_wait)

    def _forget_if_idle(self, host: str, queue: HostQueue) -> None:
        if not queue.offenders and not any(run.sessions for run in queue.running):
            del self.hosts[host]

    def _bound(self) -> None:
        while self.held > self.max_offenders:
            host, queue = next((h, q) for h, q in self.hosts.items() if q.offenders)
            key, _offender = queue.offenders.popitem(last=False)
            for run in queue.running:
                run.sessions.discard(key)
            self.held -= 1
            self.forgotten += 1
            self._forget_if_idle(host, queue)
