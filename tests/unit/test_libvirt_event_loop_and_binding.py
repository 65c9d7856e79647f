"""libvirt's event loop for the source (plugin_utils.libvirt_event_loop) and the binding's
version checks and error logging (plugin_utils.libvirt_binding). libvirt and libvirtaio are
replaced where a test must see what would happen on a failure the real ones do not give on
demand; the references workaround is in test_libvirt_binding_leak.py, the real loop in every
integration test of the source."""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time
from types import SimpleNamespace

import pytest

from ansible_collections.virtguard.console.plugins.plugin_utils import libvirt_binding, libvirt_event_loop
from ansible_collections.virtguard.console.plugins.plugin_utils.libvirt_binding import (
    graphics_references_leak,
    version_tuple,
)
from ansible_collections.virtguard.console.plugins.plugin_utils.libvirt_event_loop import ensure_libvirt_event_loop

LOGGER = "virtguard.console.libvirt_graphics"


# -- the binding's versions ---------------------------------------------------------------------
@pytest.mark.parametrize("text, parsed", [("9.0.0", (9, 0, 0)), ("12.8", (12, 8)), ("10", (10,)),
                                          ("9.0.0rc1", None), ("", None), ("a.b", None)])
def test_versions_are_integer_tuples_or_none(text, parsed):
    assert version_tuple(text) == parsed


@pytest.mark.parametrize("version, leaks", [
    ("1.2.20", False), ("1.2.21", True), ("9.0.0", True), ("12.8.0", True), ("12.8.1", False), ("13.0.0", False),
    ("12.7.99", True), (None, False), ("", False), ("9.0.0.dev1", False),
])
def test_only_the_checked_versions_get_their_references_back(version, leaks):
    assert graphics_references_leak(version) is leaks


def test_an_unchecked_binding_is_said_at_start(monkeypatch, caplog):
    caplog.set_level(logging.WARNING, LOGGER)
    monkeypatch.setattr(libvirt_binding, "RELEASE_GRAPHICS_REFERENCES", True)
    libvirt_binding.warn_if_unchecked()
    assert caplog.records == []
    monkeypatch.setattr(libvirt_binding, "RELEASE_GRAPHICS_REFERENCES", False)
    monkeypatch.setattr(libvirt_binding, "LIBVIRT_PYTHON_VERSION", "13.1.0")
    libvirt_binding.warn_if_unchecked()
    [record] = caplog.records
    assert record.levelno == logging.WARNING
    assert record.getMessage().startswith("libvirt-python 13.1.0 is not one of the versions checked for keeping "
                                          "the arguments of graphics callbacks (1.2.21 to 12.8.0)")
    monkeypatch.setattr(libvirt_binding, "LIBVIRT_PYTHON_VERSION", None)
    libvirt_binding.warn_if_unchecked()
    assert caplog.records[-1].getMessage().startswith("libvirt-python (version unknown) is not one")


def test_libvirts_errors_go_to_the_sources_log_at_debug_not_to_stderr(caplog, capfd):
    libvirt = libvirt_binding.libvirt
    caplog.set_level(logging.DEBUG, LOGGER)
    libvirt_binding.log_libvirt_errors()
    try:
        with pytest.raises(libvirt.libvirtError):
            libvirt.open("virtguard-no-such-driver:///system")
    finally:
        libvirt.registerErrorHandler(None, None)  # libvirt's own handler again
    records = [r for r in caplog.records if r.getMessage().startswith("libvirt error ")]
    assert records and all(r.levelno == logging.DEBUG for r in records)
    # (code, domain, message): what libvirt says depends on whether a daemon runs here
    assert re.match(r"^libvirt error \d+ \(domain \d+\): \S", records[0].getMessage()), records[0].getMessage()
    assert "libvirt:" not in capfd.readouterr().err
    # the control: libvirt's own handler prints to stderr
    with pytest.raises(libvirt.libvirtError):
        libvirt.open("virtguard-no-such-driver:///system")
    assert "libvirt:" in capfd.readouterr().err


