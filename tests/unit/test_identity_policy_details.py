"""The identity policy's details, judged whole: the messages an operator reads when an entry is
refused, DN parsing at its edges (escapes, unknown attribute types, '=' inside a value, a
trailing escaped space), the spellings of require_identity, and which subject items count."""

from __future__ import annotations

from typing import Any

import pytest

from ansible_collections.virtguard.console.plugins.plugin_utils.identity_policy import (
    DistinguishedName,
    IdentityError,
    IdentityPolicy,
    identity_forms,
    parse_require,
    session_identities,
)


def refusal(entries: list[Any], require: Any = False) -> str:
    with pytest.raises(IdentityError) as error:
        IdentityPolicy(entries, require)
    return str(error.value)


@pytest.mark.parametrize(("entry", "message"), [
    ("", "entry 1: an empty entry matches no identity"),
    (7, "entry 1: must be a mapping with x509_dname and/or sasl_username, got int"),
    ({}, "entry 1: takes x509_dname and/or sasl_username, got nothing"),
    ({"cn": "a", "b": 1}, "entry 1: takes x509_dname and/or sasl_username, got b, cn"),
    ({"sasl_username": ""}, "entry 1: sasl_username '': a SASL user name must be a non-empty string"),
    ({"sasl_username": "bob\ufffd"}, "entry 1: sasl_username 'bob\ufffd': holds control characters or U+FFFD "
                                     "(QEMU's stand-in for bytes that are not UTF-8), so it cannot name one account"),
    ({"sasl_username": "bob\x7f"}, "entry 1: sasl_username 'bob\\x7f': holds control characters or U+FFFD "
                                   "(QEMU's stand-in for bytes that are not UTF-8), so it cannot name one account"),
    ({"x509_dname": 7}, "entry 1: x509_dname 7 must be a string, got int"),
    ({"x509_dname": "  "}, "entry 1: x509_dname '  ' is empty"),
    ({"x509_dname": "CN=a\\"}, "entry 1: x509_dname 'CN=a\\\\' ends with a lone backslash"),
    ({"x509_dname": "CN=a\\,\\"}, "entry 1: x509_dname 'CN=a\\\\,\\\\' ends with a lone backslash"),
    ({"x509_dname": "CN=\\ff"}, "entry 1: x509_dname 'CN=\\\\ff' holds escaped bytes that are not UTF-8"),
    ({"x509_dname": "CN"}, "entry 1: x509_dname 'CN' 'CN' is not TYPE=value"),
    ({"x509_dname": "1x=a"}, "entry 1: x509_dname '1x=a' '1x' is not an attribute type"),
    ({"x509_dname": "O=x,CN= "}, "entry 1: x509_dname 'O=x,CN= ' CN= has an empty value, which no certificate carries"),
])
def test_a_refused_entry_is_named_in_a_whole_message(entry: Any, message: str) -> None:
    assert refusal([entry]) == message


def test_the_entry_number_counts_from_one() -> None:
    assert refusal([{"sasl_username": "ok"}, {"sasl_username": ""}]).startswith("entry 2: ")


@pytest.mark.parametrize(("value", "message"), [
    ("maybe", "must be true or false, or x509, sasl or both, got str 'maybe'"),
    (1, "must be true or false, or x509, sasl or both, got int 1"),
])
def test_a_wrong_require_identity_is_named(value: Any, message: str) -> None:
    with pytest.raises(IdentityError) as error:
        parse_require(value)
    assert str(error.value) == message


@pytest.mark.parametrize(("value", "types"), [
    (False, set()), (None, set()), ("false", set()), ("No", set()), ("OFF", set()), ("off", set()),
    (True, {"any"}), ("TRUE", {"any"}), ("Yes", {"any"}), ("on", {"any"}), ("ON", {"any"}),
    ("x509", {"x509dname"}), ("SASL", {"saslUsername"}), ("Both", {"x509dname", "saslUsername"}),
])
def test_require_identity_takes_the_usual_spellings(value: Any, types: set[str]) -> None:
    assert parse_require(value) == frozenset(types)


def dn(text: str) -> DistinguishedName:
    return DistinguishedName.parse(text)


