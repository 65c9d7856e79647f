"""Console ports of a libvirt host's domains, from their XML (module_utils.domain_graphics_ports),
with virsh's output captured on a lab host: a running autoport VNC domain, a running one with a
websocket, and a defined SPICE domain with a fixed port outside libvirt's ranges."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from ansible_collections.virtguard.console.plugins.module_utils.domain_graphics_ports import (
    DomainReadError,
    GraphicsPort,
    graphics_ports,
    read_graphics_ports,
    split_documents,
)

FIXTURES = Path(__file__).parent / "fixtures" / "console_firewall"
DUMPXML = (FIXTURES / "virsh_dumpxml.txt").read_text()  # live and --inactive XML of each, marker-separated
UUIDS = (FIXTURES / "virsh_list_uuid.txt").read_text()
MARKER = "vgfw-0123456789abcdef"
FOUND = [GraphicsPort("kvmx-ws", "vnc", "websocket", 5700), GraphicsPort("kvmx-d0", "vnc", "port", 5900),
         GraphicsPort("kvmx-ws", "vnc", "port", 5901), GraphicsPort("kvmx-spice-fixed", "spice", "port", 7100)]


def domain(graphics: str) -> str:
    return f"<domain type='kvm'><name>vm</name><devices>{graphics}</devices></domain>"


def test_every_console_port_of_a_domain_is_read():
    assert graphics_ports(domain("<graphics type='spice' port='5903' tlsPort='5904' autoport='no'/>"
                                 "<graphics type='vnc' port='5910' websocket='5710'/>")) == [
        GraphicsPort("vm", "spice", "port", 5903), GraphicsPort("vm", "spice", "tlsPort", 5904),
        GraphicsPort("vm", "vnc", "port", 5910), GraphicsPort("vm", "vnc", "websocket", 5710)]


@pytest.mark.parametrize("graphics", [
    "<graphics type='vnc' port='-1' autoport='yes' websocket='-1'/>",  # not allocated yet
    "<graphics type='vnc' socket='/run/vnc.sock'/>",  # a unix socket
    "<graphics type='vnc' port='0'/>", "<graphics type='vnc' port='70000'/>", "<graphics type='vnc' port='59x0'/>",
    "<graphics type='sdl'/>", "<graphics type='rdp' port='3389'/>",
])
def test_what_is_no_tcp_console_port_is_left_out(graphics):
    assert graphics_ports(domain(graphics)) == []


def test_graphics_outside_devices_do_not_count():
    xml = "<domain><name>vm</name><metadata><graphics type='vnc' port='5999'/></metadata><devices/></domain>"
    assert graphics_ports(xml) == []


def test_documents_are_split_on_the_marker_and_empty_ones_dropped():
    documents = split_documents(DUMPXML, MARKER)
    assert len(documents) == 6
    assert all(doc.startswith("<domain") and doc.endswith("</domain>") for doc in documents)
    assert split_documents(f"{MARKER}{MARKER}<domain/>{MARKER}", MARKER) == ["<domain/>"]


def test_a_document_that_does_not_parse_is_an_error():
    with pytest.raises(DomainReadError, match="cannot read a domain's XML"):
        graphics_ports("<domain><name>vm</name>")


def fake_virsh(dumpxml: str = DUMPXML, err: str = "", rc: int = 0):
    calls: list[list[str]] = []

    def run(argv, data=None):
        calls.append(argv)
        if argv[-1] == "--uuid":
            return 0, UUIDS, ""
        marker = re.search(r"echo (vgfw-[0-9a-f]{16})", argv[-1])
        assert marker is not None
        return rc, dumpxml.replace(MARKER, marker.group(1)), err
    return run, calls


def test_read_graphics_ports_reads_every_domain_live_and_defined_in_one_virsh():
    run, calls = fake_virsh()
    assert read_graphics_ports(run, "qemu:///system") == FOUND
    assert calls[0] == ["virsh", "-q", "-c", "qemu:///system", "list", "--all", "--uuid"]
    assert len(calls) == 2
    commands = calls[1][-1]
    for uuid in UUIDS.split():
        assert f"dumpxml {uuid};" in commands and f"dumpxml --inactive {uuid};" in commands


def test_the_marker_is_new_at_every_read():
    run, calls = fake_virsh()
    read_graphics_ports(run, "qemu:///system")
    read_graphics_ports(run, "qemu:///system")
    markers = {re.search(r"echo (vgfw-\w+)", call[-1]).group(1) for call in calls[1::2]}  # type: ignore[union-attr]
    assert len(markers) == 2


def test_a_domain_that_went_away_in_between_is_skipped():
    run, _calls = fake_virsh(err="error: failed to get domain 'bdb0fae6-a285-47aa-8c0a-5f6c38f1f3a0'\n")
    assert read_graphics_ports(run, "qemu:///system") == FOUND


@pytest.mark.parametrize("rc, err", [(1, "error: failed to connect to the hypervisor\n"),
                                     (0, "error: internal error: something else\n")])
def test_virsh_errors_are_raised_with_what_virsh_said(rc, err):
    run, _calls = fake_virsh(err=err, rc=rc)
    with pytest.raises(DomainReadError, match=re.escape(err.strip())):
        read_graphics_ports(run, "qemu:///system")


def test_a_failed_listing_is_raised():
    with pytest.raises(DomainReadError, match="list --all --uuid failed .rc 1.: no daemon"):
        read_graphics_ports(lambda argv, data=None: (1, "", "no daemon\n"), "qemu:///system")


def test_no_domain_means_no_second_virsh():
    calls = []

    def run(argv, data=None):
        calls.append(argv)
        return 0, "\n", ""
    assert read_graphics_ports(run, "qemu:///system") == []
    assert len(calls) == 1


def test_many_domains_are_read_in_chunks():
    uuids = [f"00000000-0000-0000-0000-{n:012d}" for n in range(450)]
    calls = []

    def run(argv, data=None):
        calls.append(argv)
        return (0, "\n".join(uuids) + "\n", "") if argv[-1] == "--uuid" else (0, "", "")
    read_graphics_ports(run, "qemu:///system")
    assert [call[-1].count("dumpxml --inactive") for call in calls[1:]] == [200, 200, 50]
