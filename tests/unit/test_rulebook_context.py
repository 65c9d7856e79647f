"""The adapter to ansible-rulebook's filter loading: found only under ansible-rulebook's
start_source, loud on an unknown version or shape, renders with variable names in errors."""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

import pytest

from ansible_collections.virtguard.console.plugins.plugin_utils import rulebook_context
from ansible_collections.virtguard.console.plugins.plugin_utils.rulebook_context import (
    RulebookContextError,
    RulebookInventory,
    check_version,
    loading_filter,
    render_arguments,
    rulebook_inventory,
    variable_origins,
)

# A stand-in for ansible_rulebook/engine.py's start_source: same name, same file name, same locals.
AS_WRITTEN = object()  # the source's arguments as a rulebook writes them: {"uri": "{{ vg_uri }}"}
LOADER_SOURCE = """
def start_source(source, source_dirs, variables, queue):
    for source_filter in source.source_filters:
        return load()
"""


def loader(load: Callable[[], Any], filters: list[Any], variables: dict[str, Any],
           filename: str = "/x/site-packages/ansible_rulebook/engine.py",
           source_args: Any = AS_WRITTEN) -> Any:
    namespace: dict[str, Any] = {"load": load}
    if source_args is AS_WRITTEN:
        source_args = {"uri": "{{ vg_uri }}"}
    exec(compile(LOADER_SOURCE, filename, "exec"), namespace)
    source = types.SimpleNamespace(source_filters=filters, source_args=source_args)
    return namespace["start_source"](source, [], variables, None)


def test_outside_ansible_rulebook_nothing_is_found():
    assert loading_filter() is None
    assert loader(loading_filter, [types.SimpleNamespace(filter_name="f", filter_args={})], {},
                  filename="/x/somewhere/engine.py") is None


def test_the_filter_being_loaded_and_the_variables_are_found(monkeypatch):
    monkeypatch.setattr(rulebook_context, "rulebook_version", lambda: (1, 3))
    found = loader(loading_filter, [types.SimpleNamespace(filter_name="virtguard.console.classify",
                                                          filter_args={"a": "{{ v }}"})], {"v": 1})
    assert found == rulebook_context.FilterLoad("virtguard.console.classify", {"a": "{{ v }}"}, {"v": 1},
                                                {"uri": "{{ vg_uri }}"})


def test_the_inventory_comes_from_ansible_rulebooks_command_line(monkeypatch):
    monkeypatch.delenv("ANSIBLE_INVENTORY", raising=False)
    assert rulebook_inventory(["-r", "rb.yml", "-i", "inv.yml", "--vars", "v.yml"]) == RulebookInventory("inv.yml")
    assert rulebook_inventory(["--inventory=hosts", "-r", "rb.yml"]).path == "hosts"
    missing = rulebook_inventory(["-r", "rb.yml"])
    assert missing.path is None and "without an inventory" in missing.unknown_because
    worker = rulebook_inventory(["--worker", "--id", "1", "--websocket-url", "ws://x"])
    assert worker.path is None and "worker mode" in worker.unknown_because


def test_an_unknown_version_fails_loudly(monkeypatch):
    monkeypatch.setattr(rulebook_context, "rulebook_version", lambda: (1, 9))
    with pytest.raises(RulebookContextError, match="ansible-rulebook 1.9 is not a version"):
        loader(loading_filter, [types.SimpleNamespace(filter_name="f", filter_args={})], {})
    with pytest.raises(RulebookContextError, match="unknown"):
        check_version(None)


def test_an_unknown_shape_fails_loudly(monkeypatch):
    monkeypatch.setattr(rulebook_context, "rulebook_version", lambda: (1, 3))
    with pytest.raises(RulebookContextError, match="does not hold"):
        loader(loading_filter, [object()], {})


def test_the_installed_ansible_rulebook_is_known():
    check_version(rulebook_context.rulebook_version())


