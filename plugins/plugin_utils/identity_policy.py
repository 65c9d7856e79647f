# Copyright: virtguard.console contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Which authenticated identities may use a console: typed entries (a certificate DN, a SASL
user name, or a pair of both that must match together), DNs compared as DNs, and what the
audit keeps so that names that look alike can be told apart.

A session's identities are libvirt's subject: ``x509dname`` (the client certificate's subject,
in RFC 4514 form) and ``saslUsername`` (as the client typed it). A session is allowed only if
**every** identity it carries is allowed: its DN by a DN entry, its SASL name by a SASL entry,
or both together by a pair entry. A DN never matches a SASL entry, nor the reverse.

DNs are parsed (RFC 4514) and compared as values (``DistinguishedName``):

* attribute types are case-insensitive, and the short names of RFC 4514 (CN, O, OU, ...) are
  their OIDs, so ``cn=alice`` and ``2.5.4.3=alice`` are one attribute;
* spaces around ``,``, ``+`` and ``=`` are not part of the DN (``O=a, CN=b`` is ``O=a,CN=b``);
* values are unescaped (``\\,``, ``\\2C``), then compared as X.500's ``caseIgnoreMatch`` does with
  RFC 4518's insignificant-space handling: case folded, leading and trailing spaces dropped,
  inner runs of spaces one space. Not applied: RFC 4518's NFKC step, which would make a
  certificate whose name only looks like an allowed one (fullwidth or compatibility
  characters) match it. A ``#``-hex value (BER) is compared octet for octet;
* the RDNs keep their order; the attributes of a multi-valued RDN (``CN=a+UID=b``) do not.

Entries are checked when the activation starts: one that does not parse, or that can never
match (an empty value, a SASL name with control characters or U+FFFD), is a ``PolicyError``.
Untyped entries (plain strings, which match a DN or a SASL name written exactly so) are
accepted for one release and named in a warning.

