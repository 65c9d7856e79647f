# -*- coding: utf-8 -*-
# Copyright: virtguard.console contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The authorization policy for console sessions: the one place that decides whether a
session is allowed, and why not.

``ConsolePolicy`` holds the configuration (trusted networks, allowed identities, brute-force
threshold, ...) and ``Classifier`` applies it to ``event.graphics`` payloads, one after another,
keeping the little state the policy needs: which addresses already have a remediation under
way (so a reconnect storm from one address costs one playbook run, not one per connection)
and the failed authentications per address (brute force).

The verdict it returns (``event.virtguard`` in the rulebooks) holds only values this module
made or validated: reason codes, a normalised IP address, integers, a hex session id, an
inventory host name. Text the console client chose (certificate DN, SASL user name) never goes
into it, so playbooks that read only ``event.virtguard`` never see attacker-controlled text.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import collections
import ipaddress
import re
from urllib.parse import urlsplit

# Reason codes, in the order they are checked.
UNTRUSTED_NETWORK = "untrusted_network"
IDENTITY_NOT_ALLOWED = "identity_not_allowed"
IDENTITY_MISSING = "identity_missing"
UNPARSABLE_ADDRESS = "unparsable_address"
BRUTEFORCE = "bruteforce"

# Subject types that name who the client is (libvirt's identity types).
IDENTITY_TYPES = ("x509dname", "saslUsername")

DEFAULT_CONSOLE_PORTS = ("5900-5999",)
_HOST_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:@-]*$")
_IPV4_MAPPED = ipaddress.ip_network("::ffff:0:0/96")


class PolicyError(ValueError):
    """The policy configuration is wrong; the message names the setting."""


# -- addresses ------------------------------------------------------------------------------

def normalize_address(node):
    """A remote node as an ``ipaddress`` object: IPv4-mapped IPv6 as IPv4, no scope id.

    Returns None when ``node`` is not an IP address."""
    if not isinstance(node, str) or not node:
        return None
    try:
        address = ipaddress.ip_address(node.split("%", 1)[0])
    except ValueError:
        return None
    if address.version == 6 and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def parse_network(text):
    """A CIDR (host bits allowed) as a network; IPv4-mapped IPv6 networks become IPv4."""
    try:
        network = ipaddress.ip_network(str(text).strip(), strict=False)
    except ValueError as exc:
        raise PolicyError("trusted_networks: %r is not a network (%s)" % (text, exc))
    if network.version == 6 and network.subnet_of(_IPV4_MAPPED):
        network = ipaddress.ip_network(
            "%s/%d" % (network.network_address.ipv4_mapped, network.prefixlen - 96))
    return network


def parse_port(service):
    """A service string as a TCP port number, or None."""
    text = str(service)
    if text.isdigit() and 0 < int(text) < 65536:
        return int(text)
    return None


def parse_port_ranges(ports):
    """``[5900, "5900-5999"]`` as a list of ``(first, last)`` pairs, checked."""
    ranges = []
    for item in ports:
        text = str(item).strip()
        first, sep, last = text.partition("-")
        if not first.isdigit() or (sep and not last.isdigit()):
            raise PolicyError("ports: %r is neither a port nor a range like 5900-5999" % (item,))
        low, high = int(first), int(last) if sep else int(first)
        if not 0 < low <= high < 65536:
            raise PolicyError("ports: %r is out of range 1-65535" % (item,))
        ranges.append((low, high))
    return ranges


def hypervisor_host(uri):
    """The host part of a libvirt URI (``qemu+ssh://root@kvm1/system`` -> ``kvm1``), or None
    for a local URI (``qemu:///system``, ``qemu+unix:///session?socket=...``)."""
    try:
        return urlsplit(uri).hostname or None
    except ValueError:
        return None


def target_host_for(uri, host_map=None):
    """The inventory host that remediates sessions of the hypervisor at ``uri``.

    ``host_map`` maps a URI or a URI's host name to an inventory host and wins; otherwise the
    URI's host name, or ``localhost`` for a URI without a host."""
    host_map = host_map or {}
    host = hypervisor_host(uri)
    target = host_map.get(uri) or (host and host_map.get(host)) or host or "localhost"
    if not _HOST_NAME.match(target):
        raise PolicyError("target host %r (for %s) is not a usable inventory host name" % (target, uri))
    return target


