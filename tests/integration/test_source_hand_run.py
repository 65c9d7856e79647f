"""The source's documented hand run (docs/payload.md) against a real hypervisor: a real VNC
session's events are printed on stdout, one JSON event a line."""

from __future__ import annotations

import pytest

from lab import rfb
from lab.source_runner import HandRun

pytestmark = pytest.mark.slow


def test_the_hand_run_prints_a_real_sessions_events(hypervisor):
    run = HandRun(hypervisor.uri)
    try:
        run.wait_for_log("watching graphics events")  # subscribed
        sock = rfb.open_session("127.0.0.1", hypervisor.domains[0].vnc_port)
        client_port = str(sock.getsockname()[1])
        sock.close()
        events = run.events(3, remote__service=client_port)
    finally:
        code = run.stop()
    assert [e["phase"] for e in events] == ["connect", "initialize", "disconnect"]
    assert {e["hypervisor"]["uri"] for e in events} == {hypervisor.uri}
    assert events[2]["session"]["duration_exact"] is True
    assert code == 0
