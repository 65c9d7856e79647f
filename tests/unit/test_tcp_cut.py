"""Cutting connections: parsing ss, choosing exactly the console connections, the ss -K
command, verification; and (as root) a real cut of a real connection."""

import os
import shutil
import socket
import subprocess

import pytest

from ansible_collections.virtguard.console.plugins.module_utils.tcp_cut import (
    ConnectionCutter,
    CutError,
    parse_ss,
    split_endpoint,
)

ESTABLISHED = """\
0      0      0.0.0.0:5901 192.0.2.7:40000
0      0      [::ffff:192.0.2.7]:5902 [::ffff:192.0.2.7]:40001
0      0      10.0.0.1:22 192.0.2.7:40002
0      0      10.0.0.1:5905 192.0.2.7:40003
0      0      10.0.0.1:41000 192.0.2.7:5901
0      0      0.0.0.0:5901 192.0.2.8:40000
"""
LISTENING = """\
LISTEN 0      1      0.0.0.0:5901 0.0.0.0:*
LISTEN 0      1            *:5902       *:*
LISTEN 0      128    0.0.0.0:22 0.0.0.0:*
"""


def test_parse_ss_reads_connections_and_listening_ports():
    connections = parse_ss(ESTABLISHED + "garbage line\n\n")
    assert len(connections) == 6  # short and empty lines are skipped
    assert (connections[1].local_port, connections[1].peer_address, connections[1].peer_port) == (
        5902, "::ffff:192.0.2.7", 40001)
    assert parse_ss(LISTENING, listening=True) == {5901, 5902, 22}


def test_split_endpoint():
    assert split_endpoint("[::ffff:1.2.3.4]:5900") == ("::ffff:1.2.3.4", 5900)
    assert split_endpoint("*:5902") == ("*", 5902)
    assert split_endpoint("[fe80::1%eth0]:22") == ("fe80::1%eth0", 22)


class FakeSs:
    def __init__(self, established=ESTABLISHED, stubborn=False):
        self.established = established
        self.stubborn = stubborn
        self.kills = []

    def __call__(self, argv, data=None):
        if "-l" in argv:
            return 0, LISTENING, ""
        if "-K" in argv:
            self.kills.append(argv)
            if not self.stubborn:
                self.established = ""
            return 0, "", ""
        return 0, self.established, ""


def test_only_accepted_console_connections_of_the_address_are_chosen():
    found = ConnectionCutter(FakeSs()).matching("192.0.2.7", ["5900-5999"])
    # not 22 (not a console port), not 5905 (nothing listens), not our own outgoing connection
    assert [(c.local_port, c.peer_port) for c in found] == [(5901, 40000), (5902, 40001)]
    one = ConnectionCutter(FakeSs()).matching("::ffff:192.0.2.7", ["5902"], client_port=40001)
    assert [(c.local_port, c.peer_port) for c in one] == [(5902, 40001)]


def test_cut_kills_exactly_those_and_verifies():
    fake = FakeSs()
    result = ConnectionCutter(fake, sleep=lambda s: None).cut("192.0.2.7", ["5900-5999"])
    assert result["changed"] and result["verified"] and len(result["cut"]) == 2
    assert fake.kills[0] == ["ss", "-t", "-n", "-H", "-K", "state", "established", "dst", "192.0.2.7",
                             "(", "(", "sport", "=", ":5901", "and", "dport", "=", ":40000", ")", ")"]
    assert fake.kills[1][8] == "[::ffff:192.0.2.7]"


def test_check_mode_and_nothing_to_cut():
    fake = FakeSs()
    result = ConnectionCutter(fake).cut("192.0.2.7", ["5900-5999"], check_mode=True)
    assert result["changed"] and not result["verified"] and fake.kills == []
    assert ConnectionCutter(FakeSs("")).cut("192.0.2.7", ["5900"])["changed"] is False


def test_connections_that_survive_are_an_error():
    with pytest.raises(CutError, match="still established"):
        ConnectionCutter(FakeSs(stubborn=True), sleep=lambda s: None).cut("192.0.2.7", ["5901"])


def test_bad_input():
    with pytest.raises(CutError):
        ConnectionCutter(FakeSs()).cut("192.0.2.7 or 1", ["5901"])
    with pytest.raises(CutError):
        ConnectionCutter(FakeSs()).cut("192.0.2.7", ["x"])


def real_run(argv, data=None):
    proc = subprocess.run(argv, input=data, capture_output=True, text=True, check=False)
    return proc.returncode, proc.stdout, proc.stderr


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("ss"), reason="needs root and ss")
def test_real_cut_resets_the_client_and_spares_other_ports():
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port))
    accepted = server.accept()[0]
    try:
        result = ConnectionCutter(real_run).cut("127.0.0.1", [str(port)], client_port=client.getsockname()[1])
        assert result["verified"] and len(result["cut"]) == 1
        client.settimeout(2)
        with pytest.raises(ConnectionResetError):
            client.recv(1)
    finally:
        for sock in (client, accepted, server):
            sock.close()
