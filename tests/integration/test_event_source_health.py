"""The source's health events (``{"hypervisor": {...}}``) against a real session daemon that
stops and starts again: a change of state once each, logged, and heartbeats all along."""

from __future__ import annotations

import asyncio
import datetime
import logging
import socket

import pytest

from lab.source_log import SOURCE_LOGGER, SourceLog
from lab.source_runner import SourceRun

pytestmark = pytest.mark.slow


async def test_health_events_follow_the_daemon_and_heartbeats_keep_coming_while_it_is_down(
        hypervisor, source_log: SourceLog):
    args = {"uri": hypervisor.uri, "snapshot": False, "heartbeat_interval": 0.5, "reconnect_delay": 0.2,
            "reconnect_max_delay": 1}
    try:
        async with SourceRun(args) as run:
            [up] = await run.wait_for_health(1, state="connected", changed=True)
            await run.wait_for_health(1, state="connected", changed=False)
            await asyncio.to_thread(hypervisor.stop_daemon)
            [down] = await run.wait_for_health(1, state="reconnecting", changed=True)
            beats = len(run.health_matching(state="reconnecting", changed=False))
            await run.wait_for_health(beats + 2, state="reconnecting", changed=False)  # while nothing answers
            await asyncio.to_thread(hypervisor.start_daemon)
            [_up, again] = await run.wait_for_health(2, state="connected", changed=True)
            events = list(run.health)
    finally:
        if hypervisor.virsh("version", check=False).returncode != 0:  # failed while it was down
            await asyncio.to_thread(hypervisor.start_daemon)

    assert up == {"uri": hypervisor.uri, "hostname": socket.gethostname(), "state": "connected",
                  "previous": "connecting", "changed": True, "reason": None, "timestamp": up["timestamp"]}
    assert datetime.datetime.fromisoformat(up["timestamp"]).utcoffset() == datetime.timedelta(0)
    assert (down["previous"], down["hostname"]) == ("connected", socket.gethostname())
    assert "connection closed" in down["reason"]
    assert (again["previous"], again["reason"]) == ("reconnecting", None)
    # one event per change, and every heartbeat says the state the last change entered
    assert [e["state"] for e in events if e["changed"]] == ["connected", "reconnecting", "connected"]
    state = "connecting"
    for event in events:
        if event["changed"]:
            state = event["state"]
        assert event["state"] == state and event["uri"] == hypervisor.uri
    logged = [(r.levelno, r.getMessage()) for r in source_log.caplog.records
              if r.name == SOURCE_LOGGER and ": hypervisor " in r.getMessage()]
    assert [(level, message.split(": hypervisor ", 1)[1].split(":")[0]) for level, message in logged] == [
        (logging.INFO, "connected (was connecting)"),
        (logging.WARNING, "reconnecting (was connected)"),
        (logging.WARNING, "connected (was reconnecting)"),
    ]
    assert all(message.startswith(f"{hypervisor.uri}: ") for _level, message in logged)
