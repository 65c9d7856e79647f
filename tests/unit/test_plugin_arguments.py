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
    ({"networks": "10.0.0.0/8,192.168.0.0/16"},
     "vg.test: networks (rulebook variable vg_networks) must be a list, got str '10.0.0.0/8,192.168.0.0/16'"),
    ({"networks": ["10.0.0.0/8", 7]},
     "vg.test: networks (rulebook variable vg_networks) element 2: must be a string, got int 7"),
    ({"networks": [7]}, "vg.test: networks (rulebook variable vg_networks) element 1: must be a string, got int 7"),
    ({"enabled": 1}, "vg.test: enabled must be true or false, got int 1"),
    ({"enabled": "0"}, "vg.test: enabled must be true or false, got str '0'"),
    ({"seconds": math.nan}, "vg.test: seconds must be a finite number, got float nan"),
    ({"seconds": 1e11}, "vg.test: seconds must be at most 1000, got float 100000000000.0"),
    ({"seconds": 1001}, "vg.test: seconds must be at most 1000, got int 1001"),
    ({"seconds": 0}, "vg.test: seconds must be at least 1, got int 0"),
    ({"seconds": 1.5}, "vg.test: seconds must be an integer, got float 1.5"),
    ({"seconds": True}, "vg.test: seconds must be an integer, got bool True"),
    ({"seconds": "ten"}, "vg.test: seconds must be an integer, got str 'ten'"),
    ({"seconds": [1]}, "vg.test: seconds must be an integer, got list [1]"),
    ({"ratio": "inf"}, "vg.test: ratio must be a finite number, got str 'inf'"),
    ({"ratio": "half"}, "vg.test: ratio must be a number, got str 'half'"),
    ({"ratio": {}}, "vg.test: ratio must be a number, got dict {}"),
    ({"ratio": -0.5}, "vg.test: ratio must be at least 0, got float -0.5"),
    ({"mode": "c"}, "vg.test: mode must be one of a, b, got str 'c'"),
    ({"mode": 7}, "vg.test: mode must be a string, got int 7"),
    ({"mapping": []}, "vg.test: mapping must be a mapping, got list []"),
    ({"unknown": 1}, "vg.test: unknown argument(s) unknown; known: enabled, mapping, mode, networks, ratio, seconds"),
    ({"zz": 1, "aa": 2},
     "vg.test: unknown argument(s) aa, zz; known: enabled, mapping, mode, networks, ratio, seconds"),
])
def test_wrong_values_are_named_in_whole_messages(given, message):
    with pytest.raises(ArgumentError) as error:
        check(**given)
    assert str(error.value) == message


def test_a_long_value_is_cut_in_the_message_at_80_characters():
    with pytest.raises(ArgumentError) as error:
        check(mode="x" * 100)
    assert str(error.value) == f"vg.test: mode must be one of a, b, got str '{'x' * 79}..."
    exactly = "y" * 78  # its repr, quotes included, is 80 characters: not cut
    with pytest.raises(ArgumentError) as error:
        check(mode=exactly)
    assert str(error.value) == f"vg.test: mode must be one of a, b, got str '{exactly}'"


@pytest.mark.parametrize(("written", "meant"), [
    ("true", True), (" Yes ", True), ("ON", True), ("false", False), ("no", False), ("Off ", False),
    (True, True), (False, False),
])
def test_booleans_take_their_usual_spellings(written, meant):
    assert check(enabled=written)["enabled"] is meant


def test_the_bounds_themselves_are_accepted_and_kinds_kept():
    got = check(seconds=1, ratio=0)
    assert got["seconds"] == 1 and isinstance(got["seconds"], int)
    assert got["ratio"] == 0.0 and isinstance(got["ratio"], float)
    assert check(seconds="1000")["seconds"] == 1000
    assert check(seconds=7.0)["seconds"] == 7 and isinstance(check(seconds=7.0)["seconds"], int)


def test_a_tuple_is_a_list_and_any_mapping_a_dict():
    from types import MappingProxyType

    got = check(networks=("10.0.0.0/8",), mapping=MappingProxyType({"k": "v"}))
    assert got["networks"] == ["10.0.0.0/8"] and isinstance(got["networks"], list)
    assert got["mapping"] == {"k": "v"} and isinstance(got["mapping"], dict)


def test_raw_values_pass_as_given():
    value = object()
    assert check_arguments("vg.test", (Option("anything", "raw"),), {"anything": value})["anything"] is value


def test_an_option_of_an_unknown_kind_is_refused_when_declared():
    with pytest.raises(ValueError) as error:
        Option("x", "number")
    assert str(error.value) == "option x: unknown kind 'number'/None"
    with pytest.raises(ValueError) as error:
        Option("x", "list", elements="strings")
    assert str(error.value) == "option x: unknown kind 'list'/'strings'"
    for kind in ("str", "bool", "int", "float", "list", "dict", "raw"):
        assert Option("x", kind, elements=kind).kind == kind


def test_arguments_with_another_prefix_are_ignored_only_when_asked():
    options = (Option("uri", "str", default="u"),)
    assert check_arguments("vg.test", options, {"rb_extra": 1}, ignore_prefix="rb_") == {"uri": "u"}
    with pytest.raises(ArgumentError, match=r"^vg\.test: unknown argument\(s\) rb_extra; known: uri$"):
        check_arguments("vg.test", options, {"rb_extra": 1})


def test_ansible_rulebook_internal_arguments_are_ignored():
    assert "eda_feedback_queue" not in check(eda_feedback_queue=object())


def test_required_option():
    with pytest.raises(ArgumentError) as error:
        check_arguments("vg.test", (Option("uri", "list", required=True),), {}, origins={"uri": "vg_uri"})
    assert str(error.value) == "vg.test: uri (rulebook variable vg_uri) is required"
    assert check_arguments("vg.test", (Option("uri", "list", required=True),), {"uri": []}) == {"uri": []}
