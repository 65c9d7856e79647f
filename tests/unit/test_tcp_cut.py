"""Cutting connections (module_utils.tcp_cut): parsing ss, choosing exactly the console
connections of a batch, the ss -K commands, verification; with ss outputs captured on a
namespace host (IPv4, IPv4-mapped, IPv6 and IPv4-compatible peers, an accept queue). The real
cuts are in tests/integration/test_block_and_cut_modules.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from ansible_collections.virtguard.console.plugins.module_utils.tcp_cut import (
    SS_ESTABLISHED,
    Connection,
    ConnectionCutter,
    CutError,
    kill_command,
    parse_established,
)

FIXTURES = Path(__file__).parent / "fixtures" / "console_remediation"
# Listening: *:5907 and 10.0.0.1:5908 (backlog 1, never accepting) held by "qemu-system-x86",
# 10.0.0.1:22 by "sshd". Established: 10.0.0.2 twice and fd00:1::2 and ::10.0.0.9 on 5907
# (dual stack), 10.0.0.3 twice on 5908 (still in the accept queue), 10.0.0.2 on 22.
LISTENING = (FIXTURES / "ss_listening.txt").read_text()
ESTABLISHED = (FIXTURES / "ss_established.txt").read_text()


def test_parse_established_reads_every_form_ss_prints():
    connections = parse_established(ESTABLISHED + "garbage\n\n")
    assert len(connections) == 7
    assert Connection("::ffff:10.0.0.1", 5907, "::ffff:10.0.0.2", 45817) in connections
    assert Connection("fd00:1::1", 5907, "::10.0.0.9", 53265) in connections
    assert Connection("10.0.0.1", 5908, "10.0.0.3", 47457) in connections


class FakeSs:
    """Answers ss like the captured host; ``-K`` removes what it names unless ``stubborn``."""

    def __init__(self, established: str = ESTABLISHED, stubborn: bool = False):
        self.lines = established.splitlines()
        self.stubborn = stubborn
        self.kills: list[list[str]] = []
        self.listings = 0

    def __call__(self, argv: list[str], data: str | None = None) -> tuple[int, str, str]:
        if "-l" in argv:
            return 0, LISTENING, ""
        if "-K" in argv:
            self.kills.append(argv)
            if not self.stubborn:
                named = {(argv[i + 1], argv[i + 4]) for i, word in enumerate(argv) if word == "src"}
                self.lines = [line for line in self.lines
                              if (self._endpoint(line, 2), self._endpoint(line, 3)) not in named]
            return 0, "", ""
        assert argv == SS_ESTABLISHED
        self.listings += 1
        return 0, "\n".join(self.lines) + "\n", ""

    @staticmethod
    def _endpoint(line: str, column: int) -> str:
        return line.split()[column]


def peers(result: dict[str, Any]) -> list[tuple[str, int]]:
    return sorted((c["peer_address"], c["local_port"]) for c in result["cut"])


def test_a_batch_is_matched_as_address_values_on_console_ports_only():
    fake = FakeSs()
    result = ConnectionCutter(fake, sleep=lambda s: None).cut(["10.0.0.2", "fd00:1::/64", "::10.0.0.9"])
    # the IPv4 client shows as ::ffff:10.0.0.2 on the dual-stack socket; its sshd connection is not a console's
    assert peers(result) == [("::10.0.0.9", 5907), ("::ffff:10.0.0.2", 5907), ("::ffff:10.0.0.2", 5907),
                             ("fd00:1::2", 5907)]
    assert result["verified"] and result["remaining"] == [] and result["ports"] == ["5907-5908"]
    assert fake.listings == 2  # one listing to find them, one to check they are gone: not one per address


def test_ipv4_compatible_and_its_ipv4_twin_are_different_clients():
    assert peers(ConnectionCutter(FakeSs()).cut(["10.0.0.9"])) == []
    assert peers(ConnectionCutter(FakeSs()).cut(["::a00:9"])) == [("::10.0.0.9", 5907)]
    assert peers(ConnectionCutter(FakeSs()).cut(["::ffff:10.0.0.2"], client_port=45817)) == [("::ffff:10.0.0.2", 5907)]


def test_connections_in_the_accept_queue_are_cut():
    assert peers(ConnectionCutter(FakeSs()).cut(["10.0.0.3"])) == [("10.0.0.3", 5908), ("10.0.0.3", 5908)]


def test_configured_ports_count_only_where_something_listens():
    assert peers(ConnectionCutter(FakeSs()).cut(["10.0.0.2"], ports=["22"], discover_ports=False)) == [("10.0.0.2", 22)]
    assert peers(ConnectionCutter(FakeSs()).cut(["10.0.0.2"], ports=["5900-5999"], discover_ports=False)) == [
        ("::ffff:10.0.0.2", 5907), ("::ffff:10.0.0.2", 5907)]
    # an outgoing connection's local port is no console port, listed or not
    outgoing = "0      0      10.0.0.1:5909 10.0.0.2:41000\n"
    assert ConnectionCutter(FakeSs(outgoing)).cut(["10.0.0.2"], ports=["5909"])["cut"] == []


def test_the_kill_command_names_each_connection_exactly_and_is_chunked():
    fake = FakeSs()
    ConnectionCutter(fake, sleep=lambda s: None, chunk_size=2).cut(["10.0.0.2", "fd00:1::2", "::10.0.0.9"])
    assert [len([w for w in argv if w == "src"]) for argv in fake.kills] == [2, 2]
    assert kill_command([Connection("fd00:1::1", 5907, "::10.0.0.9", 53265),
                         Connection("fe80::1%eth0", 5907, "fe80::2%eth0", 1)]) == [
        "ss", "-t", "-n", "-H", "-K", "state", "established", "(",
        "(", "src", "[fd00:1::1]:5907", "and", "dst", "[::10.0.0.9]:53265", ")", "or",
        "(", "src", "[fe80::1]:5907", "and", "dst", "[fe80::2]:1", ")", ")"]


def test_check_mode_and_nothing_to_cut():
    fake = FakeSs()
    result = ConnectionCutter(fake).cut(["10.0.0.2"], check_mode=True)
    assert result["changed"] and not result["verified"] and fake.kills == [] and len(result["cut"]) == 2
    nothing = ConnectionCutter(FakeSs()).cut(["192.0.2.1"])
    assert nothing["changed"] is False and nothing["cut"] == []


def test_connections_that_survive_are_an_error_naming_them():
    with pytest.raises(CutError, match="still established") as caught:
        ConnectionCutter(FakeSs(stubborn=True), sleep=lambda s: None).cut(["10.0.0.3"], verify_attempts=2)
    assert len(caught.value.result["remaining"]) == 2 and caught.value.result["cut"] == []


def test_a_connection_that_comes_in_meanwhile_is_cut_too():
    class Reconnecting(FakeSs):
        def __call__(self, argv: list[str], data: str | None = None) -> tuple[int, str, str]:
            answer = super().__call__(argv, data)
            if "-K" in argv and not self.kills[1:]:
                self.lines.append("0      0      10.0.0.1:5908          10.0.0.3:50000")
            return answer

    result = ConnectionCutter(Reconnecting(), sleep=lambda s: None).cut(["10.0.0.3"])
    assert result["verified"] and sorted(c["peer_port"] for c in result["cut"]) == [46523, 47457, 50000]


@pytest.mark.parametrize("addresses, kwargs", [(["10.0.0.2 or 1"], {}), (["10.0.0.2"], {"ports": ["x"]}),
                                               (["10.0.0.2"], {"client_port": 0}), ([5], {})])
def test_bad_input_is_refused_before_ss_runs(addresses, kwargs):
    fake = FakeSs()
    with pytest.raises(CutError):
        ConnectionCutter(fake).cut(addresses, **kwargs)
    assert fake.listings == 0 and fake.kills == []


def test_ss_failing_is_an_error():
    with pytest.raises(CutError, match="rc 1"):
        ConnectionCutter(lambda argv, data=None: (1, "", "netlink error")).cut(["10.0.0.2"])
