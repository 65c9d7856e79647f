"""The identity policy over a table of cases: types, pairs, DN spellings, escapes, look-alikes,
entries refused at start, and what the audit keeps of a name."""

from __future__ import annotations

from typing import Any

import pytest

from ansible_collections.virtguard.console.plugins.plugin_utils.classify_filter import FilterState
from ansible_collections.virtguard.console.plugins.plugin_utils.identity_policy import (
    DistinguishedName,
    IdentityError,
    IdentityPolicy,
    identity_forms,
    session_identities,
)
from ansible_collections.virtguard.console.plugins.plugin_utils.plugin_arguments import ArgumentError

ALICE_DN = "O=virtguard lab,CN=alice-laptop"
MALLORY_DN = "O=virtguard lab,CN=mallory-laptop"
TYPED = [{"x509_dname": ALICE_DN}, {"sasl_username": "alice"}, {"sasl_username": "bob"},
         {"x509_dname": "O=virtguard lab,CN=carol-laptop", "sasl_username": "carol"}]


def who(dname: str | None = None, sasl: str | None = None) -> dict[str, str]:
    found = {}
    if dname is not None:
        found["x509dname"] = dname
    if sasl is not None:
        found["saslUsername"] = sasl
    return found


@pytest.mark.parametrize(("identities", "allowed"), [
    (who(ALICE_DN, "alice"), True),
    (who(ALICE_DN, "bob"), True),  # each identity allowed by an entry of its type
    (who(ALICE_DN, "mallory"), False),  # alice's certificate does not admit mallory's login
    (who(MALLORY_DN, "bob"), False),  # nor bob's login mallory's certificate
    (who(ALICE_DN), True),
    (who(sasl="alice"), True),
    (who(sasl=ALICE_DN), False),  # a SASL account named like an allowed DN is not that DN
    (who(sasl="O=virtguard lab,CN=alice-laptop"), False),
    (who(dname="CN=alice"), False),  # a DN named like a SASL user is not that user
    (who("O=virtguard lab,CN=carol-laptop", "carol"), True),  # the pair, together
    (who("O=virtguard lab,CN=carol-laptop"), False),  # a pair's DN alone is not allowed
    (who(sasl="carol"), False),
    (who("O=virtguard lab,CN=carol-laptop", "alice"), False),  # pair DN, other login: no entry for the DN
    ({}, True),  # no identity: the require rule decides
])
def test_every_identity_present_must_be_allowed(identities, allowed):
    assert IdentityPolicy(TYPED).allows(identities) is allowed


@pytest.mark.parametrize("spelling", [
    "O=virtguard lab,CN=alice-laptop",
    "o=virtguard lab,cn=alice-laptop",  # attribute types are case-insensitive
    "O=Virtguard Lab,CN=Alice-Laptop",  # values compare as caseIgnoreMatch
    "O=virtguard lab, CN=alice-laptop",  # spaces around separators are not part of the DN
    " O = virtguard  lab ,CN=alice-laptop ",  # insignificant spaces (RFC 4518)
    "2.5.4.10=virtguard lab,2.5.4.3=alice-laptop",  # OIDs are their short names
    "O=virtguard\\20lab,CN=alice\\2Dlaptop",  # hex escapes
])
def test_one_dn_written_many_ways_is_one_dn(spelling):
    assert DistinguishedName.parse(spelling) == DistinguishedName.parse(ALICE_DN)
    assert IdentityPolicy([{"x509_dname": spelling}]).allows(who(ALICE_DN))


@pytest.mark.parametrize("other", [
    "CN=alice-laptop,O=virtguard lab",  # RDN order matters
    "O=virtguard lab,CN=alice-laptop,CN=x",
    "O=virtguard lab,CN=alicelaptop",
    "O=virtguard lab,CN=\u0430lice-laptop",  # Cyrillic a: a look-alike is another name
    "O=virtguard lab,CN=\uff41lice-laptop",  # fullwidth a: no NFKC folding
])
def test_dns_that_differ_are_different(other):
    assert DistinguishedName.parse(other) != DistinguishedName.parse(ALICE_DN)


