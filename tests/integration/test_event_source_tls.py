"""The event source with TLS + SASL consoles and the real client gvnccapture: identities in
the events, a failed authentication, and certificate names that carry template syntax."""

from __future__ import annotations

import asyncio
import json
import os

import pytest

from lab.hypervisor import SessionHypervisor
from lab.netns import ClientNamespace
from lab.source_runner import SourceRun
from lab.tls_console import TlsSaslLab

pytestmark = pytest.mark.slow

TEMPLATE_CN = "{{ lookup(*'pipe~touch /tmp/vgt-never'.split('~')) }}, {% raw %}"
BROKEN_CN = "{{ broken ~ ("


@pytest.fixture(scope="module")
def tls_console():
    ns = ClientNamespace(7, tag="s").create()
    hv = SessionHypervisor("st")
    tls = None
    try:
        tls = TlsSaslLab(hv.base / "tls", [ns.host_ip])
        hv.qemu_conf = tls.qemu_conf()
        tls.add_sasl_user("alice", "alice-pw")
        hv.start()
        domain = hv.create_domain(f"{hv.user}-d0", listen="0.0.0.0")
        clients = {
            "alice": tls.client("sa", "alice-laptop"),
            "template": tls.client("sh", TEMPLATE_CN),
            "broken": tls.client("sb", BROKEN_CN),
        }
        yield hv, domain, ns, clients
    finally:
        if tls:
            tls.cleanup()
        hv.stop()
        ns.delete()


async def capture(tls_console, client: str, username: str, password: str):
    hv, domain, ns, clients = tls_console
    return await asyncio.to_thread(clients[client].capture, ns.name, ns.host_ip, domain.vnc_port - 5900,
                                   username, password)


def rfc4514_escaped(value: str) -> str:
    return value.replace("\\", "\\\\").replace(",", "\\,").replace("+", "\\+")


async def test_tls_sasl_session_carries_certificate_and_sasl_identities(tls_console):
    hv, dummy_domain, ns, dummy_clients = tls_console
    async with SourceRun({"uri": hv.uri}) as run:
        await asyncio.sleep(0.5)
        rc, output = await capture(tls_console, "alice", "alice", "alice-pw")
        assert rc == 0, output
        events = await run.wait_for(3, remote__node=ns.client_ip)

    connect, initialize, disconnect = events
    assert [e["phase"] for e in events] == ["connect", "initialize", "disconnect"]
    assert len({e["session"]["id"] for e in events}) == 1
    assert {e["auth_scheme"] for e in events} == {"vencrypt+x509+sasl"}
    assert connect["subject"] == [] and connect["identity"] == {}
    dname = "O=virtguard lab,CN=alice-laptop"
    assert initialize["subject"] == [{"type": "x509dname", "name": dname},
                                     {"type": "saslUsername", "name": "alice"}]
    assert initialize["identity"] == {"x509dname": dname, "sasl_username": "alice"}
    assert initialize["session"]["authenticated"] is True
    assert disconnect["identity"] == initialize["identity"]
    assert disconnect["session"]["authenticated"] is True
    assert initialize["remote"]["node"] == ns.client_ip
    if os.environ.get("VGT_PRINT_EXAMPLE"):  # for docs/payload.md
        print(json.dumps({"graphics": initialize}, indent=2))


async def test_failed_sasl_authentication_never_initializes(tls_console):
    hv, dummy_domain, ns, dummy_clients = tls_console
    async with SourceRun({"uri": hv.uri}) as run:
        await asyncio.sleep(0.5)
        rc, output = await capture(tls_console, "alice", "alice", "wrong-password")
        assert rc != 0, output
        events = await run.wait_for(2, remote__node=ns.client_ip)
        await asyncio.sleep(1)
        events = run.matching(remote__node=ns.client_ip)

    assert [e["phase"] for e in events] == ["connect", "disconnect"]
    assert events[1]["session"] == {"id": events[0]["session"]["id"], "authenticated": False,
                                    "duration_s": events[1]["session"]["duration_s"]}
    assert events[1]["subject"] == [] and events[1]["identity"] == {}


@pytest.mark.parametrize("client, common_name", [("template", TEMPLATE_CN), ("broken", BROKEN_CN)])
async def test_certificate_names_with_template_syntax_arrive_verbatim(tls_console, client, common_name):
    hv, dummy_domain, ns, dummy_clients = tls_console
    async with SourceRun({"uri": hv.uri}) as run:
        await asyncio.sleep(0.5)
        rc, output = await capture(tls_console, client, "alice", "alice-pw")
        assert rc == 0, output
        events = await run.wait_for(3, remote__node=ns.client_ip)
        # the source goes on: a later session on the same hypervisor still arrives
        rc, output = await capture(tls_console, "alice", "alice", "alice-pw")
        assert rc == 0, output
        await run.wait_for(6, remote__node=ns.client_ip)

    initialize = events[1]
    expected = f"O=virtguard lab,CN={rfc4514_escaped(common_name)}"
    assert initialize["identity"]["x509dname"] == expected
    assert initialize["subject"][0] == {"type": "x509dname", "name": expected}
    assert not os.path.exists("/tmp/vgt-never")
