"""server/identity/permissions.py on its own (PROTOCOL §3): channel names and the [[channels]] rules."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.errors import Forbidden, Unauthorized, ValidationError
from server.identity.auth import Identity
from server.identity.permissions import (
    channel_rule_for,
    check_permission,
    compile_grants,
    compile_rules,
    is_valid_channel,
    may,
    owner_channel_warnings,
)
from server.settings import ChannelRule, SettingsError
from tests.conftest import TEST_CHANNEL_RULES


def rules(*specs: tuple[str, list[str], list[str]]):
    return compile_rules(ChannelRule(pattern, tuple(sub), tuple(pub)) for pattern, sub, pub in specs)


def who(*roles: str, id: str = "42") -> Identity:
    return Identity(id, f"user{id}", frozenset(roles))


ANON = None
ALICE = who(id="42")  # authenticated, no roles
BOB = who(id="43")
PUBLISHER = who("publisher", id="7")
SUBSCRIBER = who("subscriber", id="8")
ADMIN = who("admin", id="1")
TEST_RULES = compile_rules(
    ChannelRule(r["pattern"], tuple(r["subscribe"]), tuple(r["publish"])) for r in TEST_CHANNEL_RULES
)


@pytest.mark.parametrize(
    ("pattern", "channel", "matches"),
    [
        ("public:*", "public:news", True),
        ("public:*", "public:", True),
        ("public:*", "public:a:b", True),
        ("public:*", "publicnews", False),
        ("public:*", "Public:news", False),
        ("public:*", "xpublic:news", False),
        ("*", "anything:at:all", True),
        ("metrics:cpu?", "metrics:cpu1", True),
        ("metrics:cpu?", "metrics:cpu", False),
        ("metrics:cpu?", "metrics:cpu12", False),
        ("room:[ab]", "room:a", True),
        ("room:[ab]", "room:c", False),
        ("room:[!ab]", "room:c", True),
        ("room:[!ab]", "room:a", False),
        ("room:[0-9]*", "room:7lobby", True),
        ("room:[0-9]*", "room:lobby", False),
        ("metrics.cpu", "metrics.cpu", True),
        ("metrics.cpu", "metricsXcpu", False),  # '.' is literal, not a regex wildcard
        ("exact", "exact", True),
        ("exact", "exactly", False),
        ("a+b", "a+b", True),
        ("a+b", "aab", False),
    ],
)
def test_fnmatch_patterns(pattern, channel, matches):
    compiled = rules((pattern, ["anonymous"], []))
    assert (channel_rule_for(compiled, channel) is not None) is matches
    assert may(ANON, "subscribe", channel, compiled) is matches


@pytest.mark.parametrize(
    ("pattern", "channel", "sub"),
    [
        ("user:{sub}", "user:42", "42"),
        ("user:{sub}", "user:alice@example.com", "alice@example.com"),
        ("user:{sub}", "user:42:inbox", None),
        ("user:{sub}", "user:", None),
        ("room:{sub}:*", "room:7:chat", "7"),
        ("{sub}:inbox", "42:inbox", "42"),
        ("{sub}:inbox", "a:b:inbox", None),
    ],
)
def test_sub_placeholder_captures_one_colon_free_segment(pattern, channel, sub):
    found = channel_rule_for(rules((pattern, ["owner"], [])), channel)
    if sub is None:
        assert found is None
    else:
        assert found is not None
        assert found[1] == sub


def test_channel_rule_for_gives_the_first_matching_rule_and_no_sub_without_placeholder():
    compiled = rules(("public:*", ["anonymous"], []), ("*", ["authenticated"], []))
    assert channel_rule_for(compiled, "public:x") == (compiled[0], None)
    assert channel_rule_for(compiled, "other") == (compiled[1], None)
    assert channel_rule_for(rules(("public:*", [], [])), "other") is None
    assert channel_rule_for((), "any") is None


@pytest.mark.parametrize(
    ("specs", "identity", "channel", "expected"),
    [
        # An earlier, narrower rule that grants less wins over a later, broader one...
        ([("public:secret", [], []), ("public:*", ["anonymous"], [])], ANON, "public:secret", False),
        ([("public:secret", [], []), ("public:*", ["anonymous"], [])], ALICE, "public:secret", False),
        ([("public:secret", [], []), ("public:*", ["anonymous"], [])], ANON, "public:other", True),
        # ...and one that grants more, too.
        ([("private:open", ["anonymous"], []), ("private:*", ["admin"], [])], ANON, "private:open", True),
        ([("private:open", ["anonymous"], []), ("private:*", ["admin"], [])], ALICE, "private:closed", False),
        # An earlier broad rule shadows a later narrower one entirely.
        ([("*", ["authenticated"], []), ("public:*", ["anonymous"], [])], ANON, "public:x", False),
        ([("*", ["subscriber"], []), ("public:*", ["authenticated"], [])], ALICE, "public:x", False),
    ],
)
def test_first_match_wins(specs, identity, channel, expected):
    assert may(identity, "subscribe", channel, rules(*specs)) is expected


@pytest.mark.parametrize("identity", [ANON, ALICE, PUBLISHER, SUBSCRIBER])
@pytest.mark.parametrize("action", ["subscribe", "publish"])
@pytest.mark.parametrize(
    "compiled",
    [(), rules(("public:*", ["anonymous"], ["anonymous"]))],
    ids=["no-rules", "no-match"],
)
def test_default_deny_when_no_rule_matches(identity, action, compiled):
    assert may(identity, action, "private:x", compiled) is False


@pytest.mark.parametrize("action", ["subscribe", "publish"])
@pytest.mark.parametrize(
    "compiled",
    [(), rules(("*", [], [])), rules(("user:{sub}", ["owner"], ["owner"]))],
    ids=["no-rules", "rule-grants-nothing", "someone-elses-channel"],
)
def test_admin_may_everything(action, compiled):
    assert may(ADMIN, action, "user:99", compiled) is True
    check_permission(ADMIN, action, "user:99", compiled)


@pytest.mark.parametrize(
    ("allowed", "identity", "expected"),
    [
        (["anonymous"], ANON, True),
        (["anonymous"], ALICE, True),
        (["anonymous"], PUBLISHER, True),
        (["authenticated"], ANON, False),
        (["authenticated"], ALICE, True),
        (["authenticated"], SUBSCRIBER, True),
        (["publisher"], ANON, False),
        (["publisher"], ALICE, False),
        (["publisher"], SUBSCRIBER, False),
        (["publisher"], PUBLISHER, True),
        (["subscriber", "publisher"], SUBSCRIBER, True),
        (["ops"], who("ops", "viewer"), True),
        (["ops"], who("OPS"), False),  # role names are case-sensitive
        ([], ALICE, False),
        ([], ANON, False),
        (["owner"], ANON, False),  # no {sub} in the pattern: owner matches nobody
        (["owner"], ALICE, False),
    ],
)
@pytest.mark.parametrize("action", ["subscribe", "publish"])
def test_pseudo_roles_and_role_names(allowed, identity, expected, action):
    compiled = rules(("room:*", allowed, []) if action == "subscribe" else ("room:*", [], allowed))
    assert may(identity, action, "room:lobby", compiled) is expected


@pytest.mark.parametrize(
    ("identity", "channel", "expected"),
    [
        (who(id="42"), "user:42", True),
        (who(id="43"), "user:42", False),
        (who("subscriber", "publisher", id="43"), "user:42", False),
        (ANON, "user:42", False),
        (who(id="4"), "user:42", False),
        (who(id="42"), "user:4", False),
        (who(id="42:x"), "user:42:x", False),  # {sub} never spans a ':'
        (who(id="42"), "user:42:x", False),
    ],
)
def test_owner_of_a_private_channel(identity, channel, expected):
    compiled = rules(("user:{sub}", ["owner"], []))
    assert may(identity, "subscribe", channel, compiled) is expected
    assert may(identity, "publish", channel, compiled) is False


def test_subscribe_and_publish_lists_are_independent():
    compiled = rules(("news:*", ["anonymous"], ["publisher"]), ("log:*", ["subscriber"], []))
    assert may(ANON, "subscribe", "news:a", compiled)
    assert not may(ANON, "publish", "news:a", compiled)
    assert not may(SUBSCRIBER, "publish", "news:a", compiled)
    assert may(PUBLISHER, "publish", "news:a", compiled)
    assert may(SUBSCRIBER, "subscribe", "log:a", compiled)
    assert not may(SUBSCRIBER, "publish", "log:a", compiled)
    assert not may(PUBLISHER, "subscribe", "log:a", compiled)


@pytest.mark.parametrize(
    ("identity", "action", "channel", "expected"),
    [
        (ANON, "subscribe", "public:news", True),
        (ANON, "publish", "public:news", False),
        (PUBLISHER, "publish", "public:news", True),
        (who(id="42"), "subscribe", "user:42", True),
        (who(id="43"), "subscribe", "user:42", False),  # the user:{sub} rule matched first
        (PUBLISHER, "publish", "user:42", True),
        (ALICE, "subscribe", "secret:plans", False),
        (ADMIN, "subscribe", "secret:plans", True),
        (ANON, "subscribe", "metrics:cpu", False),
        (ALICE, "subscribe", "metrics:cpu", True),
        (ALICE, "publish", "metrics:cpu", False),
    ],
)
def test_the_test_suites_rules(identity, action, channel, expected):
    assert may(identity, action, channel, TEST_RULES) is expected


@pytest.mark.parametrize("pattern", ["user:{sub}:{sub}", "{sub}{sub}", "{sub}:x:{sub}"])
def test_sub_twice_is_a_settings_error(pattern):
    with pytest.raises(SettingsError) as info:
        rules(("public:*", [], []), (pattern, ["owner"], []))
    assert info.value.key == "channels[1].pattern"


@pytest.mark.parametrize(
    "name",
    ["a", "a" * 128, "metrics:cpu", "user@example.com", "A-Z_a-z.0-9:@-", "::", "-", "user:42:inbox"],
)
def test_valid_channel_names(name):
    assert is_valid_channel(name)


@pytest.mark.parametrize(
    "name",
    [
        "",
        "a" * 129,
        "a b",
        " a",
        "a/b",
        "/",
        "a\\b",
        "é",
        "café",
        "\uff46\uff55\uff4c\uff4c",
        "\u0661",
        "a\u00a0b",
        "a\n",
        "a\t",
        "a\x00",
        "a*",
        "a#b",
        "a?",
        None,
        5,
        b"abc",
        ["a"],
    ],
)
def test_invalid_channel_names(name):
    assert not is_valid_channel(name)


@pytest.mark.parametrize("identity", [ANON, ALICE, ADMIN])
@pytest.mark.parametrize("channel", ["", "a" * 129, "bad name", "a/b", "é"])
def test_check_permission_refuses_a_bad_name_with_422_before_anything_else(identity, channel):
    with pytest.raises(ValidationError) as info:
        check_permission(identity, "subscribe", channel, rules(("*", ["anonymous"], ["anonymous"])))
    assert info.value.status == 422
    assert info.value.code == "validation_error"
    assert info.value.errors[0]["field"] == "channel"


@pytest.mark.parametrize("action", ["subscribe", "publish"])
def test_check_permission_401_without_identity_and_403_without_permission(action):
    with pytest.raises(Unauthorized) as info:
        check_permission(ANON, action, "secret:x", TEST_RULES)
    assert info.value.status == 401
    assert info.value.headers["WWW-Authenticate"].startswith("Bearer")
    with pytest.raises(Forbidden) as forbidden:
        check_permission(SUBSCRIBER, action, "secret:x", TEST_RULES)
    assert forbidden.value.status == 403
    with pytest.raises(Unauthorized):
        check_permission(ANON, action, "nowhere", ())
    with pytest.raises(Forbidden):
        check_permission(ALICE, action, "nowhere", ())


def test_check_permission_returns_none_when_allowed():
    assert check_permission(ANON, "subscribe", "public:x", TEST_RULES) is None
    assert check_permission(PUBLISHER, "publish", "public:x", TEST_RULES) is None
    assert check_permission(who(id="42"), "subscribe", "user:42", TEST_RULES) is None


# --- application identities (PROTOCOL §13): prefixed ids, channel grants ------------------------


def prefixed_rules(*specs: tuple[str, list[str], list[str]]):
    return compile_rules((ChannelRule(p, tuple(s), tuple(u)) for p, s, u in specs), id_prefixes=("app:", "b2c:"))


@pytest.mark.parametrize(
    ("identity_id", "channel", "expected"),
    [
        ("app:42", "user:app:42", True),
        ("b2c:42", "user:b2c:42", True),
        ("app:42", "user:app:43", False),
        ("app:42", "user:b2c:42", False),
        ("42", "user:42", True),
        ("42", "user:app:42", False),
        ("app:42", "user:42", False),
        ("x:42", "user:x:42", False),  # not a configured prefix: {sub} still never spans a ':'
    ],
)
def test_owner_compares_with_the_prefixed_id_of_a_configured_issuer(identity_id, channel, expected):
    compiled = prefixed_rules(("user:{sub}", ["owner"], []))
    assert may(who(id=identity_id), "subscribe", channel, compiled) is expected


def test_a_prefixed_private_channel_matches_its_rule_for_everyone_not_a_later_one():
    compiled = prefixed_rules(("user:{sub}", ["owner"], []), ("*", ["authenticated"], []))
    assert may(who(id="42"), "subscribe", "user:app:42", compiled) is False
    assert channel_rule_for(compiled, "user:app:42") == (compiled[0], "app:42")


def granted(claim, identity_id: str = "app:7", roles=()) -> Identity:
    return Identity(identity_id, "g", frozenset(roles), grants=compile_grants(claim, identity_id))


@pytest.mark.parametrize(
    ("claim", "action", "channel", "expected"),
    [
        ({"subscribe": ["secret:team-*"]}, "subscribe", "secret:team-a", True),
        ({"subscribe": ["secret:team-*"]}, "publish", "secret:team-a", False),
        ({"subscribe": ["secret:team-*"]}, "subscribe", "secret:other", False),
        ({"publish": ["secret:{sub}"]}, "publish", "secret:app:7", True),
        ({"publish": ["secret:{sub}"]}, "publish", "secret:app:8", False),
        ({"publish": ["secret:{sub}"]}, "publish", "secret:7", False),
        ({"subscribe": ["secret:[ab]"]}, "subscribe", "secret:b", True),
        ({"subscribe": ["secret:x"]}, "subscribe", "secret:xy", False),
        ({}, "subscribe", "secret:x", False),
    ],
)
def test_channel_grants_add_their_patterns_and_nothing_else(claim, action, channel, expected):
    compiled = rules(("secret:*", ["admin"], ["admin"]))
    assert may(granted(claim), action, channel, compiled) is expected


def test_a_grant_holds_even_where_the_first_matching_rule_denies():
    compiled = rules(("secret:*", [], []), ("*", ["anonymous"], []))
    assert may(granted({"subscribe": ["secret:x"]}), "subscribe", "secret:x", compiled) is True


@pytest.mark.parametrize(
    "claim",
    [
        "secret:*",
        ["secret:*"],
        {"subscribe": "secret:*"},
        {"subscribe": [1]},
        {"subscribe": [""]},
        {"subscribe": ["x" * 257]},
        {"subscribe": ["a"] * 65},
        {"read": ["a"]},
    ],
)
def test_a_malformed_channels_claim_is_refused(claim):
    with pytest.raises(ValueError, match=r"must be|patterns"):
        compile_grants(claim, "app:7")


# owner channels and their sub-channels (issue 11)


def test_a_broader_later_rule_catching_owner_sub_channels_is_warned_about():
    compiled = rules(("user:{sub}", ["owner"], ["owner"]), ("*", ["authenticated"], []))
    [warning] = owner_channel_warnings(compiled)
    assert "'user:42:inbox'" in warning
    assert "channels[1]" in warning
    assert "'user:{sub}:*'" in warning


def test_owner_sub_channels_written_explicitly_raise_no_warning():
    compiled = rules(
        ("user:{sub}", ["owner"], ["owner"]), ("user:{sub}:*", ["owner"], []), ("*", ["authenticated"], [])
    )
    assert owner_channel_warnings(compiled) == []
    assert may(who(id="4"), "subscribe", "user:4:inbox", compiled)
    assert not may(who(id="5"), "subscribe", "user:4:inbox", compiled)


def test_the_shipped_settings_keep_a_users_sub_channels_private():
    from server.settings import load_settings

    shipped = compile_rules(load_settings(Path(__file__).parents[1] / "settings.toml", {}).channels)
    assert owner_channel_warnings(shipped) == []
    assert may(who(id="4"), "subscribe", "user:4:inbox", shipped)
    assert not may(who(id="5"), "subscribe", "user:4:inbox", shipped)
