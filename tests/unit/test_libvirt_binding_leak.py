"""Which libvirt-python versions the source gives the graphics callback's references back for:
only those known to keep them (giving back a reference the binding did release would free
objects still in use)."""

import pytest

from lab.source_runner import source_module

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
        f"libvirt-python {module['installed_libvirt_python']()} is not in the checked range "
        f"{module['GRAPHICS_REFERENCES_LEAK_IN']}: check whether it still keeps the graphics "
        "callback's arguments, then update GRAPHICS_REFERENCES_LEAK_IN")