def identities_of(graphics):
    """Every identity (certificate DN, SASL user name) the session carries, verbatim."""
    return [item["name"] for item in graphics.get("subject") or ()
            if item.get("type") in IDENTITY_TYPES and item.get("name")]


# -- configuration --------------------------------------------------------------------------

def _as_list(name, value):
    if value is None or value == "":
        return []
    if isinstance(value, (str, bytes)):
        return [value]
    if not isinstance(value, (list, tuple)):
        raise PolicyError("%s must be a list, got %s" % (name, type(value).__name__))
    return list(value)


def _as_bool(name, value):
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "yes", "on", "1", "false", "no", "off", "0", ""):
        return value.strip().lower() in ("true", "yes", "on", "1")
    raise PolicyError("%s must be true or false, got %r" % (name, value))


def _as_number(name, value, minimum=0.0):
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise PolicyError("%s must be a number, got %r" % (name, value))
    if isinstance(value, bool) or number < minimum:
        raise PolicyError("%s must be a number of at least %s, got %r" % (name, minimum, value))
    return number


class ConsolePolicy:
    """The configuration, checked once.

    ``trusted_networks`` None switches the network rule off (every address is trusted);
    an empty list trusts nothing."""

    def __init__(self, trusted_networks=None, allowed_identities=None, require_identity=False,
                 host_map=None, remediation_holdoff=60, block_seconds=600,
                 bruteforce_threshold=0, bruteforce_window=60):
        if trusted_networks is None:
            self.trusted_networks = None
        else:
            self.trusted_networks = [parse_network(n) for n in _as_list("trusted_networks", trusted_networks)]
        self.allowed_identities = frozenset(str(i) for i in _as_list("allowed_identities", allowed_identities))
        self.require_identity = _as_bool("require_identity", require_identity)
        if host_map in (None, ""):
            host_map = {}
        if not isinstance(host_map, dict):
            raise PolicyError("host_map must be a mapping of URI or host name to inventory host")
        self.host_map = {str(k): str(v) for k, v in host_map.items()}
        for uri_or_host, target in self.host_map.items():
            if not _HOST_NAME.match(target):
                raise PolicyError("host_map: %r -> %r is not a usable inventory host name" % (uri_or_host, target))
        self.block_seconds = _as_number("block_seconds", block_seconds, minimum=1)
        # A remediation covers its address this long; after it a new event may trigger another
        # (self-healing if a playbook run failed), never longer than the block itself.
        self.remediation_holdoff = min(_as_number("remediation_holdoff", remediation_holdoff, minimum=0),
                                       self.block_seconds)
        self.bruteforce_threshold = int(_as_number("bruteforce_threshold", bruteforce_threshold))
        self.bruteforce_window = _as_number("bruteforce_window", bruteforce_window, minimum=1)

    def is_trusted(self, address):
        """Whether a normalised address is in a trusted network (always, with no network rule)."""
        if self.trusted_networks is None:
            return True
        if address is None:
            return False
        return any(address in network for network in self.trusted_networks)

    def identity_reasons(self, graphics):
        """The identity rule for an initialized session: reason codes, empty when allowed."""
        identities = identities_of(graphics)
        if not identities:
            return [IDENTITY_MISSING] if self.require_identity else []
        if self.allowed_identities and not any(i in self.allowed_identities for i in identities):
            return [IDENTITY_NOT_ALLOWED]
        return []


# -- verdicts over a stream of events -------------------------------------------------------

class ExpiringKeys:
    """Keys remembered until a deadline, with pruning so memory stays bounded under scans."""

    def __init__(self):
        self.deadlines = collections.OrderedDict()
        self._next_prune = 0.0

    def get(self, key, now):
        entry = self.deadlines.get(key)
        if entry is None or entry[0] <= now:
            return None
        return entry[1]

    def put(self, key, value, until, now):
        self.deadlines.pop(key, None)
        self.deadlines[key] = (until, value)
        self.prune(now)

    def prune(self, now):
        if now < self._next_prune:
            return
        self._next_prune = now + 1.0
        for key in [k for k, (until, _v) in self.deadlines.items() if until <= now]:
            del self.deadlines[key]


