# Copyright: virtguard.console contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The ``classify`` event filter's workings: its arguments (declared once), its state (policy,
remediation batches, audit writer) and what it does to one event. The filter file
(``extensions/eda/plugins/event_filter/classify.py``) holds the documentation and the entry
point; tests use this module directly.
"""

from __future__ import annotations

import logging
import re
from typing import Any, Mapping

from ansible_collections.virtguard.console.plugins.module_utils.audit_log import (
    FSYNC_POLICIES,
    AuditError,
    AuditLog,
    AuditWriter,
    event_record,
    health_record,
)
from ansible_collections.virtguard.console.plugins.module_utils.ip_addresses import (
    DEFAULT_SET_SIZE,
    MAX_BLOCK_SECONDS,
    MAX_SET_SIZE,
    format_port_ranges,
    parse_port_ranges,
)
from ansible_collections.virtguard.console.plugins.plugin_utils.console_policy import (
    Classifier,
    ConsolePolicy,
    PolicyError,
)
from ansible_collections.virtguard.console.plugins.plugin_utils.identity_policy import identity_forms
from ansible_collections.virtguard.console.plugins.plugin_utils.plugin_arguments import (
    ArgumentError,
    Option,
    check_arguments,
    where,
)
from ansible_collections.virtguard.console.plugins.plugin_utils.remediation_batches import (
    RemediationBatches,
)
from ansible_collections.virtguard.console.plugins.plugin_utils.rulebook_context import (
    FilterLoad,
    render_arguments,
    variable_origins,
)

PLUGIN = "virtguard.console.classify"
LOGGER = logging.getLogger(PLUGIN)
NFT_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,30}$")
INVENTORY_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")

OPTIONS = (
    Option("trusted_networks", "list", elements="str"),
    Option("cut_untrusted", "bool", default=True),
    Option("console_proxies", "list", elements="str", default=[]),
    # typed entries ({x509_dname, sasl_username}) or, for one release, strings: identity_policy
    Option("allowed_identities", "list", elements="raw", default=[]),
    # true/false, or the identity types a session must carry: x509, sasl, both
    Option("require_identity", "raw", default=False),
    Option("host_map", "dict", default={}),
    Option("block_seconds", "int", default=600, minimum=1, maximum=MAX_BLOCK_SECONDS),
    Option("ipv6_prefix", "int", default=64, minimum=32, maximum=128),
    Option("remediation_holdoff", "float", default=30, minimum=1, maximum=3600),
    Option("second_run_wait", "float", default=0.25, minimum=0, maximum=60),
    Option("max_batch", "int", default=1000, minimum=1, maximum=10000),
    Option("console_ports", "list", elements="raw", default=[]),
    Option("nft_table", "str", default="virtguard"),
    Option("block_set_size", "int", default=DEFAULT_SET_SIZE, minimum=1, maximum=MAX_SET_SIZE),
    Option("bruteforce_threshold", "int", default=0, minimum=0, maximum=1_000_000),
    Option("bruteforce_window", "float", default=60, minimum=1, maximum=7 * 86400),
    Option("remediation", "bool", default=True),
    Option("block_scope", "str", default="hypervisor", choices=("hypervisor", "fleet")),
    Option("fleet_group", "str", default="all"),
    Option("audit_log", "str", default=""),
    Option("audit_fsync", "str", default="interval", choices=FSYNC_POLICIES),
)


class FilterState:
    """The checked arguments and what they configure, for one filter of one source."""

    def __init__(self, args: dict[str, Any], origins: Mapping[str, str]) -> None:
        def fail(name: str, message: str) -> ArgumentError:
            return ArgumentError(f"{where(PLUGIN, name, origins)} {message}")

        try:
            self.console_ports = format_port_ranges(parse_port_ranges(args["console_ports"]))
        except ValueError as exc:
            raise fail("console_ports", str(exc)) from None
        if not NFT_NAME.match(args["nft_table"]):
            raise fail("nft_table",
                       f"must be a letter then letters, digits or _ (at most 31), got {args['nft_table']!r}")
        try:
            self.policy = ConsolePolicy(
                trusted_networks=args["trusted_networks"], allowed_identities=args["allowed_identities"],
                require_identity=args["require_identity"], host_map=args["host_map"],
                block_seconds=args["block_seconds"], ipv6_prefix=args["ipv6_prefix"],
                bruteforce_threshold=args["bruteforce_threshold"], bruteforce_window=args["bruteforce_window"],
                cut_untrusted=args["cut_untrusted"], console_proxies=args["console_proxies"])
        except PolicyError as exc:
            raise fail(exc.option, exc.reason) from None
        if self.policy.identities.untyped:
            LOGGER.warning("virtguard: %s: allowed_identities entries without a type match a certificate DN or a "
                           "SASL user name written exactly so, and will stop working in a later release; write "
                           "them as {x509_dname: ...} or {sasl_username: ...} (docs/rulebooks.md): %s",
                           PLUGIN, "; ".join(repr(entry) for entry in self.policy.identities.untyped))
        self.batches = RemediationBatches(lease=args["remediation_holdoff"], max_batch=args["max_batch"],
                                          second_run_wait=args["second_run_wait"])
        self.classifier = Classifier(self.policy, self.batches if args["remediation"] else None)
        if not INVENTORY_NAME.match(args["fleet_group"]):
            raise fail("fleet_group", f"is not a usable inventory group name, got {args['fleet_group']!r}")
        # fleet: every run goes to every host of the group (each blocks, and cuts where it has sessions)
        self.run_hosts = args["fleet_group"] if args["block_scope"] == "fleet" else None
        self.protected_networks = [str(network) for network in self.policy.protected_networks]
        self.settings = {"nft_table": args["nft_table"], "set_size": args["block_set_size"],
                         "block_seconds": args["block_seconds"], "audit_log": args["audit_log"],
                         "scope": args["block_scope"]}
        self.remediating = args["remediation"]
        self.host_map = args["host_map"]
        self.audit = self._audit_writer(args["audit_log"], args["audit_fsync"], fail) if args["audit_log"] else None
        self._audit_failures_seen = 0
        self._audit_seq = 0  # the next record's ``seq``

    def submit_audit(self, record: dict[str, Any]) -> None:
        """Number the record (``seq``: 0, 1, 2, ... in the order submitted, a lost one's number
        included, so that a gap in the file is records lost) and hand it to the writer."""
        if self.audit is not None:
            record["seq"] = self._audit_seq
            self._audit_seq += 1
            self.audit.submit(record)

    @staticmethod
    def _audit_writer(path: str, fsync: str, fail: Any) -> AuditWriter:
        """Open the audit log now, so that a path that cannot be written stops the start."""
        log = AuditLog(path, fsync=fsync)
        try:
            log.open()
        except AuditError as exc:
            raise fail("audit_log", f"cannot be used: {exc}") from None
        return AuditWriter(log, report=LOGGER)  # it states every lost record in the activation log

    @classmethod
    def from_arguments(cls, raw: Mapping[str, Any], variables: Mapping[str, Any] | None = None) -> FilterState:
        """Render (``{{ var }}``) and check the filter's arguments as the rulebook wrote them."""
        origins = variable_origins(raw)
        rendered = render_arguments(PLUGIN, raw, variables)
        return cls(check_arguments(PLUGIN, OPTIONS, rendered, origins=origins), origins)

    def remediation_settings(self, batch: list[dict[str, Any]]) -> dict[str, Any]:
        """What the remediation run needs besides the batch, all checked at start: the networks
        to block and cut, the sessions to cut alone (never blocked: trusted or proxy addresses),
        and the networks no block may cover."""
        networks = list(dict.fromkeys(entry["network"] for entry in batch if entry["block"]))
        sessions = [{"address": entry["address"], "client_port": entry["client_port"],
                     "console_port": entry["console_port"]} for entry in batch if not entry["block"]]
        own_ports = [str(entry["console_port"]) for entry in batch if entry["console_port"]]
        ports = list(dict.fromkeys(self.console_ports + own_ports))
        return dict(self.settings, networks=networks, sessions=sessions, console_ports=ports,
                    protected_networks=self.protected_networks)

    def audit_failed(self) -> bool:
        """Whether audit records were lost since the last event (the writer states how many,
        exactly, in the activation log, also when no event follows)."""
        if self.audit is None or self.audit.failed == self._audit_failures_seen:
            return False
        self._audit_failures_seen = self.audit.failed
        return True


