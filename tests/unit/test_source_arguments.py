"""The event source's arguments: bad input fails at start and names the argument; the checks
are the ones every plugin of the collection shares; DOCUMENTATION says what is declared."""

from __future__ import annotations

import asyncio

import pytest
import yaml

from ansible_collections.virtguard.console.plugins.plugin_utils import plugin_arguments
from ansible_collections.virtguard.console.plugins.plugin_utils.source_arguments import (
    SOURCE_OPTIONS,
    ArgumentError,
    SourceArguments,
    direct_endpoint,
)
from lab.source_runner import source_plugin


def test_defaults():
    config = SourceArguments({})
    assert config.uris == ["qemu:///system"]
    assert config.domains is None
    assert (config.keepalive_interval, config.keepalive_count) == (5, 3)
    assert (config.reconnect_delay, config.reconnect_max_delay) == (1.0, 60.0)
    assert config.snapshot is True
    assert config.max_buffered_events == 100000
    assert config.heartbeat_interval == 10.0
    assert (config.delivery_check_interval, config.delivery_check_timeout) == (20.0, 10.0)
    assert (config.max_event_rate, config.shed_seconds, config.max_reply_lag) == (4000, 10.0, 0.0)


def test_defaults_are_not_shared_between_runs():
    SourceArguments({}).uris.append("qemu+tls://changed/system")
    assert SourceArguments({}).uris == ["qemu:///system"]


def test_one_uri_or_a_list_and_rulebook_strings():
    assert SourceArguments({"uri": "qemu+tls://kvm2.example.com/system"}).uris == ["qemu+tls://kvm2.example.com/system"]
    config = SourceArguments({"uri": ["qemu:///system", "qemu+ssh://root@kvm1/system"], "keepalive_interval": "10",
                              "snapshot": "false", "domains": "web-*", "eda_feedback_queue": object()})
    assert config.uris == ["qemu:///system", "qemu+ssh://root@kvm1/system"]
    assert config.keepalive_interval == 10 and config.snapshot is False and config.domains == ["web-*"]


def test_null_arguments_take_their_defaults():
    config = SourceArguments({"uri": None, "keepalive_interval": None, "snapshot": None})
    assert (config.uris, config.keepalive_interval, config.snapshot) == (["qemu:///system"], 5, True)


@pytest.mark.parametrize("args, names", [
    ({"uri": []}, "uri"),
    ({"uri": 5}, "uri"),
    ({"uri": ["qemu:///system", 7]}, "uri"),
    ({"uri": "not a uri"}, "uri"),
    ({"uri": "kvm1"}, "uri"),
    ({"uri": ["qemu:///system", "qemu:///system"]}, "uri"),
    ({"domains": []}, "domains"),
    ({"domains": [""]}, "domains"),
    ({"keepalive_interval": -1}, "keepalive_interval"),
    ({"keepalive_count": "three"}, "keepalive_count"),
    ({"keepalive_count": 2.5}, "keepalive_count"),
    ({"reconnect_delay": 0}, "reconnect_delay"),
    ({"reconnect_delay": True}, "reconnect_delay"),
    ({"reconnect_delay": "nan"}, "reconnect_delay"),
    ({"reconnect_max_delay": float("inf")}, "reconnect_max_delay"),
    ({"reconnect_delay": 10, "reconnect_max_delay": 5}, "reconnect_max_delay"),
    ({"connect_timeout": 0}, "connect_timeout"),
    ({"connect_timeout": "soon"}, "connect_timeout"),
    ({"snapshot": "maybe"}, "snapshot"),
    ({"snapshot": "1"}, "snapshot"),
    ({"snapshot": 0}, "snapshot"),
    ({"max_buffered_events": 0}, "max_buffered_events"),
    ({"heartbeat_interval": -1}, "heartbeat_interval"),
    ({"heartbeat_interval": 0.05}, "heartbeat_interval"),
    ({"heartbeat_interval": "often"}, "heartbeat_interval"),
    ({"heartbeat_interval": False}, "heartbeat_interval"),
    ({"delivery_check_interval": -1}, "delivery_check_interval"),
    ({"delivery_check_interval": "often"}, "delivery_check_interval"),
    ({"delivery_check_timeout": 0}, "delivery_check_timeout"),
    ({"delivery_check_timeout": -2}, "delivery_check_timeout"),
    ({"max_event_rate": -1}, "max_event_rate"),
    ({"max_event_rate": 2.5}, "max_event_rate"),
    ({"shed_seconds": 0}, "shed_seconds"),
    ({"uris": "qemu:///system"}, "uris"),
])
def test_bad_arguments_name_what_is_wrong(args, names):
    with pytest.raises(ArgumentError, match=f"virtguard.console.libvirt_graphics: .*{names}"):
        SourceArguments(args)


def test_heartbeats_can_be_switched_off_or_come_as_often_as_asked():
    assert SourceArguments({"heartbeat_interval": 0}).heartbeat_interval == 0
    assert SourceArguments({"heartbeat_interval": "0.5"}).heartbeat_interval == 0.5
    assert SourceArguments({"heartbeat_interval": 60}).heartbeat_interval == 60


def test_the_delivery_check_can_be_switched_off():
    assert SourceArguments({"delivery_check_interval": 0}).delivery_check_interval == 0


def test_the_argument_error_is_the_one_every_plugin_raises():
    assert ArgumentError is plugin_arguments.ArgumentError


async def test_main_fails_at_start_on_bad_arguments():
    with pytest.raises(ArgumentError, match="keepalive_interval"):
        await source_plugin().main(asyncio.Queue(), {"keepalive_interval": -5})


