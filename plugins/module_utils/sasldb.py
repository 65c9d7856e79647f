# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Users of a Cyrus SASL password database (sasldb), through ``saslpasswd2`` and
``sasldblistusers2``. Passwords go to ``saslpasswd2`` on its standard input (``-p``), never
on its command line, where ``ps`` would show them.

QEMU opens its SASL server without a realm, so the sasldb looks users up under the host's
canonical name: a user made without ``-u`` is stored as ``NAME@FQDN`` and logs in as ``NAME``.
"""

from __future__ import annotations

import socket

from ansible_collections.virtguard.console.plugins.module_utils.host_commands import GetBinPath, Run


class SasldbError(Exception):
    """An expected failure, reported to the user as the module's ``msg``."""


def default_realm() -> str:
    """The realm saslpasswd2 and QEMU use when none is given: the host's canonical name,
    resolved the way Cyrus SASL resolves it (gethostname, then getaddrinfo's canonname)."""
    name = socket.gethostname()
    try:
        return socket.getaddrinfo(name, None, flags=socket.AI_CANONNAME)[0][3] or name
    except (OSError, IndexError):
        return name


def parse_user_list(text: str) -> set[tuple[str, str]]:
    """``sasldblistusers2`` lines (``name@realm: property``) as (name, realm) pairs."""
    users = set()
    for line in text.splitlines():
        entry, sep, _property = line.partition(": ")
        if not sep or "@" not in entry:
            continue
        name, realm = entry.rsplit("@", 1)
        users.add((name, realm))
    return users


class Sasldb:
    def __init__(self, run_command: Run, get_bin_path: GetBinPath, *, path: str, app_name: str) -> None:
        self.run_command = run_command
        self.saslpasswd2 = get_bin_path("saslpasswd2", True, ["/usr/sbin", "/sbin"])
        self.listusers = get_bin_path("sasldblistusers2", True, ["/usr/sbin", "/sbin"])
        self.path = path
        self.app_name = app_name

    def users(self) -> set[tuple[str, str]]:
        # A missing database lists nothing (and is not created by listing).
        rc, out, err = self.run_command([self.listusers, "-f", self.path])
        if rc != 0:
            raise SasldbError(f"cannot list the users of {self.path}: {err or out}")
        return parse_user_list(out)

    def set_password(self, name: str, realm: str, password: str) -> None:
        argv = [self.saslpasswd2, "-p", "-c", "-a", self.app_name, "-f", self.path,
                "-u", realm, name]
        rc, out, err = self.run_command(argv, data=password, binary_data=False)
        if rc != 0:
            raise SasldbError(f"saslpasswd2 could not set the password of {name}: {err or out}")

    def delete(self, name: str, realm: str) -> None:
        argv = [self.saslpasswd2, "-d", "-a", self.app_name, "-f", self.path, "-u", realm, name]
        rc, out, err = self.run_command(argv)
        if rc != 0:
            raise SasldbError(f"saslpasswd2 could not delete {name}: {err or out}")