# -- the event loop ---------------------------------------------------------------------------------
class FakeLibvirt:
    def __init__(self, register: int = 0, runs: list[int] | None = None) -> None:
        self.register = register
        self.registered = 0
        self.runs = runs or []

    def virEventRegisterDefaultImpl(self) -> int:  # noqa: N802 (libvirt's name)
        self.registered += 1
        return self.register

    def virEventRunDefaultImpl(self) -> int:  # noqa: N802
        if not self.runs:
            raise SystemExit  # ends the loop of the test's thread
        return self.runs.pop(0)

    def virGetLastErrorMessage(self) -> str:  # noqa: N802
        return "poll failed"


def no_event_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    """As if no source of this process had started libvirt's loop yet."""
    monkeypatch.setattr(libvirt_event_loop, "EVENT_THREAD_NAME", "virtguard test: no such thread")


async def test_the_loop_is_registered_and_started_once_per_process(monkeypatch):
    fake = FakeLibvirt()
    monkeypatch.setattr(libvirt_event_loop, "libvirt", fake)
    monkeypatch.setattr(libvirt_event_loop, "libvirtaio", None)
    started: list[str] = []
    monkeypatch.setattr(threading, "Thread",
                        lambda target, name, daemon: SimpleNamespace(start=lambda: started.append(name)))
    no_event_thread(monkeypatch)
    ensure_libvirt_event_loop()
    assert fake.registered == 1 and started == ["virtguard test: no such thread"]
    # a thread of that name runs: nothing more
    monkeypatch.setattr(libvirt_event_loop, "EVENT_THREAD_NAME", threading.current_thread().name)
    ensure_libvirt_event_loop()
    assert fake.registered == 1 and len(started) == 1


async def test_a_loop_that_cannot_be_registered_fails_the_start(monkeypatch):
    monkeypatch.setattr(libvirt_event_loop, "libvirt", FakeLibvirt(register=-1))
    monkeypatch.setattr(libvirt_event_loop, "libvirtaio", None)
    no_event_thread(monkeypatch)
    with pytest.raises(RuntimeError, match="^libvirt's default event loop could not be registered$"):
        ensure_libvirt_event_loop()


async def test_libvirtaio_registered_first_is_kept_on_its_own_loop_and_refused_on_another(monkeypatch):
    fake = FakeLibvirt()
    monkeypatch.setattr(libvirt_event_loop, "libvirt", fake)
    impl = SimpleNamespace(loop=asyncio.get_running_loop())
    monkeypatch.setattr(libvirt_event_loop, "libvirtaio", SimpleNamespace(getCurrentImpl=lambda: impl))
    no_event_thread(monkeypatch)
    ensure_libvirt_event_loop()
    assert fake.registered == 0
    impl.loop = asyncio.new_event_loop()
    try:
        with pytest.raises(RuntimeError, match="already registered on another event loop"):
            ensure_libvirt_event_loop()
    finally:
        impl.loop.close()
    assert fake.registered == 0
    # a libvirtaio with nothing registered: libvirt's default loop
    monkeypatch.setattr(libvirt_event_loop, "libvirtaio", SimpleNamespace(getCurrentImpl=lambda: None))
    monkeypatch.setattr(threading, "Thread",
                        lambda target, name, daemon: SimpleNamespace(start=lambda: None))
    ensure_libvirt_event_loop()
    assert fake.registered == 1


def test_the_loop_logs_a_failed_iteration_and_goes_on(monkeypatch, caplog):
    fake = FakeLibvirt(runs=[0, -1, 0, -1])
    monkeypatch.setattr(libvirt_event_loop, "libvirt", fake)
    sleeps: list[float] = []
    monkeypatch.setattr(time, "sleep", sleeps.append)
    caplog.set_level(logging.ERROR, LOGGER)
    with pytest.raises(SystemExit):
        libvirt_event_loop._run_libvirt_events()
    assert fake.runs == []  # every iteration ran
    assert [r.getMessage() for r in caplog.records] == ["libvirt's event loop failed: poll failed"] * 2
    assert sleeps == [0.1, 0.1]
