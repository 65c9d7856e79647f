"""libvirt-python keeps a reference to the address dicts and the subject list of every graphics
callback; the source gives it back, for the binding versions known to keep it only (giving back
a reference the binding did release would free objects still in use), and never raises into the
binding (which would then release the arguments itself).

The binding's part is played here by hand: ``binding_call`` takes a reference to each argument,
as libvirt-override.c does, and calls the callback."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import sys
from collections.abc import Iterable, Iterator

import pytest

from ansible_collections.virtguard.console.plugins.plugin_utils import libvirt_binding
from ansible_collections.virtguard.console.plugins.plugin_utils.libvirt_binding import (
    GraphicsAddress,
    GraphicsHandler,
    GraphicsSubject,
)
from lab.source_runner import FakeDomain, watcher_without_daemon

# (local, remote, subject): what libvirt-python builds for one graphics callback
GraphicsArguments = tuple[GraphicsAddress, GraphicsAddress, GraphicsSubject]


@pytest.mark.parametrize("version, leaks", [
    ("1.2.21", True), ("9.0.0", True), ("11.10.0", True), ("12.8.0", True),
    ("1.2.20", False), ("12.8.1", False), ("12.9.0", False), ("13.0.0", False),
    ("12.8.0rc1", False), ("", False), (None, False),
])
def test_only_versions_known_to_keep_the_references(version, leaks):
    assert libvirt_binding.graphics_references_leak(version) is leaks


def test_the_installed_binding_is_one_the_source_knows():
    """The bench and the tests run a binding whose behaviour was checked (test_event_source:
    nothing of libvirt's arguments is left behind); a newer one must be checked, then listed."""
    assert libvirt_binding.RELEASE_GRAPHICS_REFERENCES, (
        f"libvirt-python {libvirt_binding.LIBVIRT_PYTHON_VERSION} is not in the checked range "
        f"{libvirt_binding.GRAPHICS_REFERENCES_LEAK_IN}: check whether it still keeps the graphics "
        "callback's arguments, then update GRAPHICS_REFERENCES_LEAK_IN")


def graphics_arguments() -> GraphicsArguments:
    return {"family": 0, "node": "::1", "service": "5900"}, {"family": 0, "node": "::1"}, [("x509dname", "CN=a")]


def refcounts(objects: Iterable[object]) -> list[int]:
    return [sys.getrefcount(obj) for obj in objects]


def binding_call(callback: GraphicsHandler, dom: FakeDomain, local: GraphicsAddress, remote: GraphicsAddress,
                 subject: GraphicsSubject, keeps_references: bool) -> None:
    """What libvirt-python does for one graphics event: build the arguments, keep a reference to
    each of local, remote and subject when ``keeps_references`` (the leak), call the callback."""
    if keeps_references:
        for kept in (local, remote, subject):
            ctypes.pythonapi.Py_IncRef(ctypes.py_object(kept))
    callback(None, dom, 0, local, remote, "none", subject, None)


@pytest.fixture
def guarded() -> Iterator[GraphicsArguments]:
    """Graphics arguments with one extra reference held for the test's whole length, so that a
    reference wrongly given back shows as a count one too low instead of freeing live objects."""
    objects = graphics_arguments()
    for obj in objects:
        ctypes.pythonapi.Py_IncRef(ctypes.py_object(obj))
    yield objects
    for obj in objects:
        ctypes.pythonapi.Py_DecRef(ctypes.py_object(obj))


def test_the_watchers_callback_gives_back_the_reference_the_binding_kept_once(monkeypatch, guarded: GraphicsArguments):
    monkeypatch.setattr(libvirt_binding, "RELEASE_GRAPHICS_REFERENCES", True)
    watcher = watcher_without_daemon(asyncio.new_event_loop())
    before = refcounts(guarded)
    binding_call(watcher.on_libvirt_graphics, FakeDomain("web", 1, "uuid"), *guarded, keeps_references=True)
    assert len(watcher.buffer) == 1  # the event went through
    watcher.buffer.parts.clear()  # the buffered event's own references
    assert refcounts(guarded) == before


def test_a_binding_not_known_to_keep_references_is_left_alone(monkeypatch, guarded: GraphicsArguments):
    monkeypatch.setattr(libvirt_binding, "RELEASE_GRAPHICS_REFERENCES", False)
    watcher = watcher_without_daemon(asyncio.new_event_loop())
    before = refcounts(guarded)
    binding_call(watcher.on_libvirt_graphics, FakeDomain("web", 1, "uuid"), *guarded, keeps_references=False)
    watcher.buffer.parts.clear()
    assert refcounts(guarded) == before


class TextHandler(logging.Handler):
    """Keeps what was logged as text only: a kept record would keep its traceback, and the
    traceback the callback's arguments (pytest's own log capture keeps records)."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@contextlib.contextmanager
def source_log_as_text() -> Iterator[TextHandler]:
    """The source's log as text, and nowhere else meanwhile: pytest's log capture (whose
    handlers it attaches when the test body starts) keeps records."""
    logger = libvirt_binding.LOGGER
    handler = TextHandler()
    handlers, propagate = logger.handlers, logger.propagate
    logger.handlers, logger.propagate = [handler], False
    try:
        yield handler
    finally:
        logger.handlers, logger.propagate = handlers, propagate


@pytest.mark.parametrize("keeps_references", [True, False])
def test_a_failing_callback_does_not_raise_into_the_binding(guarded: GraphicsArguments, keeps_references: bool):
    """When a callback raises, libvirt-python releases the arguments itself: the callback must
    return normally, and give back exactly what the binding kept, failure or not."""

    def broken(*_args):
        raise RuntimeError("boom")

    callback = libvirt_binding.graphics_callback(broken, "qemu:///system", release=keeps_references)
    before = refcounts(guarded)
    with source_log_as_text() as source_log:
        binding_call(callback, FakeDomain("web", 1, "uuid"), *guarded, keeps_references=keeps_references)
    [logged] = source_log.lines
    assert "qemu:///system: the graphics callback failed" in logged and "RuntimeError: boom" in logged
    assert refcounts(guarded) == before
