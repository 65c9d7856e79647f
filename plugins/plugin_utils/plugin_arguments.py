# Copyright: virtguard.console contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Arguments of the collection's EDA plugins (the event source and the event filter): each
plugin declares its options once, as ``Option`` values, and ``check_arguments`` checks what a
rulebook gave against that declaration, with the same rules for every plugin.

The rules are strict on purpose: a wrong value must stop the activation when it starts, with a
message that names the argument (and the rulebook variable it came from), never slip through
and fail at the first console event. Booleans are ``true``/``false`` (or their usual YAML
spellings as strings), never ``1``/``0``; numbers are finite and within their range; a list
stays a list (a comma-separated string is not a list of networks).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

KINDS = ("str", "bool", "int", "float", "list", "dict", "raw")
_TRUE = ("true", "yes", "on")
_FALSE = ("false", "no", "off")


class ArgumentError(ValueError):
    """An argument is wrong; the message names the plugin, the argument and its variable."""


@dataclass(frozen=True)
class Option:
    """One declared argument. ``elements`` is the kind of a list's items; ``minimum`` and
    ``maximum`` bound numbers (and a list's length is not bounded)."""

    name: str
    kind: str
    default: Any = None
    elements: str | None = None
    choices: tuple[Any, ...] | None = None
    minimum: float | None = None
    maximum: float | None = None
    required: bool = False

    def __post_init__(self) -> None:
        if self.kind not in KINDS or (self.elements is not None and self.elements not in KINDS):
            raise ValueError(f"option {self.name}: unknown kind {self.kind!r}/{self.elements!r}")


def _describe(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:80]}{'...' if len(text) > 80 else ''}"


def _convert_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    raise ValueError(f"must be true or false, got {_describe(value)}")


def _convert_number(value: Any, kind: str) -> int | float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"must be a{'n integer' if kind == 'int' else ' number'}, got {_describe(value)}")
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"must be a{'n integer' if kind == 'int' else ' number'}, got {_describe(value)}") from None
    if not math.isfinite(number):
        raise ValueError(f"must be a finite number, got {_describe(value)}")
    if kind == "int":
        if number != int(number):
            raise ValueError(f"must be an integer, got {_describe(value)}")
        return int(number)
    return number


def _convert(value: Any, kind: str) -> Any:
    if kind == "raw":
        return value
    if kind == "bool":
        return _convert_bool(value)
    if kind in ("int", "float"):
        return _convert_number(value, kind)
    if kind == "str":
        if not isinstance(value, str):
            raise ValueError(f"must be a string, got {_describe(value)}")
        return value
    if kind == "list":
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"must be a list, got {_describe(value)}")
        return list(value)
    if not isinstance(value, Mapping):
        raise ValueError(f"must be a mapping, got {_describe(value)}")
    return dict(value)


def check_value(option: Option, value: Any) -> Any:
    """``value`` converted to the option's kind; ValueError says what is wrong (without the name)."""
    converted = _convert(value, option.kind)
    if option.kind == "list" and option.elements is not None:
        items = []
        for index, item in enumerate(converted):
            try:
                items.append(_convert(item, option.elements))
            except ValueError as exc:
                raise ValueError(f"element {index + 1}: {exc}") from None
        converted = items
    if option.choices is not None and converted not in option.choices:
        raise ValueError(f"must be one of {', '.join(map(str, option.choices))}, got {_describe(value)}")
    if option.kind in ("int", "float"):
        if option.minimum is not None and converted < option.minimum:
            raise ValueError(f"must be at least {option.minimum:g}, got {_describe(value)}")
        if option.maximum is not None and converted > option.maximum:
            raise ValueError(f"must be at most {option.maximum:g}, got {_describe(value)}")
    return converted


def where(plugin: str, name: str, origins: Mapping[str, str] | None) -> str:
    """``plugin: name (rulebook variable VAR)``, the prefix of every message about ``name``."""
    origin = (origins or {}).get(name)
    return f"{plugin}: {name}" + (f" (rulebook variable {origin})" if origin else "")


def check_arguments(plugin: str, options: Sequence[Option], given: Mapping[str, Any], *,
                    ignore_prefix: str = "eda_", origins: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Every declared option, checked and converted, defaults filled in for those not given
    (or given as null). Names starting with ``ignore_prefix`` are ansible-rulebook's own and
    are left out. ``origins`` maps an argument to the rulebook variable it was rendered from,
    for the messages."""
    declared = {option.name: option for option in options}
    unknown = sorted(name for name in given if name not in declared and not name.startswith(ignore_prefix))
    if unknown:
        raise ArgumentError(f"{plugin}: unknown argument(s) {', '.join(unknown)}; "
                            f"known: {', '.join(sorted(declared))}")
    checked: dict[str, Any] = {}
    for name, option in declared.items():
        value = given.get(name)
        if value is None:
            if option.required:
                raise ArgumentError(f"{where(plugin, name, origins)} is required")
            checked[name] = copy.deepcopy(option.default)
            continue
        try:
            checked[name] = check_value(option, value)
        except ValueError as exc:
            raise ArgumentError(f"{where(plugin, name, origins)} {exc}") from None
    return checked