def test_unknown_attribute_types_compare_case_insensitively_and_stay_apart_from_others() -> None:
    assert dn("fooBar=x") == dn("FOOBAR=x")
    assert dn("fooBar=x") != dn("other=x")
    assert dn("fooBar=x").rdns == ((("foobar", "x"),),)
    assert dn("2.5.4.3=x") == dn("cn=x")


def test_an_equals_sign_inside_a_value_belongs_to_the_value() -> None:
    assert dn("CN=a=b").rdns == ((("2.5.4.3", "a=b"),),)


def test_escapes_and_separators() -> None:
    assert dn("CN=a\\,b").rdns == ((("2.5.4.3", "a,b"),),)  # an escaped comma separates nothing
    assert dn("CN=a\\+b").rdns == ((("2.5.4.3", "a+b"),),)
    assert dn("CN=a+UID=b") == dn("UID=b+CN=a")  # a multi-valued RDN: order does not count
    assert len(dn("CN=a+UID=b").rdns) == 1 and len(dn("CN=a,UID=b").rdns) == 2
    assert dn("CN=caf\\C3\\A9") == dn("CN=caf\u00e9")  # hex pairs decoded as UTF-8
    assert dn("CN=a\\=b").rdns == ((("2.5.4.3", "a=b"),),)  # an escaped character other than hex
    assert dn("CN=\\g1").rdns == ((("2.5.4.3", "g1"),),)  # not a hex pair: the next character alone
    assert dn("CN=\u00e9t\u00e9").rdns == ((("2.5.4.3", "\u00e9t\u00e9"),),)
    # text decoded with surrogateescape (bytes that were not UTF-8) is taken as those bytes
    assert dn("CN=caf\udcc3\udca9") == dn("CN=caf\u00e9")
    assert dn("CN=\\\udcc3\udca9") == dn("CN=\u00e9")  # an escaped character, the same way


def test_a_trailing_escaped_space_belongs_to_the_value_and_spaces_inside_are_one() -> None:
    assert dn("CN=a\\ ").rdns == ((("2.5.4.3", "a"),),)  # insignificant spaces, after unescaping
    assert dn("CN=a\\  ") == dn("CN=a")
    assert dn("CN=A   B") == dn("cn=a b")
    assert dn("CN=a  b").rdns == ((("2.5.4.3", "a b"),),)
    assert dn("CN=#0A0B").rdns == ((("2.5.4.3", "#0a0b"),),)  # BER octets, lower-cased
    assert dn(" CN = #0A0B ") == dn("CN=#0a0b")


def test_pairs_are_only_entries_with_both_identities() -> None:
    policy = IdentityPolicy([{"x509_dname": "CN=a"}, {"sasl_username": "bob"},
                             {"x509_dname": "CN=c", "sasl_username": "carol"}])
    assert policy.pairs == {(dn("CN=c"), "carol")}
    assert policy.dnames == {dn("CN=a")} and policy.sasl_names == {"bob"}
    assert policy.allows({"x509dname": "CN=c", "saslUsername": "carol"})
    assert not policy.allows({"x509dname": "CN=c", "saslUsername": "bob"})
    assert not policy.allows({"x509dname": "CN=c"})
    assert not policy.allows({"saslUsername": "carol"})
    assert not policy.allows({"x509dname": "not a dn"})
    assert policy.allows({"x509dname": "cn = A", "saslUsername": "bob"})


def test_only_complete_subject_items_of_the_two_types_count() -> None:
    subject: list[Any] = [
        "x509dname", {"type": "x509dname"}, {"type": "x509dname", "name": ""}, {"type": "other", "name": "x"},
        {"type": "saslUsername", "name": 7}, {"name": "CN=nobody"}, {"type": "x509dname", "name": "CN=a"},
        {"type": "x509dname", "name": "CN=second"}, {"type": "saslUsername", "name": "bob"}]
    assert session_identities(subject) == {"x509dname": "CN=a", "saslUsername": "bob"}
    assert identity_forms(["CN=a", {"type": "x509dname", "name": 7}, {"type": "saslUsername", "name": "\u00e9"}]) == [
        {"type": "saslUsername", "name": "\u00e9", "escaped": "\\u00e9", "replacement_characters": False}]
