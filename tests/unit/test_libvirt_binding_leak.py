"""Which libvirt-python versions the source gives the graphics callback's references back for:
only those known to keep them (giving back a reference the binding did release would free
objects still in use)."""

import asyncio

import pytest

from lab.source_runner import FakeDomain, source_module, watcher_without_daemon

graphics_references_leak = source_module()["graphics_references_leak"]


@pytest.mark.parametrize("version, leaks", [
    ("1.2.21", True), ("9.0.0", True), ("11.10.0", True), ("12.8.0", True),
    ("1.2.20", False), ("12.8.1", False), ("12.9.0", False), ("13.0.0", False),
    ("12.8.0rc1", False), ("", False), (None, False),
])
def test_only_versions_known_to_keep_the_references(version, leaks):
    assert graphics_references_leak(version) is leaks


def test_the_installed_binding_is_one_the_source_knows():
    """The bench and the tests run a binding whose behaviour was checked (test_event_source:
    nothing of libvirt's arguments is left behind); a newer one must be checked, then listed."""
    module = source_module()
    assert module["RELEASE_GRAPHICS_REFERENCES"], (
        f"libvirt-python {module['LIBVIRT_PYTHON_VERSION']} is not in the checked range "
        f"{module['GRAPHICS_REFERENCES_LEAK_IN']}: check whether it still keeps the graphics "
        "callback's arguments, then update GRAPHICS_REFERENCES_LEAK_IN")


def test_the_reference_the_binding_kept_is_given_back_once(monkeypatch):
    import ctypes
    import sys

    monkeypatch.setitem(source_module(), "RELEASE_GRAPHICS_REFERENCES", True)
    local, remote, subject = {"family": 0, "node": "::1", "service": "5900"}, {"family": 0}, [("x509dname", "CN=a")]
    counts = [sys.getrefcount(obj) for obj in (local, remote, subject)]
    for kept in (local, remote, subject):  # what libvirt-python keeps
        ctypes.pythonapi.Py_IncRef(ctypes.py_object(kept))
    del kept
    watcher = watcher_without_daemon(asyncio.new_event_loop())
    watcher.on_libvirt_graphics(None, FakeDomain("web", 1, "uuid"), 0, local, remote, "none", subject, None)
    watcher.buffer.parts.clear()  # the buffered event's own references
    assert [sys.getrefcount(obj) for obj in (local, remote, subject)] == counts


def test_a_failing_callback_does_not_raise_into_the_binding(monkeypatch, caplog):
    """libvirt-python releases the arguments itself when a callback raises: the source's
    callback must return normally, whatever happens inside."""
    monkeypatch.setitem(source_module(), "RELEASE_GRAPHICS_REFERENCES", False)
    watcher = watcher_without_daemon(asyncio.new_event_loop())

    def broken(*_args):
        raise RuntimeError("boom")

    watcher.on_graphics = broken
    watcher.on_libvirt_graphics(None, FakeDomain("web", 1, "uuid"), 0, {}, {}, "none", [], None)
    assert "the graphics callback failed" in caplog.text
