"""A sasldb's users through saslpasswd2 and sasldblistusers2 (module_utils.sasldb), the commands
answered by a fake that records them: the argument vectors, the password on standard input only,
and the errors. The real tools run in tests/integration/test_host_roles.py (the vnc_sasl role)."""

from __future__ import annotations

import socket
from typing import Any

import pytest

from ansible_collections.virtguard.console.plugins.module_utils.sasldb import (
    Sasldb,
    SasldbError,
    default_realm,
    parse_user_list,
)

PATH = "/etc/sasl2/virtguard-vnc.db"


class FakeTools:
    def __init__(self, answer: tuple[int, str, str] = (0, "", "")) -> None:
        self.answer = answer
        self.calls: list[tuple[list[str], dict[str, Any]]] = []
        self.bin_paths: list[tuple[Any, ...]] = []

    def run(self, argv: list[str], **kwargs: Any) -> tuple[int, str, str]:
        self.calls.append((list(argv), kwargs))
        return self.answer

    def get_bin_path(self, *args: Any) -> str:
        self.bin_paths.append(args)
        return f"/fake/{args[0]}"


def database(tools: FakeTools) -> Sasldb:
    return Sasldb(tools.run, tools.get_bin_path, path=PATH, app_name="qemu")


def test_the_user_list_is_name_and_realm_pairs_split_at_the_last_at():
    listing = ("alice@kvm1.example.com: userPassword\n"
               "bob@ops@kvm1.example.com: userPassword\n"
               "carol@kvm1.example.com: cmusaslsecretOTP\n"
               "alice@kvm1.example.com: cmusaslsecretOTP\n"
               "no separator here\n"
               "norealm: userPassword\n"
               "\n")
    assert parse_user_list(listing) == {("alice", "kvm1.example.com"), ("bob@ops", "kvm1.example.com"),
                                        ("carol", "kvm1.example.com")}
    assert parse_user_list("") == set()
    assert parse_user_list("x@y:userPassword\n") == set()  # the separator is ": "


def test_the_tools_are_found_in_the_system_directories():
    tools = FakeTools()
    database(tools)
    assert tools.bin_paths == [("saslpasswd2", True, ["/usr/sbin", "/sbin"]),
                               ("sasldblistusers2", True, ["/usr/sbin", "/sbin"])]


def test_users_are_listed_from_the_database_file():
    tools = FakeTools((0, "alice@kvm1: userPassword\n", ""))
    assert database(tools).users() == {("alice", "kvm1")}
    assert tools.calls == [(["/fake/sasldblistusers2", "-f", PATH], {})]


@pytest.mark.parametrize("answer, reason", [((1, "", "cannot open db"), "cannot open db"),
                                            ((1, "only on stdout", ""), "only on stdout")])
def test_a_listing_that_fails_names_the_database(answer, reason):
    with pytest.raises(SasldbError, match=f"^cannot list the users of {PATH}: {reason}$"):
        database(FakeTools(answer)).users()


def test_a_password_goes_on_standard_input_never_on_the_command_line():
    tools = FakeTools()
    database(tools).set_password("alice", "kvm1.example.com", "s3cret; rm -rf /")
    [(argv, kwargs)] = tools.calls
    assert argv == ["/fake/saslpasswd2", "-p", "-c", "-a", "qemu", "-f", PATH, "-u", "kvm1.example.com", "alice"]
    assert kwargs == {"data": "s3cret; rm -rf /", "binary_data": False}
    assert not any("s3cret" in arg for arg in argv)


def test_a_password_that_cannot_be_set_names_the_user():
    with pytest.raises(SasldbError, match="^saslpasswd2 could not set the password of alice: locked$"):
        database(FakeTools((1, "", "locked"))).set_password("alice", "kvm1", "pw")


def test_a_user_is_deleted_by_name_and_realm():
    tools = FakeTools()
    database(tools).delete("-bob", "kvm1")
    assert tools.calls == [(["/fake/saslpasswd2", "-d", "-a", "qemu", "-f", PATH, "-u", "kvm1", "-bob"], {})]
    with pytest.raises(SasldbError, match="^saslpasswd2 could not delete bob: no such user$"):
        database(FakeTools((1, "no such user", ""))).delete("bob", "kvm1")


def test_the_default_realm_is_the_canonical_name_of_the_host(monkeypatch):
    monkeypatch.setattr(socket, "gethostname", lambda: "kvm1")
    calls: list[tuple[Any, ...]] = []

    def canonical(*args: Any, **kwargs: Any) -> list[tuple[Any, ...]]:
        calls.append((args, kwargs))
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "kvm1.example.com", ("192.0.2.1", 0))]
    monkeypatch.setattr(socket, "getaddrinfo", canonical)
    assert default_realm() == "kvm1.example.com"
    assert calls == [(("kvm1", None), {"flags": socket.AI_CANONNAME})]


@pytest.mark.parametrize("answer", [OSError("no DNS"), [], [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ())]])
def test_without_a_canonical_name_the_realm_is_the_host_name(monkeypatch, answer):
    monkeypatch.setattr(socket, "gethostname", lambda: "kvm1")

    def resolve(*_args: Any, **_kwargs: Any) -> Any:
        if isinstance(answer, Exception):
            raise answer
        return answer
    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    assert default_realm() == "kvm1"