def test_domains_patterns_choose_the_domains_watched():
    assert SourceArguments({}).watches_domain("anything")
    config = SourceArguments({"domains": ["web-*", "db-0[12]"]})
    assert [config.watches_domain(n) for n in ("web-1", "db-01", "db-03", "WEB-1", "mail")] == [
        True, True, False, False, False]


def test_documentation_states_the_declared_options():
    """DOCUMENTATION (what ansible-doc and readers see) and SOURCE_OPTIONS (what is checked)
    name the same options, with the same types, list elements and defaults."""
    documented = yaml.safe_load(source_plugin().DOCUMENTATION)["options"]
    declared = {option.name: option for option in SOURCE_OPTIONS}
    assert sorted(documented) == sorted(declared)
    for name, option in declared.items():
        doc = documented[name]
        assert doc["type"] == option.kind, name
        assert doc.get("elements") == option.elements, name
        assert doc.get("default") == option.default, name
        assert doc.get("required", False) == option.required, name


@pytest.mark.parametrize(("uri", "endpoint"), [
    ("qemu+tls://kvm1.example.com/system", ("kvm1.example.com", 16514)),
    ("qemu+tls://kvm1:16600/system?no_verify=1", ("kvm1", 16600)),
    ("qemu+tcp://10.0.0.5/system", ("10.0.0.5", 16509)),
    ("qemu://[2001:db8::5]/system", ("2001:db8::5", 16514)),  # a remote URI without transport: TLS
    ("qemu+ssh://root@kvm1/system", None),  # ssh's configuration says where it connects
    ("qemu+libssh2://kvm1/system", None),
    ("qemu:///system", None),
    ("qemu+unix:///session?socket=/run/x.sock", None),
    ("qemu+ext://kvm1/system?command=/bin/x", None),
    ("qemu+tls://kvm1:notaport/system", None),
])
def test_direct_endpoint_is_where_libvirt_itself_connects(uri, endpoint):
    assert direct_endpoint(uri) == endpoint


P = "virtguard.console.libvirt_graphics: "


@pytest.mark.parametrize(("args", "message"), [
    ({"uri": []}, "uri must name at least one libvirt URI, got an empty list"),
    ({"uri": "kvm1"}, "uri 'kvm1' is not a libvirt URI (like qemu:///system)"),
    ({"uri": "qemu:/system"}, "uri 'qemu:/system' is not a libvirt URI (like qemu:///system)"),
    ({"uri": "qemu:///sys tem"}, "uri 'qemu:///sys tem' is not a libvirt URI (like qemu:///system)"),
    ({"uri": "qemu:///system\n"}, "uri 'qemu:///system\\n' is not a libvirt URI (like qemu:///system)"),
    ({"uri": ["qemu+tls://b/system", "qemu+tls://a/system", "qemu+tls://b/system", "qemu+tls://a/system"]},
     "uri qemu+tls://a/system, qemu+tls://b/system given more than once"),
    ({"domains": []}, "domains must be a non-empty list of name patterns, got list []"),
    ({"domains": ["vm*", ""]}, "domains must be a non-empty list of name patterns, got list ['vm*', '']"),
    ({"reconnect_delay": 0}, "reconnect_delay must be greater than 0, got int 0"),
    ({"reconnect_max_delay": -1}, "reconnect_max_delay must be greater than 0, got int -1"),
    ({"connect_timeout": "0"}, "connect_timeout must be greater than 0, got str '0'"),
    ({"reconnect_delay": 10, "reconnect_max_delay": 5.5},
     "reconnect_max_delay (5.5) must not be less than reconnect_delay (10)"),
    ({"delivery_check_timeout": -2.5}, "delivery_check_timeout must be greater than 0, got float -2.5"),
    ({"shed_seconds": 0}, "shed_seconds must be greater than 0, got int 0"),
    ({"heartbeat_interval": 0.05}, "heartbeat_interval must be 0 (off) or at least 0.1, got float 0.05"),
    ({"busy_heartbeat_delay": "0.09"}, "busy_heartbeat_delay must be 0 (off) or at least 0.1, got str '0.09'"),
    ({"keepalive_interval": -1}, "keepalive_interval must be at least 0, got int -1"),
    ({"max_buffered_events": 0}, "max_buffered_events must be at least 1, got int 0"),
])
def test_the_source_specific_checks_say_what_is_wrong_in_whole_messages(args, message):
    with pytest.raises(ArgumentError) as error:
        SourceArguments(args)
    assert str(error.value) == P + message


def test_the_bounds_themselves_are_accepted():
    checked = SourceArguments({"uri": ["qemu:///system", "qemu:///session"], "reconnect_delay": 5,
                               "reconnect_max_delay": 5, "heartbeat_interval": 0.1, "busy_heartbeat_delay": 0,
                               "keepalive_interval": 0, "keepalive_count": 0, "max_buffered_events": 1,
                               "max_event_rate": 0, "delivery_check_interval": 0, "max_reply_lag": 0,
                               "delivery_check_timeout": 0.01, "shed_seconds": 0.01, "connect_timeout": 0.01})
    assert (checked.reconnect_delay, checked.reconnect_max_delay) == (5, 5)
    assert (checked.heartbeat_interval, checked.busy_heartbeat_delay) == (0.1, 0)
    assert (checked.keepalive_interval, checked.keepalive_count, checked.max_buffered_events,
            checked.max_event_rate, checked.delivery_check_interval, checked.max_reply_lag) == (0, 0, 1, 0, 0, 0)
    assert (checked.delivery_check_timeout, checked.shed_seconds, checked.connect_timeout) == (0.01, 0.01, 0.01)
    assert checked.uris == ["qemu:///system", "qemu:///session"]