Controller-only (the classify filter's), standard library only.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Mapping, Sequence, Tuple

X509 = "x509dname"
SASL = "saslUsername"
# The entry keys, as the source's ``event.graphics.identity`` names them.
ENTRY_KEYS = {"x509_dname": X509, "sasl_username": SASL}
REQUIRE_CHOICES = ("x509", "sasl", "both")
REPLACEMENT_CHARACTER = "\ufffd"

# RFC 4514 section 3's short names, and a few common ones, as OIDs.
_SHORT_NAMES = {
    "cn": "2.5.4.3", "l": "2.5.4.7", "st": "2.5.4.8", "o": "2.5.4.10", "ou": "2.5.4.11", "c": "2.5.4.6",
    "street": "2.5.4.9", "dc": "0.9.2342.19200300.100.1.25", "uid": "0.9.2342.19200300.100.1.1",
    "serialnumber": "2.5.4.5", "title": "2.5.4.12", "emailaddress": "1.2.840.113549.1.9.1",
    "givenname": "2.5.4.42", "sn": "2.5.4.4",
}
_KEYSTRING = re.compile(r"^[A-Za-z][A-Za-z0-9-]*$")
_OID = re.compile(r"^[0-9]+(\.[0-9]+)+$")
_HEX_VALUE = re.compile(r"^#([0-9A-Fa-f]{2})+$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class IdentityError(ValueError):
    """An identity entry or a DN that cannot be used; the message says why."""


# (attribute OID or lower-case name, normalised value) pairs; an RDN is a sorted tuple of them
RDN = Tuple[Tuple[str, str], ...]


def _split_unescaped(text: str, separators: str) -> list[str]:
    """``text`` split at the separators that are not escaped by a backslash (RFC 4514)."""
    parts: list[str] = []
    current: list[str] = []
    escaped = False
    for char in text:
        if escaped:
            current.append(char)
            escaped = False
        elif char == "\\":
            current.append(char)
            escaped = True
        elif char in separators:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    if escaped:
        raise IdentityError("ends with a lone backslash")
    parts.append("".join(current))
    return parts


def _unescape(value: str) -> str:
    """An RFC 4514 attribute value without its escapes (``\\,`` and ``\\2C`` are ``,``); hex
    pairs that form UTF-8 are decoded as UTF-8."""
    out = bytearray()
    index = 0
    while index < len(value):
        char = value[index]
        if char != "\\":
            out += char.encode("utf-8", "surrogateescape")
            index += 1
            continue
        pair = value[index + 1:index + 3]
        if len(pair) == 2 and all(c in "0123456789abcdefABCDEF" for c in pair):
            out.append(int(pair, 16))
            index += 3
        elif index + 1 < len(value):
            out += value[index + 1].encode("utf-8", "surrogateescape")
            index += 2
        else:
            raise IdentityError("ends with a lone backslash")
    try:
        return out.decode("utf-8")
    except UnicodeDecodeError:
        raise IdentityError("holds escaped bytes that are not UTF-8") from None


def _attribute_type(text: str) -> str:
    name = text.strip()
    if _OID.match(name):
        return name
    if not _KEYSTRING.match(name):
        raise IdentityError(f"{name!r} is not an attribute type")
    return _SHORT_NAMES.get(name.lower(), name.lower())


def _value_key(raw: str) -> str:
    """The comparison form of a raw (escaped) value: ``#``-hex as lower-case octets; otherwise
    unescaped, case folded, insignificant spaces removed (see the module's docstring)."""
    text = raw.strip()
    # a trailing space that was escaped belongs to the value: strip() must not eat the escape
    if raw.rstrip() != raw and text.endswith("\\"):
        text += " "
    if _HEX_VALUE.match(text):
        return text.lower()
    value = _unescape(text)
    return " ".join(value.split()).casefold()


@dataclass(frozen=True)
class DistinguishedName:
    """A DN as a value: equal when the DNs are, however each was written."""

    rdns: tuple[RDN, ...]

    @classmethod
    def parse(cls, text: object) -> DistinguishedName:
        """Raises IdentityError (saying why) for a DN that does not parse or has an empty value."""
        if not isinstance(text, str):
            raise IdentityError(f"must be a string, got {type(text).__name__}")
        if not text.strip():
            raise IdentityError("is empty")
        rdns: list[RDN] = []
        for rdn_text in _split_unescaped(text, ","):
            attributes = []
            for pair in _split_unescaped(rdn_text, "+"):
                kind, sep, raw = pair.partition("=")
                if not sep:
                    raise IdentityError(f"{pair.strip()!r} is not TYPE=value")
                value = _value_key(raw)
                if not value:
                    raise IdentityError(f"{kind.strip()}= has an empty value, which no certificate carries")
                attributes.append((_attribute_type(kind), value))
            rdns.append(tuple(sorted(attributes)))
        return cls(tuple(rdns))

    @classmethod
    def of_event(cls, text: str) -> DistinguishedName | None:
        """The DN of an event, or None when it does not parse (it then matches no entry)."""
        try:
            return cls.parse(text)
        except IdentityError:
            return None


def _sasl_name(text: Any) -> str:
    if not isinstance(text, str) or not text:
        raise IdentityError("a SASL user name must be a non-empty string")
    if _CONTROL.search(text) or REPLACEMENT_CHARACTER in text:
        raise IdentityError("holds control characters or U+FFFD (QEMU's stand-in for bytes that are not "
                            "UTF-8), so it cannot name one account")
    return text


@dataclass(frozen=True)
class IdentityEntry:
    """One allowed identity: a DN, a SASL name, both (a pair: they must match together), or an
    untyped string (``legacy``: the DN or the SASL name written exactly so)."""

    dname: DistinguishedName | None = None
    sasl: str | None = None
    legacy: str | None = None


def parse_entry(entry: Any) -> IdentityEntry:
    """One ``allowed_identities`` item; IdentityError names what is wrong."""
    if isinstance(entry, str):
        if not entry:
            raise IdentityError("an empty entry matches no identity")
        return IdentityEntry(legacy=entry)
    if not isinstance(entry, Mapping):
        raise IdentityError(f"must be a mapping with x509_dname and/or sasl_username, got {type(entry).__name__}")
    unknown = sorted(str(key) for key in entry if key not in ENTRY_KEYS)
    if unknown or not entry:
        raise IdentityError(f"takes x509_dname and/or sasl_username, got {', '.join(unknown) or 'nothing'}")
    dname = None
    if "x509_dname" in entry:
        try:
            dname = DistinguishedName.parse(entry["x509_dname"])
        except IdentityError as exc:
            raise IdentityError(f"x509_dname {entry['x509_dname']!r} {exc}") from None
    sasl = None
    if "sasl_username" in entry:
        try:
            sasl = _sasl_name(entry["sasl_username"])
        except IdentityError as exc:
            raise IdentityError(f"sasl_username {entry['sasl_username']!r}: {exc}") from None
    return IdentityEntry(dname=dname, sasl=sasl)


def parse_require(value: Any) -> frozenset[str]:
    """``require_identity`` as the identity types a session must carry: false (none), true
    (at least one, any type), ``x509``, ``sasl`` or ``both``."""
    if value is False or value is None or (isinstance(value, str) and value.lower() in ("false", "no", "off")):
        return frozenset()
    if value is True or (isinstance(value, str) and value.lower() in ("true", "yes", "on")):
        return frozenset({"any"})
    if isinstance(value, str) and value.lower() in REQUIRE_CHOICES:
        return {"x509": frozenset({X509}), "sasl": frozenset({SASL}), "both": frozenset({X509, SASL})}[value.lower()]
    raise IdentityError(f"must be true or false, or x509, sasl or both, got {type(value).__name__} {value!r}")


class IdentityPolicy:
    """The allowed identities and which must be present."""

    def __init__(self, entries: Sequence[Any] = (), require: Any = False) -> None:
        self.entries: list[IdentityEntry] = []
        for index, item in enumerate(entries):
            try:
                self.entries.append(parse_entry(item))
            except IdentityError as exc:
                raise IdentityError(f"entry {index + 1}: {exc}") from None
        self.require = parse_require(require)
        self.dnames = {e.dname for e in self.entries if e.dname is not None and e.sasl is None}
        self.sasl_names = {e.sasl for e in self.entries if e.sasl is not None and e.dname is None}
        self.pairs = {(e.dname, e.sasl) for e in self.entries if e.dname is not None and e.sasl is not None}
        self.legacy = {e.legacy for e in self.entries if e.legacy is not None}

    @property
    def untyped(self) -> list[str]:
        """The untyped entries, for the warning at start."""
        return sorted(self.legacy)

    def missing(self, identities: Mapping[str, str]) -> bool:
        """Whether the session lacks an identity the policy requires."""
        if "any" in self.require:
            return not identities
        return not self.require <= identities.keys()

    def allows(self, identities: Mapping[str, str]) -> bool:
        """Whether every identity present is allowed (by its own type's entries, or as a pair).
        With no entries at all, every identity is."""
        if not self.entries or not identities:
            return True
        dname_text, sasl = identities.get(X509), identities.get(SASL)
        dname = DistinguishedName.of_event(dname_text) if dname_text is not None else None
        if dname_text is not None and sasl is not None and dname is not None and (dname, sasl) in self.pairs:
            return True
        dname_ok = dname_text is None or (dname is not None and dname in self.dnames) or dname_text in self.legacy
        sasl_ok = sasl is None or sasl in self.sasl_names or sasl in self.legacy
        return dname_ok and sasl_ok


def session_identities(subject: Sequence[Any]) -> dict[str, str]:
    """The first identity of each type in libvirt's subject (``[{type, name}]``)."""
    found: dict[str, str] = {}
    for item in subject or ():
        if isinstance(item, Mapping) and item.get("type") in (X509, SASL) and isinstance(item.get("name"), str) \
                and item["name"]:
            found.setdefault(item["type"], item["name"])
    return found


def identity_forms(subject: Sequence[Any]) -> list[dict[str, Any]]:
    """For the audit: each identity as the event carries it, with its ASCII-escaped form (two
    names that look alike differ there: Cyrillic ``а`` is ``\\u0430``) and whether it holds
    U+FFFD, QEMU's stand-in for bytes that were not UTF-8 (so different accounts may read the
    same)."""
    forms = []
    for item in subject or ():
        if isinstance(item, Mapping) and isinstance(item.get("name"), str):
            name = item["name"]
            forms.append({"type": str(item.get("type")), "name": name,
                          "escaped": json.dumps(name, ensure_ascii=True)[1:-1],
                          "replacement_characters": REPLACEMENT_CHARACTER in name})
    return forms
