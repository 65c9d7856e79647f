# Copyright: virtguard.console contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The authorization policy for console sessions: the one place that decides whether a
session is allowed, and why not.

``ConsolePolicy`` holds the configuration (trusted networks, allowed identities, brute-force
threshold, ...), built from the filter's checked arguments. ``Classifier`` applies it to
``event.graphics`` payloads one after another, keeping the little state the policy needs: the
failed authentications per network (brute force) and the offenders waiting for remediation
(``remediation_batches``).

The verdict it returns (``event.virtguard`` in the rulebooks) holds only values this module
made or validated: reason codes, normalised IP addresses and networks, integers, a hex session
id, an inventory host name. Text the console client chose (certificate DN, SASL user name)
never goes into it, so playbooks that read only ``event.virtguard`` never see
attacker-controlled text.
"""

from __future__ import annotations

import collections
import functools
import re
from typing import Any, Mapping
from urllib.parse import urlsplit

from ansible_collections.virtguard.console.plugins.module_utils.ip_addresses import (
    IPAddress,
    IPNetwork,
    block_network,
    normalize_address,
    parse_network,
)
from ansible_collections.virtguard.console.plugins.plugin_utils.identity_policy import (
    IdentityError,
    IdentityPolicy,
    parse_require,
    session_identities,
)
from ansible_collections.virtguard.console.plugins.plugin_utils.remediation_batches import (
    Offender,
    RemediationBatches,
)

# Reason codes, in the order they are checked.
UNTRUSTED_NETWORK = "untrusted_network"
IDENTITY_NOT_ALLOWED = "identity_not_allowed"
IDENTITY_MISSING = "identity_missing"
SPICE_NO_IDENTITY = "spice_no_identity"  # identity required, and SPICE never carries one
UNPARSABLE_ADDRESS = "unparsable_address"
BRUTEFORCE = "bruteforce"
# Where an offending session is cut without a block: its address is trusted, or it is a console
# proxy's (every user behind the proxy shares it). Never blocked, never cut for its address.
PROTECTED_ADDRESS = "protected_address"

PHASES = ("connect", "initialize", "disconnect")
# The states of a hypervisor's watch in the source's health events (docs/payload.md).
HEALTH_STATES = ("connecting", "connected", "reconnecting", "unreachable", "blind", "shedding", "resynchronised")
PROTOCOLS = ("vnc", "spice")
# The verdict of the events of a SPICE client's other channels: the client is judged once, on
# its primary (main) channel's events.
CHANNEL = "channel"
# The verdict of a brute force the policy may not block (the failing address is trusted, or a
# console proxy's): reported for a rule to match, nothing is blocked or cut.
REPORT = "report"
# libvirt's auth scheme of a console without authentication: leaving it before initialize is
# not a failed login (there is nothing to fail), e.g. a client that QEMU dropped because another
# one took the console exclusively.
NO_AUTHENTICATION = "none"

_HOST_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:@-]*$")
_SESSION_ID = re.compile(r"^[0-9a-f]{1,64}$")
DEFAULT_MAX_TRACKED_NETWORKS = 100_000


class PolicyError(ValueError):
    """The policy configuration is wrong: ``option`` names the setting, the message says why."""

    def __init__(self, option: str, message: str) -> None:
        super().__init__(f"{option}: {message}")
        self.option = option
        self.reason = message


def parse_port(service: Any) -> int | None:
    """A service string as a TCP port number, or None."""
    text = str(service)
    if text.isdigit() and 0 < int(text) < 65536:
        return int(text)
    return None


def hypervisor_host(uri: str) -> str | None:
    """The host part of a libvirt URI (``qemu+ssh://root@kvm1/system`` -> ``kvm1``), or None
    for a local URI (``qemu:///system``, ``qemu+unix:///session?socket=...``)."""
    try:
        return urlsplit(uri).hostname or None
    except ValueError:
        return None


def target_host_for(uri: str, host_map: Mapping[str, str] | None = None) -> str:
    """The inventory host that remediates sessions of the hypervisor at ``uri``.

    ``host_map`` maps a URI or a URI's host name to an inventory host and wins; otherwise the
    URI's host name, or ``localhost`` for a URI without a host."""
    host_map = host_map or {}
    host = hypervisor_host(uri)
    target = host_map.get(uri) or (host and host_map.get(host)) or host or "localhost"
    if not _HOST_NAME.match(target):
        raise PolicyError("host_map", f"target host {target!r} (for {uri}) is not a usable inventory host name")
    return target


def parse_networks(option: str, texts: list[str]) -> list[IPNetwork]:
    """CIDRs and addresses as network values; PolicyError names ``option`` and the bad item."""
    networks: list[IPNetwork] = []
    for text in texts:
        try:
            networks.append(parse_network(text))
        except ValueError as exc:
            raise PolicyError(option, str(exc)) from None
    return networks


class ConsolePolicy:
    """The configuration, from the filter's checked arguments (``plugin_arguments``).

    ``trusted_networks`` None switches the network rule off (every address is trusted);
    an empty list trusts nothing. ``cut_untrusted`` False keeps the trusted networks for what
    may be blocked without cutting the sessions from outside them: the brute-force rulebook.
    ``console_proxies``: addresses (or networks) of console proxies (websockify/noVNC, an SSH
    tunnel's end): every user behind a proxy arrives from its address, so sessions from there
    are judged by identity only and the address is never blocked.

    Trusted and proxy addresses are *protected*: never blocked (nor any network that holds one)
    and never cut for their address; an offending session from one (identity policy) is cut
    alone, by its exact connection; a brute force from one is reported, not blocked."""

    def __init__(self, trusted_networks: list[str] | None = None, allowed_identities: list[Any] | None = None,
                 require_identity: Any = False, host_map: Mapping[str, str] | None = None,
                 block_seconds: int = 600, ipv6_prefix: int = 64,
                 bruteforce_threshold: int = 0, bruteforce_window: float = 60, cut_untrusted: bool = True,
                 console_proxies: list[str] | None = None) -> None:
        self.trusted_networks: list[IPNetwork] | None = None
        if trusted_networks is not None:
            self.trusted_networks = parse_networks("trusted_networks", trusted_networks)
        self.console_proxies = parse_networks("console_proxies", console_proxies or [])
        try:
            parse_require(require_identity)  # checked first, so that its error names its own option
        except IdentityError as exc:
            raise PolicyError("require_identity", str(exc)) from None
        try:
            self.identities = IdentityPolicy(allowed_identities or (), require_identity)
        except IdentityError as exc:
            raise PolicyError("allowed_identities", str(exc)) from None
        self.require_identity = bool(self.identities.require)
        self.host_map = {str(k): str(v) for k, v in (host_map or {}).items()}
        for uri_or_host, target in self.host_map.items():
            if not _HOST_NAME.match(target):
                raise PolicyError("host_map", f"{uri_or_host!r} -> {target!r} is not a usable inventory host name")
        self.block_seconds = block_seconds
        self.ipv6_prefix = ipv6_prefix
        self.bruteforce_threshold = bruteforce_threshold
        self.bruteforce_window = bruteforce_window
        self.cut_untrusted = cut_untrusted

    @property
    def protected_networks(self) -> list[IPNetwork]:
        """What no block may cover: the trusted networks and the console proxies, as listed
        (without a network rule, ``trusted_networks`` None, only the proxies)."""
        return (self.trusted_networks or []) + self.console_proxies

    def is_proxy(self, address: IPAddress | None) -> bool:
        """Whether a normalised address is a console proxy's."""
        return address is not None and any(address in network for network in self.console_proxies)

    def is_trusted(self, address: IPAddress | None) -> bool:
        """Whether a normalised address is in a trusted network (always, with no network rule)."""
        if self.trusted_networks is None:
            return True
        if address is None:
            return False
        return any(address in network for network in self.trusted_networks)

    def is_protected(self, address: IPAddress | None) -> bool:
        """Whether an address may never be blocked nor cut for its address: in a listed trusted
        network, or a proxy's."""
        return address is not None and any(address in network for network in self.protected_networks)

    def network_to_block(self, address: IPAddress) -> IPNetwork:
        """The address's /ipv6_prefix (IPv6) or the address (IPv4); never a network that holds
        a trusted or a proxy address (then the address alone)."""
        return block_network(address, self.ipv6_prefix, self.protected_networks)

    def identity_reasons(self, graphics: Mapping[str, Any]) -> list[str]:
        """The identity rule for an initialized session: reason codes, empty when allowed."""
        if graphics.get("protocol") == "spice":
            # libvirt passes no identity for SPICE (whatever its TLS and SASL say): required,
            # it is missing for a reason of its own; otherwise there is nothing to check
            return [SPICE_NO_IDENTITY] if self.require_identity else []
        identities = session_identities(graphics.get("subject") or ())
        reasons = []
        if self.identities.missing(identities):
            reasons.append(IDENTITY_MISSING)
        if not self.identities.allows(identities):
            reasons.append(IDENTITY_NOT_ALLOWED)
        return reasons


class FailedLogins:
    """Failed authentications per (host, network) within the window, for at most
    ``max_networks`` networks (the least recently failing are forgotten first)."""

    def __init__(self, threshold: int, window: float, max_networks: int = DEFAULT_MAX_TRACKED_NETWORKS) -> None:
        self.threshold = threshold
        self.window = window
        self.max_networks = max_networks
        self.times: collections.OrderedDict[tuple[str, str], collections.deque[float]] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self.times)

    def failed(self, key: tuple[str, str], now: float) -> bool:
        """Count one failure; True when it reaches the threshold (the count starts again)."""
        times = self.times.pop(key, None)
        if times is None:
            times = collections.deque(maxlen=self.threshold)
        self.times[key] = times
        times.append(now)
        while times and times[0] <= now - self.window:
            times.popleft()
        if len(self.times) > self.max_networks:
            self.times.popitem(last=False)
        if len(times) >= self.threshold:
            del self.times[key]
            return True
        return False


class Classifier:
    """Applies a ``ConsolePolicy`` to graphics payloads in arrival order and queues what must
    be remediated."""

    def __init__(self, policy: ConsolePolicy, batches: RemediationBatches | None) -> None:
        self.policy = policy
        # parsing addresses and URIs is most of a verdict's cost; clients and hypervisors repeat
        self.address_of = functools.lru_cache(maxsize=65536)(normalize_address)
        self.network_of = functools.lru_cache(maxsize=65536)(policy.network_to_block)
        self.target_of = functools.lru_cache(maxsize=4096)(functools.partial(target_host_for, host_map=policy.host_map))
        # None: verdicts only, nothing is queued for remediation (the console_audit rulebook)
        self.batches = batches if batches is not None else RemediationBatches(lease=0)
        self.remediating = batches is not None
        self.failures = FailedLogins(policy.bruteforce_threshold, policy.bruteforce_window)

    def classify(self, graphics: Mapping[str, Any], now: float) -> dict[str, Any]:
        """The verdict for one ``event.graphics``; ``now`` is a monotonic time in seconds."""
        policy = self.policy
        phase = graphics.get("phase")
        remote = graphics.get("remote") or {}
        family = remote.get("family")
        address = self.address_of(str(remote.get("node", ""))) if family != "unix" else None
        raw_id = str((graphics.get("session") or {}).get("id", ""))
        session_id = raw_id if _SESSION_ID.match(raw_id) else ""
        session = graphics.get("session") or {}
        protocol = graphics.get("protocol")
        # a payload without these (an older source) is one VNC client per connection
        primary = session.get("primary") is not False
        channels_left = session.get("channels")
        verdict: dict[str, Any] = {
            "verdict": "allow" if primary else CHANNEL,
            "reasons": [],
            "remediate": False,
            "queued": False,
            "session_id": session_id,
            "phase": phase if phase in PHASES else "unknown",
            "protocol": protocol if protocol in PROTOCOLS else "vnc",
            "primary": primary,
            "snapshot": graphics.get("snapshot") is True,
            "remote": {
                "family": "unix" if family == "unix" else (f"ipv{address.version}" if address else "unknown"),
                "address": str(address) if address else None,
                "port": parse_port(remote.get("service", "")),
                "trusted": None,
                "proxy": None,
                "network": None,
            },
            "local_port": parse_port((graphics.get("local") or {}).get("service", "")),
            "target_host": self.target_of(str((graphics.get("hypervisor") or {}).get("uri", ""))),
            "block_seconds": policy.block_seconds,
        }
        host = verdict["target_host"]
        reasons: list[str] = verdict["reasons"]
        if family != "unix":
            verdict["remote"]["trusted"] = policy.is_trusted(address)
            verdict["remote"]["proxy"] = policy.is_proxy(address)
        # never blocked, never cut for its address: an offending session from here is cut alone
        protected = policy.is_protected(address)
        network = self.network_of(address) if address is not None else None
        verdict["remote"]["network"] = str(network) if network is not None else None
        queued = False

        if not primary:
            # another channel of a client judged on its primary channel's events: nothing to
            # judge; its last channel's disconnect ends the client's session
            if verdict["phase"] == "disconnect" and not channels_left:
                self.batches.ended(host, session_id)
        elif verdict["phase"] in ("connect", "initialize"):
            if (family != "unix" and policy.cut_untrusted and not verdict["remote"]["trusted"]
                    and not verdict["remote"]["proxy"]):
                reasons.append(UNTRUSTED_NETWORK if address is not None else UNPARSABLE_ADDRESS)
            if verdict["phase"] == "initialize":
                reasons.extend(policy.identity_reasons(graphics))
            if reasons:
                verdict["verdict"] = "cut"
                # a protected session is cut by its exact connection, which needs its client port
                cuttable = network is not None and (not protected or verdict["remote"]["port"] is not None)
                if address is not None and cuttable and self.remediating:
                    queued = True
                    self.batches.add(host, Offender(session_id, str(address), str(network), verdict["remote"]["port"],
                                                    verdict["local_port"], list(reasons), block=not protected), now)
        elif verdict["phase"] == "disconnect":
            # the session ends with its last channel (a SPICE client's main channel may leave first)
            if channels_left:
                was_offender = self.batches.holds(host, session_id)
            else:
                was_offender = self.batches.ended(host, session_id)
            verdict["ended_by"] = "domain" if session.get("ended_by") == "domain" else "client"
            verdict["failed_login"] = self.failed_login(graphics, was_offender)
            # failed() counts this failure: only a failed login of a network that has one is counted.
            if (verdict["failed_login"] and policy.bruteforce_threshold > 0 and network is not None
                    and self.failures.failed((host, str(network)), now)):
                reasons.append(BRUTEFORCE)
                if protected:
                    # trusted or a proxy's: everyone there would lose the console; report it
                    verdict["verdict"] = REPORT
                else:
                    verdict["verdict"] = "block"
                    if self.remediating:
                        queued = True
                        self.batches.add(host, Offender("", str(address), str(network), None, verdict["local_port"],
                                                        [BRUTEFORCE]), now)

        if not self.send_due_batch(host, now, verdict) and queued:
            verdict["queued"] = True
        return verdict

    @staticmethod
    def failed_login(graphics: Mapping[str, Any], was_offender: bool) -> bool:
        """Whether a primary channel's disconnect is a failed login: the client left before
        ``initialize`` on a console that asks for authentication. Not one: an offender's
        session (remediation cut it), a snapshot's (the source did not see it), a console
        without authentication (auth scheme ``none``: nothing to fail; QEMU also drops the other
        clients of a console that one client takes exclusively), or a session whose domain
        stopped under it."""
        session = graphics.get("session") or {}
        return not (was_offender or graphics.get("snapshot") is True or session.get("authenticated")
                    or session.get("ended_by") == "domain" or graphics.get("auth_scheme") == NO_AUTHENTICATION)

    def send_due_batch(self, host: str, now: float, verdict: dict[str, Any], heartbeat: bool = False) -> bool:
        """Put the host's next batch on ``verdict`` when one is due now (``heartbeat``: the event
        is a heartbeat of the host, which may send a second run); whether one was."""
        batch = self.batches.take_batch(host, now, heartbeat) if self.remediating else []
        if batch:
            verdict["remediate"] = True
            verdict["batch"] = [offender.as_batch_entry() for offender in batch]
        return bool(batch)

    def classify_health(self, health: Mapping[str, Any], now: float) -> dict[str, Any]:
        """The verdict for one hypervisor health event of the source (``event.hypervisor``):
        its state, checked, and the host's next batch when one is due. Health events come
        periodically whatever the hypervisor does, so a run that has to be retried after the
        holdoff is sent even when the host is quiet."""
        state = health.get("state")
        previous = health.get("previous")
        verdict: dict[str, Any] = {
            "verdict": "health",
            "reasons": [],
            "remediate": False,
            "queued": False,
            "state": state if state in HEALTH_STATES else "unknown",
            "previous": previous if previous in HEALTH_STATES else None,
            "changed": health.get("changed") is True,
            "target_host": self.target_of(str(health.get("uri", ""))),
            "block_seconds": self.policy.block_seconds,
        }
        self.send_due_batch(verdict["target_host"], now, verdict, heartbeat=not verdict["changed"])
        return verdict