def test_rendering_names_the_argument_and_its_variable():
    args = {"trusted_networks": "{{ vg_nets }}", "audit_log": "{{ vg_log | default('') }}", "n": 3}
    assert variable_origins(args) == {"trusted_networks": "vg_nets", "audit_log": "vg_log"}
    assert render_arguments("p", args, {"vg_nets": ["10.0.0.0/8"]}) == {
        "trusted_networks": ["10.0.0.0/8"], "audit_log": "", "n": 3}
    with pytest.raises(RulebookContextError,
                       match=r"p: trusted_networks \(rulebook variable vg_nets\) cannot be rendered"):
        render_arguments("p", args, {})
    with pytest.raises(RulebookContextError, match="no ansible-rulebook activation variables"):
        render_arguments("p", args, None)
    assert render_arguments("p", {"n": 3}, None) == {"n": 3}


def test_the_messages_an_operator_reads_are_whole(monkeypatch):
    with pytest.raises(RulebookContextError) as error:
        check_version((0, 9))
    assert str(error.value) == (
        "ansible-rulebook 0.9 is not a version virtguard.console's filters know (checked: 1.1, 1.2, 1.3); "
        "they read its filter arguments and variables at load time, which is not a public interface")
    with pytest.raises(RulebookContextError) as error:
        check_version(None)
    assert str(error.value).startswith("ansible-rulebook unknown is not a version")
    for known in ((1, 1), (1, 2), (1, 3)):
        check_version(known)
    with pytest.raises(RulebookContextError) as error:
        render_arguments("p", {"a": "{{ v }}"}, None)
    assert str(error.value) == ("p: arguments refer to rulebook variables, but no ansible-rulebook activation "
                                "variables are available")
    monkeypatch.setattr(rulebook_context, "rulebook_version", lambda: (1, 3))
    with pytest.raises(RulebookContextError) as error:
        not_a_dict: Any = []
        loader(loading_filter, [types.SimpleNamespace(filter_name="f", filter_args={})], not_a_dict)
    assert str(error.value) == (
        "ansible-rulebook's start_source does not hold the 'variables', 'source' and 'source_filter' this filter "
        "reads at load time; this ansible-rulebook is not one virtguard.console knows")
    worker = rulebook_inventory(["--worker", "--id", "1", "--websocket-url", "ws://x"])
    assert worker.unknown_because == ("ansible-rulebook runs in worker mode (EDA controller): the inventory is the "
                                      "job template's, not known to the activation")
    monkeypatch.delenv("ANSIBLE_INVENTORY", raising=False)
    assert rulebook_inventory(["-r", "rb.yml"]).unknown_because == (
        "ansible-rulebook was started without an inventory (-i)")


@pytest.mark.parametrize(("filter_args", "source_args"), [(None, None), ({}, {"uri": "u"})])
def test_a_filter_or_source_without_arguments_is_loaded_with_empty_ones(monkeypatch, filter_args, source_args):
    monkeypatch.setattr(rulebook_context, "rulebook_version", lambda: (1, 2))
    found = loader(loading_filter, [types.SimpleNamespace(filter_name="f", filter_args=filter_args)], {"v": 1},
                   filename="C:\\py\\ansible_rulebook\\engine.py", source_args=source_args)  # a Windows path too
    assert found == rulebook_context.FilterLoad("f", {}, {"v": 1}, dict(source_args or {}))


@pytest.mark.parametrize(("value", "origin"), [
    ("{{vg_a}}", "vg_a"), ("{{- vg_b -}}", "vg_b"), ("x {{ _c1 }} {{ d }}", "_c1"), ("{{ 1 + 2 }}", None),
    ("{ vg }", None), (7, None)])
def test_the_first_variable_a_template_names_is_its_origin(value, origin):
    assert variable_origins({"a": value}) == ({"a": origin} if origin else {})


def test_an_undefined_name_deep_in_a_rendered_value_is_an_error():
    for value in ("{{ [1, missing] }}", "{{ {'k': missing} }}", "{{ missing }}"):
        with pytest.raises(RulebookContextError) as error:
            render_arguments("p", {"a": value}, {"present": 1})
        assert str(error.value).startswith("p: a (rulebook variable missing) cannot be rendered: "
                                           if value == "{{ missing }}" else "p: a cannot be rendered: ")
    assert render_arguments("p", {"a": "{{ [1, (2, 3)] }}", "b": "plain"}, {}) == {"a": [1, (2, 3)], "b": "plain"}
