"""A snapshot that could not ask QEMU about a domain (its monitor busy under a storm, a call
timed out) must not report that domain's sessions as ended: they are kept as they were, and
the failure is logged. Sessions of the domains it did ask about are reconciled as usual."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import libvirt
import libvirt_qemu
import pytest

from ansible_collections.virtguard.console.plugins.plugin_utils.hypervisor_watcher import Snapshot
from lab.source_runner import FakeDomain, watcher_without_daemon

QUERY_VNC_EMPTY = json.dumps({"return": {"enabled": True, "clients": []}})


class FakeConnection:
    def __init__(self, domains: list[FakeDomain]) -> None:
        self.domains = domains

    def listAllDomains(self, flags: int) -> list[FakeDomain]:  # noqa: N802 (libvirt's name)
        return self.domains


def monitor_error(code: int, text: str) -> libvirt.libvirtError:
    """A libvirt error saying ``text``: libvirtError takes the thread's last libvirt error's
    message when there is one (another test's), so the message is set here."""
    error = libvirt.libvirtError(text)
    error.args = (text,)
    error.err = (code, 0, text, 0, "", None, None, 0, 0)
    return error


def busy_monitor(failing: str) -> Any:
    """qemuMonitorCommand for FakeDomains: ``failing``'s monitor times out, every other
    domain has no VNC client and no SPICE server."""
    def command(dom: FakeDomain, text: str, flags: int) -> str:
        if dom.name() == failing:
            raise monitor_error(libvirt.VIR_ERR_OPERATION_TIMEOUT,
                                "Timed out during operation: cannot acquire state change lock")
        if json.loads(text)["execute"] == "query-spice":
            return json.dumps({"return": {"enabled": False, "migrated": False, "channels": []}})
        return QUERY_VNC_EMPTY
    return command


@pytest.mark.parametrize("busy", ["web", None])
async def test_a_domain_qemu_could_not_be_asked_about_keeps_its_sessions(
        busy: str | None, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    watcher = watcher_without_daemon(asyncio.get_running_loop())
    web, db = FakeDomain("web", 1, "uuid-w"), FakeDomain("db", 2, "uuid-d")
    for dom, port in ((web, "40000"), (db, "40001")):  # one open session on each domain
        client = {"family": 0, "node": "192.0.2.7", "service": port}
        watcher.on_graphics(None, dom, 0, client, client, "none", [], None)
        watcher.live_payload(*watcher.buffer.take()[1:])
    monkeypatch.setattr(libvirt_qemu, "qemuMonitorCommand", busy_monitor(busy or "none"))

    with caplog.at_level(logging.WARNING, logger="virtguard.console.libvirt_graphics"):
        present, ports, running, unqueried = watcher.query_clients(FakeConnection([web, db]))
    watcher.snapshot_generation = 1
    gone = watcher.snapshot_payloads(Snapshot(watcher, present, ports, 1, running, unqueried))

    ended = sorted(p["graphics"]["domain"]["name"] for p in gone if p["graphics"]["phase"] == "disconnect")
    if busy == "web":
        assert unqueried == {"uuid-w"}
        assert ended == ["db"]  # db was asked: its client is gone; web's session is kept
        assert "query-vnc on web failed, its sessions are kept as they were" in caplog.text
    else:  # the control: both asked, both clients gone
        assert unqueried == set()
        assert ended == ["db", "web"]


class RecordingConnection(FakeConnection):
    def __init__(self, domains: list[FakeDomain]) -> None:
        super().__init__(domains)
        self.flags: list[int] = []

    def listAllDomains(self, flags: int) -> list[FakeDomain]:  # noqa: N802 (libvirt's name)
        self.flags.append(flags)
        return self.domains


async def test_qemu_is_asked_both_questions_about_each_watched_running_domain(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    watcher = watcher_without_daemon(asyncio.get_running_loop())
    watcher.config.domains = ["web*"]
    asked: list[tuple[str, str, int]] = []

    def command(dom: FakeDomain, text: str, flags: int) -> str:
        asked.append((dom.name(), json.loads(text)["execute"], flags))
        if json.loads(text)["execute"] == "query-spice":
            if dom.name() == "web-old":  # a QEMU without SPICE: not an error, its VNC answer counts
                raise monitor_error(libvirt.VIR_ERR_INTERNAL_ERROR, "CommandNotFound: query-spice")
            return json.dumps({"return": {"enabled": False, "migrated": False, "channels": []}})
        return QUERY_VNC_EMPTY

    monkeypatch.setattr(libvirt_qemu, "qemuMonitorCommand", command)
    conn = RecordingConnection([FakeDomain("web-1", 1, "uuid-1"), FakeDomain("db", 2, "uuid-d"),
                                FakeDomain("web-old", 3, "uuid-o")])
    with caplog.at_level(logging.WARNING, logger="virtguard.console.libvirt_graphics"):
        present, ports, running, unqueried = watcher.query_clients(conn)
    assert conn.flags == [libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE]
    assert asked == [("web-1", "query-vnc", 0), ("web-1", "query-spice", 0), ("web-old", "query-vnc", 0),
                     ("web-old", "query-spice", 0)]
    assert (present, ports, running, unqueried) == ({}, {"uuid-1": set()}, {"uuid-1": 1, "uuid-d": 2, "uuid-o": 3},
                                                    set())
    assert caplog.records == []


async def test_a_read_only_connection_is_said_once_and_a_missing_vnc_command_is_a_failure(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    watcher = watcher_without_daemon(asyncio.get_running_loop())
    denied = monitor_error(libvirt.VIR_ERR_OPERATION_DENIED, "operation forbidden: read only access")

    def read_only(dom: FakeDomain, text: str, flags: int) -> str:
        raise denied

    monkeypatch.setattr(libvirt_qemu, "qemuMonitorCommand", read_only)
    with caplog.at_level(logging.WARNING, logger="virtguard.console.libvirt_graphics"):
        result = watcher.query_clients(FakeConnection([FakeDomain("a", 1, "uuid-a"), FakeDomain("b", 2, "uuid-b")]))
    assert result == ({}, {}, {"uuid-a": 1, "uuid-b": 2}, set())
    assert [r.getMessage() for r in caplog.records] == [
        f"{watcher.uri}: no snapshot of console clients: {denied} (the source needs a read-write connection)"]

    caplog.clear()
    missing = monitor_error(libvirt.VIR_ERR_INTERNAL_ERROR, "CommandNotFound: query-vnc")

    def no_vnc(dom: FakeDomain, text: str, flags: int) -> str:
        raise missing

    monkeypatch.setattr(libvirt_qemu, "qemuMonitorCommand", no_vnc)
    with caplog.at_level(logging.WARNING, logger="virtguard.console.libvirt_graphics"):
        result = watcher.query_clients(FakeConnection([FakeDomain("a", 1, "uuid-a")]))
    assert result[3] == {"uuid-a"}
    assert [r.getMessage() for r in caplog.records] == [
        f"{watcher.uri}: query-vnc on a failed, its sessions are kept as they were: {missing}"]
