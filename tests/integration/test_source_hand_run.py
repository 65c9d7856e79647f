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


def test_libvirts_own_error_printing_is_replaced_by_the_sources_log(hypervisor, tmp_path):
    """libvirt prints every error to stderr unless told otherwise: a hypervisor that cannot be
    reached would show each failed attempt twice, once as a bare "libvirt: ... error" line that
    does not say which hypervisor. The source's log line names it; libvirt's goes to debug."""
    dead = f"qemu+unix:///session?socket={tmp_path}/nobody-listens"
    run = HandRun(dead, hypervisor.uri)
    try:
        run.wait_for_log("watching graphics events")
        failed = run.wait_for_log(f"{dead}: cannot connect")
    finally:
        code = run.stop()
    assert "Failed to connect socket" in failed  # libvirt's reason is in the source's line
    assert [line for line in run.log if line.startswith("libvirt:")] == []
    assert code == 0