def source_uris(load: FilterLoad) -> list[str]:
    """The libvirt URIs of the source the filter belongs to, rendered as the source renders
    them (the source checks them itself when it starts)."""
    raw = load.source_args.get("uri", "qemu:///system")
    rendered = render_arguments("virtguard.console.libvirt_graphics", {"uri": raw}, load.variables)["uri"]
    return [str(uri) for uri in ([rendered] if isinstance(rendered, str) else list(rendered or []))]


def classify_event(state: FilterState, event: dict[str, Any], now: float) -> dict[str, Any]:
    """Judge one graphics event (``event.graphics``) or hypervisor health event
    (``event.hypervisor``), queue or send its remediation, audit it; never raises for a
    malformed event (it is audited with the verdict ``error``). Health events are audited when
    the state changed (the periodic ones only serve as the batches' clock)."""
    graphics = event.get("graphics")
    health = event.get("hypervisor") if graphics is None else None
    try:
        if isinstance(graphics, dict):
            verdict = state.classifier.classify(graphics, now)
        else:
            verdict = state.classifier.classify_health(health or {}, now)
    except Exception as exc:  # a malformed event must not stop the activation; keep it on record
        LOGGER.exception("virtguard: cannot judge a %s event", "graphics" if graphics is not None else "health")
        verdict = {"verdict": "error", "reasons": [], "remediate": False, "queued": False,
                   "error": type(exc).__name__}
    if verdict.get("remediate"):
        verdict["remediation"] = state.remediation_settings(verdict["batch"])
        event.setdefault("meta", {})["hosts"] = state.run_hosts or verdict["target_host"]
    if state.audit is not None:
        if state.audit_failed():
            verdict["audit_error"] = True
        if isinstance(graphics, dict):
            record = event_record(graphics, verdict)
            if graphics.get("subject"):
                record["identities"] = identity_forms(graphics["subject"])
            state.submit_audit(record)
        elif verdict.get("changed") or verdict.get("remediate") or verdict["verdict"] == "error":
            state.submit_audit(health_record(health, verdict))
    event["virtguard"] = verdict
    return event
