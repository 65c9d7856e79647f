# Copyright: virtguard.console contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""What an event filter needs from the ansible-rulebook that loads it, in one place.

ansible-rulebook (1.1 to 1.3) renders the arguments of sources but passes those of filters as
written, and calls a filter for the first time at the first event. So that a filter can render
``"{{ rulebook_var }}"`` arguments and check them when the activation starts, this module reads
two locals of ansible-rulebook's ``engine.start_source(source, source_dirs, variables, ...)``,
which loads each filter file (``runpy.run_path``) while it runs: ``variables`` (the
activation's variables) and ``source_filter`` (the filter being loaded, with its
``filter_name`` and ``filter_args``).

That is a private detail of ansible-rulebook, so it is checked: outside ansible-rulebook
nothing is found (unit tests, a hand run); inside a version not listed in
``KNOWN_RULEBOOK_VERSIONS``, or where the locals are not what they should be, the load fails
with a message that says so, rather than running with unchecked arguments.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from types import FrameType
from typing import Any, Mapping

# (major, minor) of the ansible-rulebook releases this adapter was checked against.
KNOWN_RULEBOOK_VERSIONS = ((1, 1), (1, 2), (1, 3))
_LOADER = "start_source"
_VARIABLE = re.compile(r"\{\{-?\s*([A-Za-z_][A-Za-z0-9_]*)")


class RulebookContextError(RuntimeError):
    """ansible-rulebook is not what this adapter knows, or an argument cannot be rendered."""


@dataclass(frozen=True)
class FilterLoad:
    """The filter that ansible-rulebook is loading, the activation's variables, and the
    arguments (as written) of the source the filter belongs to."""

    filter_name: str
    filter_args: dict[str, Any]
    variables: dict[str, Any]
    source_args: dict[str, Any]


@dataclass(frozen=True)
class RulebookInventory:
    """The inventory ansible-rulebook runs playbooks against: its path, or None with the reason
    it cannot be known here."""

    path: str | None
    unknown_because: str = ""


def _loader_frame(frame: FrameType | None) -> FrameType | None:
    while frame is not None:
        code = frame.f_code
        if code.co_name == _LOADER and "ansible_rulebook" in code.co_filename.replace("\\", "/"):
            return frame
        frame = frame.f_back
    return None


def rulebook_version() -> tuple[int, int] | None:
    try:
        from importlib.metadata import version
        parts = version("ansible-rulebook").split(".")
        return int(parts[0]), int(parts[1])
    except Exception:  # not installed as a distribution, or an unusual version string
        return None


def check_version(found: tuple[int, int] | None) -> None:
    if found not in KNOWN_RULEBOOK_VERSIONS:
        known = ", ".join(f"{major}.{minor}" for major, minor in KNOWN_RULEBOOK_VERSIONS)
        shown = "unknown" if found is None else f"{found[0]}.{found[1]}"
        raise RulebookContextError(
            f"ansible-rulebook {shown} is not a version virtguard.console's filters know (checked: {known}); "
            "they read its filter arguments and variables at load time, which is not a public interface")


def loading_filter(frame: FrameType | None = None) -> FilterLoad | None:
    """The filter being loaded when called from a filter file's top level under
    ansible-rulebook; None outside ansible-rulebook."""
    loader = _loader_frame(frame or sys._getframe(1))
    if loader is None:
        return None
    check_version(rulebook_version())
    variables = loader.f_locals.get("variables")
    source_filter = loader.f_locals.get("source_filter")
    name = getattr(source_filter, "filter_name", None)
    args = getattr(source_filter, "filter_args", None)
    source_args = getattr(loader.f_locals.get("source"), "source_args", None)
    if (not isinstance(variables, dict) or not isinstance(name, str) or not isinstance(args, (dict, type(None)))
            or not isinstance(source_args, (dict, type(None)))):
        raise RulebookContextError(
            "ansible-rulebook's start_source does not hold the 'variables', 'source' and 'source_filter' this "
            "filter reads at load time; this ansible-rulebook is not one virtguard.console knows")
    return FilterLoad(name, dict(args or {}), variables, dict(source_args or {}))


def rulebook_inventory(argv: list[str] | None = None) -> RulebookInventory:
    """The inventory of the running ansible-rulebook, as its command line gives it (``-i``, or
    ``ANSIBLE_INVENTORY``, which ansible-rulebook's own parser reads). In worker mode (EDA
    controller) the inventory comes later over the websocket and is not known here."""
    from ansible_rulebook.cli import get_parser

    parsed, _rest = get_parser().parse_known_args(sys.argv[1:] if argv is None else argv)
    if getattr(parsed, "worker", False):
        return RulebookInventory(None, "ansible-rulebook runs in worker mode (EDA controller): the inventory "
                                       "is the job template's, not known to the activation")
    inventory = getattr(parsed, "inventory", "") or ""
    if not inventory:
        return RulebookInventory(None, "ansible-rulebook was started without an inventory (-i)")
    return RulebookInventory(str(inventory))


def variable_origins(args: Mapping[str, Any]) -> dict[str, str]:
    """For each argument written as a template, the first rulebook variable it names."""
    origins = {}
    for name, value in args.items():
        match = _VARIABLE.search(value) if isinstance(value, str) else None
        if match:
            origins[name] = match.group(1)
    return origins


def render_arguments(plugin: str, args: Mapping[str, Any], variables: Mapping[str, Any] | None) -> dict[str, Any]:
    """Render ``{{ ... }}`` argument values as ansible-rulebook renders source arguments (its
    own renderer, undefined names are errors); the message names the argument and variable."""
    if not any(isinstance(v, str) and "{{" in v for v in args.values()):
        return dict(args)
    if variables is None:
        raise RulebookContextError(f"{plugin}: arguments refer to rulebook variables, but no ansible-rulebook "
                                   "activation variables are available")
    from ansible_rulebook.util import substitute_variables
    from jinja2 import Undefined

    origins = variable_origins(args)
    rendered = {}
    for name, value in args.items():
        origin = f" (rulebook variable {origins[name]})" if name in origins else ""
        try:
            rendered[name] = substitute_variables(value, dict(variables))
            # a lone "{{ name }}" renders natively: an undefined name comes back as an Undefined
            # value instead of an error; touching it raises the error that names it
            _touch_undefined(rendered[name], Undefined)
        except Exception as exc:  # jinja2's UndefinedError, TemplateSyntaxError, ...
            raise RulebookContextError(f"{plugin}: {name}{origin} cannot be rendered: {exc}") from None
    return rendered


def _touch_undefined(value: Any, undefined: type) -> None:
    if isinstance(value, undefined):
        str(value)  # StrictUndefined raises UndefinedError here
        raise ValueError("undefined")
    if isinstance(value, dict):
        for item in value.values():
            _touch_undefined(item, undefined)
    elif isinstance(value, (list, tuple)):
        for item in value:
            _touch_undefined(item, undefined)