class Classifier:
    """Applies a ``ConsolePolicy`` to graphics payloads in arrival order."""

    def __init__(self, policy):
        self.policy = policy
        # (target host, address) -> session id of the remediation that covers it
        self.remediations = ExpiringKeys()
        # session ids this classifier decided to cut: their disconnect is not a failed login
        self.cut_sessions = ExpiringKeys()
        # (target host, address) -> deque of failed-authentication times
        self.failures = {}
        self._next_failure_prune = 0.0

    def classify(self, graphics, now):
        """The verdict for one ``event.graphics``; ``now`` is a monotonic time in seconds."""
        policy = self.policy
        phase = graphics.get("phase")
        remote = graphics.get("remote") or {}
        family = remote.get("family")
        address = normalize_address(remote.get("node")) if family != "unix" else None
        session_id = str((graphics.get("session") or {}).get("id", ""))
        verdict = {
            "verdict": "allow",
            "reasons": [],
            "remediate": False,
            "covered_by": None,
            "session_id": session_id if re.match(r"^[0-9a-f]*$", session_id) else "",
            "phase": phase if phase in ("connect", "initialize", "disconnect") else "unknown",
            "snapshot": bool(graphics.get("snapshot")),
            "remote": {
                "family": "unix" if family == "unix" else ("ipv%d" % address.version if address else "unknown"),
                "address": str(address) if address else None,
                "port": parse_port(remote.get("service", "")),
                "trusted": None,
            },
            "local_port": parse_port((graphics.get("local") or {}).get("service", "")),
            "target_host": None,
            "block_seconds": policy.block_seconds,
        }
        hypervisor_uri = str((graphics.get("hypervisor") or {}).get("uri", ""))
        verdict["target_host"] = target_host_for(hypervisor_uri, policy.host_map)

        reasons = verdict["reasons"]
        if family != "unix":
            verdict["remote"]["trusted"] = policy.is_trusted(address)
        if phase in ("connect", "initialize"):
            if family != "unix" and not verdict["remote"]["trusted"]:
                reasons.append(UNTRUSTED_NETWORK if address is not None else UNPARSABLE_ADDRESS)
            if phase == "initialize":
                reasons.extend(policy.identity_reasons(graphics))
            if reasons:
                verdict["verdict"] = "cut"
        elif phase == "disconnect" and policy.bruteforce_threshold > 0 and address is not None:
            if self._failed_login(graphics, session_id, verdict["target_host"], address, now):
                reasons.append(BRUTEFORCE)
                verdict["verdict"] = "block"

        if reasons and address is not None:
            if verdict["verdict"] == "cut":
                self.cut_sessions.put(session_id, True, now + 2 * policy.remediation_holdoff + 60, now)
            key = (verdict["target_host"], str(address))
            covering = self.remediations.get(key, now)
            if covering is None:
                self.remediations.put(key, session_id, now + policy.remediation_holdoff, now)
                verdict["remediate"] = True
            else:
                verdict["covered_by"] = covering
        return verdict

    def _failed_login(self, graphics, session_id, target_host, address, now):
        """Count a disconnect that never initialized; True when it reaches the threshold."""
        policy = self.policy
        session = graphics.get("session") or {}
        if graphics.get("snapshot") or session.get("authenticated"):
            return False
        if self.cut_sessions.get(session_id, now):
            return False  # we cut it: not the client failing to log in
        key = (target_host, str(address))
        times = self.failures.setdefault(key, collections.deque())
        times.append(now)
        horizon = now - policy.bruteforce_window
        while times and times[0] <= horizon:
            times.popleft()
        if now >= self._next_failure_prune:
            self._next_failure_prune = now + 1.0
            for stale in [k for k, d in self.failures.items() if not d or d[-1] <= horizon]:
                del self.failures[stale]
        if len(times) >= policy.bruteforce_threshold:
            times.clear()
            return True
        return False
