"""The event source's argument checks: bad input fails at start and names the argument."""

import pytest

from lab.source_runner import source_module

SourceArguments = source_module()["SourceArguments"]
ArgumentError = source_module()["ArgumentError"]


def test_defaults():
    config = SourceArguments({})
    assert config.uris == ["qemu:///system"]
    assert config.domains is None
    assert (config.keepalive_interval, config.keepalive_count) == (5, 3)
    assert config.snapshot is True
    assert config.max_buffered_events == 100000


def test_one_uri_or_a_list_and_rulebook_strings():
    assert SourceArguments({"uri": "qemu+tls://kvm2.example.com/system"}).uris == ["qemu+tls://kvm2.example.com/system"]
    config = SourceArguments({"uri": ["qemu:///system", "qemu+ssh://root@kvm1/system"], "keepalive_interval": "10",
                              "snapshot": "false", "domains": "web-*", "eda_feedback_queue": object()})
    assert config.uris == ["qemu:///system", "qemu+ssh://root@kvm1/system"]
    assert config.keepalive_interval == 10 and config.snapshot is False and config.domains == ["web-*"]


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
    ({"reconnect_delay": 10, "reconnect_max_delay": 5}, "reconnect_max_delay"),
    ({"snapshot": "maybe"}, "snapshot"),
    ({"max_buffered_events": 0}, "max_buffered_events"),
    ({"uris": "qemu:///system"}, "uris"),
])
def test_bad_arguments_name_what_is_wrong(args, names):
    with pytest.raises(ArgumentError, match=names):
        SourceArguments(args)


async def test_main_fails_at_start_on_bad_arguments():
    import asyncio
    with pytest.raises(ArgumentError, match="keepalive_interval"):
        await source_module()["main"](asyncio.Queue(), {"keepalive_interval": -5})


def test_domains_patterns_choose_the_domains_watched():
    assert SourceArguments({}).watches_domain("anything")
    config = SourceArguments({"domains": ["web-*", "db-0[12]"]})
    assert [config.watches_domain(n) for n in ("web-1", "db-01", "db-03", "WEB-1", "mail")] == [
        True, True, False, False, False]