def test_escapes_and_multi_valued_rdns():
    smith = DistinguishedName.parse("O=Example,CN=Smith\\, John")
    assert smith == DistinguishedName.parse("O=Example,CN=Smith\\2C John")
    assert smith != DistinguishedName.parse("O=Example,CN=Smith,CN=John")
    assert DistinguishedName.parse("CN=a+UID=b,O=x") == DistinguishedName.parse("UID=b+CN=a,O=x")
    assert DistinguishedName.parse("CN=#0403616263") == DistinguishedName.parse("cn=#0403616263")
    assert DistinguishedName.parse("CN=#0403616263") != DistinguishedName.parse("CN=abc")
    # as libvirt reports the DN: matched when the entry writes the comma either way
    assert IdentityPolicy([{"x509_dname": "O=Example,CN=Smith\\2c John"}]).allows(who("O=Example,CN=Smith\\, John"))


@pytest.mark.parametrize(("entry", "message"), [
    ({"x509_dname": "CN="}, "empty value"),
    ({"x509_dname": "O=x,CN= "}, "empty value"),
    ({"x509_dname": ""}, "is empty"),
    ({"x509_dname": "CN=alice,garbage"}, "is not TYPE=value"),
    ({"x509_dname": "C N=alice"}, "is not an attribute type"),
    ({"x509_dname": "CN=alice\\"}, "lone backslash"),
    ({"x509_dname": "CN=\\ff\\fe"}, "not UTF-8"),
    ({"sasl_username": ""}, "non-empty string"),
    ({"sasl_username": "bad\nname"}, "control characters"),
    ({"sasl_username": "b\ufffdb"}, r"U\+FFFD"),
    ({"sasl_username": 7}, "non-empty string"),
    ({"x509": "CN=a"}, "takes x509_dname and/or sasl_username, got x509"),
    ({}, "got nothing"),
    ("", "empty entry"),
    (["CN=a"], "must be a mapping"),
])
def test_entries_that_cannot_match_are_refused_and_named(entry, message):
    with pytest.raises(IdentityError, match=message):
        IdentityPolicy([{"sasl_username": "ok"}, entry])
    with pytest.raises(IdentityError, match="entry 2"):
        IdentityPolicy([{"sasl_username": "ok"}, entry])


def test_the_filter_stops_at_start_naming_the_entry_and_warns_about_untyped_ones(caplog):
    with pytest.raises(ArgumentError, match=r"allowed_identities \(rulebook variable vg_ids\) entry 1: "
                                            r"x509_dname 'CN=' CN= has an empty value"):
        FilterState.from_arguments({"allowed_identities": "{{ vg_ids }}"}, {"vg_ids": [{"x509_dname": "CN="}]})
    FilterState.from_arguments({"allowed_identities": ["O=x,CN=legacy", {"sasl_username": "alice"}]})
    assert "without a type" in caplog.text and "'O=x,CN=legacy'" in caplog.text and "alice" not in caplog.text


def test_untyped_entries_keep_matching_either_type_exactly_for_one_release():
    policy = IdentityPolicy(["O=x,CN=a", "alice"])
    assert policy.untyped == ["O=x,CN=a", "alice"]
    assert policy.allows(who("O=x,CN=a", "alice"))
    assert not policy.allows(who("O=X,CN=a"))  # untyped: exact, as before
    assert not policy.allows(who("O=x,CN=a", "mallory"))  # every identity must be allowed


@pytest.mark.parametrize(("require", "identities", "missing"), [
    (False, {}, False), (True, {}, True), (True, who(sasl="a"), False),
    ("x509", who(sasl="a"), True), ("x509", who("CN=a"), False),
    ("sasl", who("CN=a"), True), ("both", who("CN=a"), True), ("both", who("CN=a", "a"), False),
    ("true", {}, True), ("no", {}, False),
])
def test_require_identity_says_which_must_be_present(require, identities, missing):
    assert IdentityPolicy([], require).missing(identities) is missing


@pytest.mark.parametrize("bad", ["maybe", 1, 0, ["x509"], "X509 "])
def test_require_identity_refuses_anything_else(bad):
    with pytest.raises(IdentityError, match="must be true or false, or x509, sasl or both"):
        IdentityPolicy([], bad)


def test_the_audit_tells_look_alike_names_apart():
    subject: list[Any] = [{"type": "saslUsername", "name": "\u0430lice"}, {"type": "x509dname", "name": "CN=b\ufffd"}]
    forms = identity_forms(subject)
    assert forms[0] == {"type": "saslUsername", "name": "\u0430lice", "escaped": "\\u0430lice",
                        "replacement_characters": False}
    assert forms[1]["replacement_characters"] is True and forms[1]["escaped"] == "CN=b\\ufffd"
    assert identity_forms([{"type": "saslUsername", "name": "alice"}])[0]["escaped"] == "alice"
    assert session_identities(subject) == {"saslUsername": "\u0430lice", "x509dname": "CN=b\ufffd"}
