"""The event source with TLS + SASL consoles and the real client gvnccapture: identities in
the events, a failed authentication, and certificate names that carry template syntax, through
the source and through ansible-rulebook's rendering of a rule's action."""

from __future__ import annotations

import asyncio
import json
import os

import pytest
from ansible_rulebook.terminal import Display

from lab.hypervisor import SessionHypervisor
from lab.netns import ClientNamespace
from lab.source_log import SourceLog
from lab.source_runner import SourceRun
from lab.tls_console import TlsSaslLab

pytestmark = pytest.mark.slow

# Certificate names a client chooses (64 characters at most): a template that would run a command
# if ansible-core rendered it, and one that does not even parse as a template.
TEMPLATE_CN = "{{ lookup(*'pipe~touch /tmp/vgt-never'.split('~')) }}, {% raw %}"
BROKEN_CN = "{{ broken ~ ("
LIVE_ONLY = {"snapshot": False}  # no session is open when these tests start the source


@pytest.fixture(scope="module")
def tls_console():
    ns = ClientNamespace(7, tag="s").create()
    hv = SessionHypervisor("st")
    tls: TlsSaslLab | None = None
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
        if tls is not None:
            tls.cleanup()
        hv.stop()
        ns.delete()


async def capture(tls_console, client: str, username: str, password: str):
    hv, domain, ns, clients = tls_console
    return await asyncio.to_thread(clients[client].capture, ns.name, ns.host_ip, domain.vnc_port - 5900,
                                   username, password)


def rfc4514_escaped(value: str) -> str:
    return value.replace("\\", "\\\\").replace(",", "\\,").replace("+", "\\+")


async def test_tls_sasl_session_carries_certificate_and_sasl_identities(tls_console, source_log: SourceLog):
    hv, _domain, ns, _clients = tls_console
    async with SourceRun({"uri": hv.uri, **LIVE_ONLY}) as run:
        await source_log.subscribed(hv.uri, run)
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


async def test_failed_sasl_authentication_never_initializes(tls_console, source_log: SourceLog):
    hv, _domain, ns, _clients = tls_console
    async with SourceRun({"uri": hv.uri, **LIVE_ONLY}) as run:
        await source_log.subscribed(hv.uri, run)
        rc, output = await capture(tls_console, "alice", "alice", "wrong-password")
        assert rc != 0, output
        [connect] = await run.wait_for(1, remote__node=ns.client_ip, phase="connect")
        # a session's events arrive in order: an initialize would come before its disconnect
        events = await run.wait_for(2, session__id=connect["session"]["id"])

    assert [e["phase"] for e in events] == ["connect", "disconnect"]
    disconnect = events[1]
    assert disconnect["session"]["authenticated"] is False
    assert disconnect["session"]["duration_s"] >= 0
    assert disconnect["subject"] == [] and disconnect["identity"] == {}


@pytest.mark.parametrize("client, common_name", [("template", TEMPLATE_CN), ("broken", BROKEN_CN)],
                         ids=["template", "broken"])
async def test_certificate_names_with_template_syntax_arrive_verbatim(tls_console, source_log: SourceLog,
                                                                      client, common_name):
    hv, _domain, ns, _clients = tls_console
    async with SourceRun({"uri": hv.uri, **LIVE_ONLY}) as run:
        await source_log.subscribed(hv.uri, run)
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


def debug_messages(output: str) -> list[str]:
    """What ansible-rulebook's debug action printed: one banner a message."""
    return ["\n".join(banner.splitlines()[1:-1]) for banner in Display.get_banners("debug", output)]


def test_certificate_names_with_template_syntax_reach_a_rules_action_verbatim(tls_console, rulebook_process):
    """ansible-rulebook renders a rule's action with the event in reach (a Jinja native
    environment): the certificate name it brings in must come out as the same text, neither
    rendered nor failing to parse. (ansible-core's rendering of the event in a playbook is
    tests/integration/test_remediation_playbook.py's: it checks that the template is live.)"""
    hv, domain, ns, clients = tls_console
    rulebook = rulebook_process("echo_console_identities", {"virtguard_uri": hv.uri})
    rulebook.wait_for(lambda out: "watching graphics events" in out, "subscription of the source", timeout=90)
    for client, common_name in (("template", TEMPLATE_CN), ("broken", BROKEN_CN)):
        rc, output = clients[client].capture(ns.name, ns.host_ip, domain.vnc_port - 5900, "alice", "alice-pw")
        assert rc == 0, output
        expected = f"identity <O=virtguard lab,CN={rfc4514_escaped(common_name)}> user <alice>"
        rulebook.wait_for(lambda out, message=expected: message in debug_messages(out),
                          f"the debug message {expected!r}", timeout=30)
