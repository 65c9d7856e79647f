"""Cutting connections (module_utils.tcp_cut): parsing ss, choosing exactly the console
connections of a batch, the ss -K commands, verification; with ss outputs captured on a
namespace host (IPv4, IPv4-mapped, IPv6 and IPv4-compatible peers, an accept queue). The real
cuts are in tests/integration/test_block_and_cut_modules.py."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

import pytest

from ansible_collections.virtguard.console.plugins.module_utils.ss_endpoints import filter_address
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


# -- every form ss prints, and one connection that cannot be cut ------------------------------------
# Captured on real sockets (fixtures/ss_endpoints/capture.sh, test_ss_endpoints.py says how): a
# dual-stack listener on *:5901 with two link-local clients (their sockets bound to hv0, which ss
# prints as [fe80::…]%hv0:5901), two IPv4 clients (10.9.0.2, 10.9.0.3) and a ULA one; a
# link-local client on [::]:5905; listeners bound to lo (SO_BINDTODEVICE) with local clients.

LL_FIXTURES = Path(__file__).parent / "fixtures" / "ss_endpoints"
LL_LISTENING = (LL_FIXTURES / "ss_listening.txt").read_text()
LL_ESTABLISHED = (LL_FIXTURES / "ss_established.txt").read_text()
HOST_LL, CLIENT_LL = "fe80::5ca1:5dff:fee7:c79", "fe80::78f4:65ff:fe0a:7f4b"


def ss_reads(word: str) -> bool:
    """Whether ss 6.1's filter parser takes ``word`` as src/dst: checked on this machine,
    ``[fe80::1]:22`` and ``10.0.0.1:22`` are read; ``[fe80::1%eth0]:22``, ``[fe80::1]%eth0:22``
    and ``[[fe80::1]]:22`` are refused, and with them the whole command."""
    host, _sep, port = word.rpartition(":")
    if not port.isdigit():
        return False
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if "%" in host or "[" in host or "]" in host:
        return False
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class StrictSs:
    """Answers ss like the captured host (its interfaces: hv0 is 3, lo is 1) and reads ``-K``
    filters as strictly as ss 6.1 does: a word it cannot read refuses the whole command (exit
    status 1, ss's message), an interface is named by its index. Every command that names one
    of the ``refused`` peers is refused so (as ss refused link-local endpoints before they were
    written without their zone); ``stubborn`` peers are never destroyed (the kernel kept them:
    ss -K exits 0 when SOCK_DESTROY fails)."""

    INTERFACES = {"hv0": 3, "lo": 1}

    def __init__(self, established: str = LL_ESTABLISHED, refused: tuple[str, ...] = (),
                 stubborn: tuple[str, ...] = ()):
        self.connections = parse_established(established)
        self.refused = refused
        self.stubborn = stubborn
        self.kills: list[list[str]] = []
        self.listing_fails = False

    def index_of(self, name: str) -> int | None:
        return self.INTERFACES.get(name)

    def cutter(self, **kwargs: Any) -> ConnectionCutter:
        return ConnectionCutter(self, sleep=lambda s: None, index_of=self.index_of, **kwargs)

    def __call__(self, argv: list[str], data: str | None = None) -> tuple[int, str, str]:
        if "-l" in argv:
            return 0, LL_LISTENING, ""
        if "-K" in argv:
            self.kills.append(argv)
            return self.kill(argv)
        assert argv == SS_ESTABLISHED
        if self.listing_fails:
            return 1, "", "Cannot open netlink socket: Protocol not supported"
        lines = [f"0 0 {self.endpoint(c.local_address, c.local_port, c.interface)} "
                 f"{self.endpoint(c.peer_address, c.peer_port)}" for c in self.connections]
        return 0, "\n".join(lines) + "\n", ""

    @staticmethod
    def endpoint(address: str, port: int, interface: str | None = None) -> str:
        text = f"[{address}]" if ":" in address else address
        return f"{text}%{interface}:{port}" if interface else f"{text}:{port}"

    def kill(self, argv: list[str]) -> tuple[int, str, str]:
        named = []
        for i, word in enumerate(argv):
            if word in ("src", "dst") and (not ss_reads(argv[i + 1]) or argv[i + 1].startswith(
                    tuple(f"[{peer}]" for peer in self.refused))):
                return 1, "", f'Error: "{argv[i + 1]}" does not look like a port.\nCannot parse dst/src address.\n'
            if word == "dev" and argv[i + 2] not in {str(index) for index in self.INTERFACES.values()}:
                return 1, "", "Cannot parse device.\n"
            if word == "src":
                dev = int(argv[i + 8]) if argv[i + 5:i + 7] == ["and", "dev"] else None
                named.append((argv[i + 1], argv[i + 4], dev))
        destroyed = [c for c in self.connections
                     if any(src == filter_address(c.local_address, c.local_port)
                            and dst == filter_address(c.peer_address, c.peer_port)
                            and dev in (None, self.index_of(c.interface or "")) for src, dst, dev in named)
                     and c.peer_address not in self.stubborn]
        self.connections = [c for c in self.connections if c not in destroyed]
        return 0, "".join(f"0 0 {c.local_address}:{c.local_port} {c.peer_address}:{c.peer_port}\n"
                          for c in destroyed), ""


def test_kill_commands_name_every_captured_form_as_ss_reads_it():
    for conn in parse_established(LL_ESTABLISHED):
        argv = kill_command([conn], StrictSs.INTERFACES)
        assert all(ss_reads(argv[i + 1]) for i, w in enumerate(argv) if w in ("src", "dst")), argv
    link_local = Connection(HOST_LL, 5901, CLIENT_LL, 38314, "hv0")
    mapped = Connection("::ffff:10.9.0.1", 5901, "::ffff:10.9.0.3", 53237)
    assert kill_command([link_local, mapped], {"hv0": 3}) == [
        "ss", "-t", "-n", "-H", "-K", "state", "established", "(",
        "(", "src", f"[{HOST_LL}]:5901", "and", "dst", f"[{CLIENT_LL}]:38314", "and", "dev", "=", "3", ")", "or",
        "(", "src", "[::ffff:10.9.0.1]:5901", "and", "dst", "[::ffff:10.9.0.3]:53237", ")", ")"]
    # an interface gone since the listing: the addresses and ports still name the socket
    assert kill_command([link_local], {}) == [
        "ss", "-t", "-n", "-H", "-K", "state", "established", "(",
        "(", "src", f"[{HOST_LL}]:5901", "and", "dst", f"[{CLIENT_LL}]:38314", ")", ")"]


def test_interfaces_are_named_by_index_so_no_name_is_read_as_a_word_of_ss():
    # ss 6.1: "dev = or" is a syntax error (exit 255); "dev = 3" names the interface
    conn = Connection(HOST_LL, 5901, CLIENT_LL, 38314, "or")
    assert kill_command([conn], {"or": 3})[-5:] == ["dev", "=", "3", ")", ")"]
    asked = []

    def index_of(name: str) -> int:
        asked.append(name)
        return 3

    ConnectionCutter(StrictSs(), sleep=lambda s: None, index_of=index_of).cut([CLIENT_LL, "10.9.0.2"])
    assert asked == ["hv0"]  # once per interface of the batch, not per connection


def test_a_link_local_client_and_ipv4_offenders_of_one_batch_are_all_cut():
    fake = StrictSs()
    result = fake.cutter().cut(["fe80::/64", "10.9.0.2", "10.9.0.3"])
    assert sorted((c["peer_address"], c["peer_port"], c["local_port"]) for c in result["cut"]) == [
        ("10.9.0.2", 47195, 5906), ("::ffff:10.9.0.2", 37393, 5901), ("::ffff:10.9.0.3", 53237, 5901),
        (CLIENT_LL, 38304, 5901), (CLIENT_LL, 38314, 5901), (CLIENT_LL, 59392, 5905)]
    assert result["verified"] and result["failed"] == [] and result["remaining"] == []
    assert len(fake.kills) == 1  # one command for the batch, ss read all of it
    # the sshd connection of the same link-local client is no console's; the ULA client no offender
    assert Connection(HOST_LL, 22, CLIENT_LL, 47082, "hv0") in fake.connections
    assert Connection("fd77:9::1", 5901, "fd77:9::2", 35422) in fake.connections


def test_a_connection_ss_cannot_name_never_keeps_the_others_from_being_cut():
    fake = StrictSs(refused=(CLIENT_LL,))
    with pytest.raises(CutError, match=r"^2 of 5 console connection\(s\) could not be cut \(the others were\): "
                                       r"\[fe80::78f4:65ff:fe0a:7f4b\]:38314 -> 5901 on hv0: ss -K failed") as caught:
        fake.cutter(chunk_size=3).cut(["10.9.0.2", "10.9.0.3", CLIENT_LL], ports=["5901", "5906"],
                                      discover_ports=False, verify_attempts=2)
    result = caught.value.result
    assert sorted((c["peer_address"], c["peer_port"]) for c in result["cut"]) == [
        ("10.9.0.2", 47195), ("::ffff:10.9.0.2", 37393), ("::ffff:10.9.0.3", 53237)]
    assert result["failed"] == [
        {"local_address": HOST_LL, "local_port": 5901, "peer_address": CLIENT_LL, "peer_port": port,
         "reason": f'ss -K failed (rc 1): Error: "[{CLIENT_LL}]:{port}" does not look like a port. '
                   "Cannot parse dst/src address."} for port in (38314, 38304)]
    assert result["remaining"] == [{k: v for k, v in f.items() if k != "reason"} for f in result["failed"]]
    assert not result["verified"] and result["changed"]
    assert not [c for c in fake.connections if c.peer_address.endswith(("10.9.0.2", "10.9.0.3"))]
    # attempt 1: a chunk of 3 (refused: each alone), a chunk of 2 (refused: each alone); attempt 2:
    # the two left, refused, each alone
    assert [len([w for w in argv if w == "src"]) for argv in fake.kills] == [3, 1, 1, 1, 2, 1, 1, 2, 1, 1]


def test_a_connection_the_kernel_keeps_is_reported_with_its_reason_after_the_others_are_cut():
    fake = StrictSs(stubborn=("::ffff:10.9.0.3",))
    with pytest.raises(CutError, match=r"^1 of 3 console connection") as caught:
        fake.cutter().cut(["10.9.0.2", "10.9.0.3"], verify_attempts=3)
    result = caught.value.result
    assert result["failed"] == [{"local_address": "::ffff:10.9.0.1", "local_port": 5901,
                                 "peer_address": "::ffff:10.9.0.3", "peer_port": 53237,
                                 "reason": "still established after 3 attempt(s) of ss -K"}]
    assert len(result["cut"]) == 2 and not result["verified"]


def test_a_failed_check_after_the_cut_reports_what_was_attempted():
    class ListingFailsAfterTheKill(StrictSs):
        def kill(self, argv: list[str]) -> tuple[int, str, str]:
            self.listing_fails = True
            return super().kill(argv)

    with pytest.raises(CutError, match="could not be checked to be gone: .*Protocol not supported") as caught:
        ListingFailsAfterTheKill().cutter().cut(["10.9.0.3"])
    assert [(f["peer_address"], f["reason"][:12]) for f in caught.value.result["failed"]] == [
        ("::ffff:10.9.0.3", "not checked:")]
    assert caught.value.result["cut"] == []


# -- sessions: exact connections, never widened -------------------------------------------------------

def test_a_session_cuts_exactly_its_connection_and_no_other_of_its_address():
    fake = StrictSs()
    result = fake.cutter().cut(sessions=[
        {"address": CLIENT_LL, "client_port": 38314, "console_port": None},
        {"address": "10.9.0.2", "client_port": 37393, "console_port": 5901},   # IPv4-mapped on the socket
        {"address": "10.9.0.2", "client_port": 47195, "console_port": 5999},   # not that console: kept
        {"address": "fd77:9::2", "client_port": 1, "console_port": None},      # no such connection
        {"address": CLIENT_LL, "client_port": 47082, "console_port": None}])   # sshd's: no console port
    assert sorted((c["peer_address"], c["peer_port"]) for c in result["cut"]) == [
        ("::ffff:10.9.0.2", 37393), (CLIENT_LL, 38314)]
    assert result["verified"] and result["addresses"] == [] and result["failed"] == []
    assert result["sessions"][1] == {"address": "10.9.0.2", "client_port": 37393, "console_port": 5901}
    left = {(c.peer_address, c.peer_port) for c in fake.connections}
    assert {(CLIENT_LL, 38304), (CLIENT_LL, 59392), (CLIENT_LL, 47082), ("10.9.0.2", 47195)} <= left


def test_sessions_and_addresses_are_cut_together():
    result = StrictSs().cutter().cut(["10.9.0.3"], sessions=[{"address": "::ffff:10.9.0.2", "client_port": 37393}])
    assert sorted(c["peer_port"] for c in result["cut"]) == [37393, 53237]


@pytest.mark.parametrize("sessions, message", [
    ([{"address": "10.9.0.2", "client_port": 1}, {"address": "10.9.0.0/24", "client_port": 2}],
     r"sessions\[1\]: address '10.9.0.0/24' is not an IP address"),
    ([{"address": "10.9.0.2"}], r"sessions\[0\]: client_port must be a port number from 1 to 65535, got None"),
    ([{"address": "10.9.0.2", "client_port": 70000}], r"sessions\[0\]: client_port .* got 70000"),
    ([{"address": "10.9.0.2", "client_port": True}], r"sessions\[0\]: client_port .* got True"),
    ([{"address": "10.9.0.2", "client_port": 5, "console_port": "5901"}], r"sessions\[0\]: console_port .* got '5901'"),
    ([{"address": "10.9.0.2", "client_port": 5, "port": 1}], r"sessions\[0\]: unknown key\(s\) port"),
    (["10.9.0.2:5"], r"sessions\[0\]: '10.9.0.2:5' is not a mapping"),
])
def test_bad_sessions_are_refused_naming_the_item_before_ss_runs(sessions, message):
    fake = StrictSs()
    with pytest.raises(CutError, match=message):
        ConnectionCutter(fake).cut(sessions=sessions)
    assert fake.kills == []


# -- results and messages, whole --------------------------------------------------------------------

def test_the_result_is_whole_and_says_what_was_cut_and_checked():
    result = ConnectionCutter(FakeSs(), sleep=lambda s: None).cut(["10.0.0.2", "fd00:1::/64"])
    assert {k: v for k, v in result.items() if k != "cut"} == {
        "changed": True, "addresses": ["10.0.0.2", "fd00:1::/64"], "client_port": None, "sessions": [],
        "ports": ["5907-5908"], "remaining": [], "failed": [], "verified": True}
    assert sorted(result["cut"], key=lambda c: c["peer_address"])[0] == {
        "local_address": "::ffff:10.0.0.1", "local_port": 5907, "peer_address": "::ffff:10.0.0.2", "peer_port": 45817}
    # nothing to cut: verified when the listing was read, not in check mode
    assert ConnectionCutter(FakeSs()).cut(["192.0.2.1"])["verified"] is True
    assert ConnectionCutter(FakeSs()).cut(["192.0.2.1"], check_mode=True)["verified"] is False


def test_a_stubborn_connection_is_tried_with_growing_pauses_and_named_in_the_error():
    pauses: list[float] = []
    with pytest.raises(CutError) as caught:
        ConnectionCutter(FakeSs(stubborn=True), sleep=pauses.append).cut(["10.0.0.3"], verify_attempts=3)
    assert pauses == pytest.approx([0.05, 0.1, 0.15])
    assert str(caught.value) == (
        "2 of 2 console connection(s) could not be cut (the others were): "
        "10.0.0.3:47457 -> 5908: still established after 3 attempt(s) of ss -K; "
        "10.0.0.3:46523 -> 5908: still established after 3 attempt(s) of ss -K")
    once: list[float] = []
    with pytest.raises(CutError):
        ConnectionCutter(FakeSs(stubborn=True), sleep=once.append).cut(["10.0.0.3"], verify_attempts=0)
    assert once == pytest.approx([0.05])  # at least one attempt


def test_a_connection_is_written_as_an_operator_reads_it():
    assert str(Connection("10.0.0.1", 5907, "10.0.0.2", 1234)) == "10.0.0.2:1234 -> 5907"
    assert str(Connection("fd00::1", 5907, "fd00::2", 1234, "hv0")) == "[fd00::2]:1234 -> 5907 on hv0"


def test_client_ports_are_1_to_65535_and_select_exactly_their_connection():
    result = ConnectionCutter(FakeSs(), sleep=lambda s: None).cut(["10.0.0.3"], client_port=47457)
    assert [c["peer_port"] for c in result["cut"]] == [47457] and result["client_port"] == 47457
    assert ConnectionCutter(FakeSs()).cut(["10.0.0.3"], client_port=65535)["cut"] == []
    with pytest.raises(CutError) as caught:
        ConnectionCutter(FakeSs()).cut(["10.0.0.3"], client_port=65536)
    assert str(caught.value) == "client_port must be a port number from 1 to 65535, got 65536"


def test_a_chunk_size_below_1_cuts_one_connection_a_command():
    fake = FakeSs()
    ConnectionCutter(fake, sleep=lambda s: None, chunk_size=0).cut(["10.0.0.2"])
    assert [len([w for w in argv if w == "src"]) for argv in fake.kills] == [1, 1]


def test_an_ss_failure_without_a_message_says_so_and_a_long_one_is_cut_at_500_characters():
    class Refusing(FakeSs):
        def __init__(self, err: str):
            super().__init__()
            self.err = err

        def __call__(self, argv: list[str], data: str | None = None) -> tuple[int, str, str]:
            if "-K" in argv:
                self.kills.append(argv)
                return 2, "", self.err
            return super().__call__(argv, data)

    for err, said in (("", "no message"), ("x " * 400, ("x " * 250)[:500])):
        with pytest.raises(CutError) as caught:
            ConnectionCutter(Refusing(err), sleep=lambda s: None).cut(["10.0.0.3"], verify_attempts=1)
        assert {f["reason"] for f in caught.value.result["failed"]} == {f"ss -K failed (rc 2): {said}"}
