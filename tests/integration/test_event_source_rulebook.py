"""The event source run by ansible-rulebook itself, with the rulebook `make demo` shows."""

from __future__ import annotations

import ast
import re
from typing import Any

import pytest
from ansible_rulebook.terminal import Display

from lab import rfb

pytestmark = pytest.mark.slow

LOG_LINE = re.compile(r"^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}")


def printed_events(output: str) -> list[dict[str, Any]]:
    """The events ansible-rulebook's print_event printed (pretty: one banner each, holding the
    event as pprint writes it), in order; a log line another thread wrote in between is skipped."""
    events = []
    for banner in Display.get_banners("event", output):
        lines = banner.splitlines()[1:-1]
        events.append(ast.literal_eval("\n".join(line for line in lines if not LOG_LINE.match(line))))
    return events


def test_ansible_rulebook_runs_the_source_and_matches_events(hypervisor, rulebook_process):
    rulebook = rulebook_process("print_console_events", {"virtguard_uri": hypervisor.uri})
    rulebook.wait_for(lambda out: "watching graphics events" in out, "subscription of the source", timeout=90)
    sock = rfb.open_session("127.0.0.1", hypervisor.domains[0].vnc_port)
    client_port = str(sock.getsockname()[1])
    sock.close()

    def session(output: str) -> list[dict[str, Any]]:
        return [e["graphics"] for e in printed_events(output)
                if e["graphics"]["remote"]["service"] == client_port and not e["graphics"]["snapshot"]]

    output = rulebook.wait_for(lambda out: len(session(out)) >= 3, "3 events of the session printed", timeout=30)
    # print_event prints an event only when its rule matched: one rule per phase
    assert [e["phase"] for e in session(output)] == ["connect", "initialize", "disconnect"]
