"""The one validator of the EDA plugins' arguments: strict kinds, ranges, names in messages."""

from __future__ import annotations

import math
from typing import Any

import pytest

from ansible_collections.virtguard.console.plugins.plugin_utils.plugin_arguments import (
    ArgumentError,
    Option,
    check_arguments,
)

OPTIONS = (
    Option("networks", "list", elements="str"),
    Option("enabled", "bool", default=False),
    Option("seconds", "int", default=600, minimum=1, maximum=1000),
    Option("ratio", "float", default=0.5, minimum=0),
    Option("mode", "str", default="a", choices=("a", "b")),
    Option("mapping", "dict", default={}),
)


def check(**given: Any) -> dict[str, Any]:
    return check_arguments("vg.test", OPTIONS, given, origins={"networks": "vg_networks"})


def test_defaults_fill_what_is_missing_or_null_and_are_not_shared():
    first = check(networks=None)
    assert first == {"networks": None, "enabled": False, "seconds": 600, "ratio": 0.5, "mode": "a", "mapping": {}}
    first["mapping"]["x"] = 1
    assert check()["mapping"] == {}


def test_values_are_converted():
    got = check(networks=["10.0.0.0/8"], enabled="True", seconds="60", ratio=2, mode="b", mapping={"k": "v"})
    assert got == {"networks": ["10.0.0.0/8"], "enabled": True, "seconds": 60, "ratio": 2.0, "mode": "b",
                   "mapping": {"k": "v"}}


@pytest.mark.parametrize(("given", "message"), [
    ({"networks": "10.0.0.0/8,192.168.0.0/16"}, "vg.test: networks (rulebook variable vg_networks) must be a list"),
    ({"networks": ["10.0.0.0/8", 7]}, "networks (rulebook variable vg_networks) element 2: must be a string"),
    ({"enabled": 1}, "vg.test: enabled must be true or false"),
    ({"enabled": "0"}, "enabled must be true or false"),
    ({"seconds": math.nan}, "seconds must be a finite number"),
    ({"seconds": 1e11}, "seconds must be at most 1000"),
    ({"seconds": 0}, "seconds must be at least 1"),
    ({"seconds": 1.5}, "seconds must be an integer"),
    ({"seconds": True}, "seconds must be an integer"),
    ({"ratio": "inf"}, "ratio must be a finite number"),
    ({"mode": "c"}, "mode must be one of a, b"),
    ({"mapping": []}, "mapping must be a mapping"),
    ({"unknown": 1}, "unknown argument(s) unknown"),
])
def test_wrong_values_are_named(given, message):
    with pytest.raises(ArgumentError) as error:
        check(**given)
    assert message in str(error.value)


def test_ansible_rulebook_internal_arguments_are_ignored():
    assert "eda_feedback_queue" not in check(eda_feedback_queue=object())


def test_required_option():
    with pytest.raises(ArgumentError, match="vg.test: uri is required"):
        check_arguments("vg.test", (Option("uri", "list", required=True),), {})
