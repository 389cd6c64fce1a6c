"""Channel rules from settings: who may subscribe to and publish on which channel."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from server.errors import Forbidden, Unauthorized, ValidationError
from server.identity.auth import Identity
from server.settings import ChannelRule, SettingsError

CHANNEL_NAME = re.compile(r"[A-Za-z0-9_.:@-]{1,128}")
SUB_PLACEHOLDER = "{sub}"
Action = Literal["subscribe", "publish"]


def is_valid_channel(name: object) -> bool:
    return isinstance(name, str) and CHANNEL_NAME.fullmatch(name) is not None


@dataclass(frozen=True, slots=True)
class CompiledRule:
    pattern: str
    regex: re.Pattern[str]
    subscribe: frozenset[str]
    publish: frozenset[str]
    presence: bool = False

    def allowed(self, action: Action) -> frozenset[str]:
        return self.subscribe if action == "subscribe" else self.publish


def sub_regex(id_prefixes: Iterable[str] = ()) -> str:
    """What {sub} matches: an id without ':', optionally behind an issuer's id_prefix (§13:
    owner compares with the prefixed id, so `user:{sub}` is `user:app:42` for `app:` + 42)."""
    prefixes = "|".join(re.escape(prefix) for prefix in sorted(id_prefixes, key=len, reverse=True))
    return f"(?P<sub>(?:{prefixes})?[^:]+)" if prefixes else "(?P<sub>[^:]+)"


def compile_rule(rule: ChannelRule, index: int = 0, id_prefixes: Iterable[str] = ()) -> CompiledRule:
    """An fnmatch pattern, in which {sub} stands for one caller's id, as an anchored regex."""
    pieces = rule.pattern.split(SUB_PLACEHOLDER)
    translated = [_unanchored(fnmatch.translate(piece)) for piece in pieces]
    regex = sub_regex(id_prefixes).join(translated)
    if len(pieces) > 2:
        raise SettingsError(f"channels[{index}].pattern", "may hold {sub} at most once")
    try:
        compiled = re.compile(f"(?s:{regex})\\Z")
    except re.error as exc:
        raise SettingsError(f"channels[{index}].pattern", f"is not a valid pattern: {exc}") from None
    return CompiledRule(rule.pattern, compiled, frozenset(rule.subscribe), frozenset(rule.publish), rule.presence)


def _unanchored(translated: str) -> str:
    """fnmatch.translate gives `(?s:...)\\Z`; keep the inside to join pieces around {sub}."""
    match = re.fullmatch(r"\(\?s:(.*)\)\\[zZ]", translated, re.S)
    return match[1] if match else translated


def compile_rules(rules: Iterable[ChannelRule], id_prefixes: Iterable[str] = ()) -> tuple[CompiledRule, ...]:
    id_prefixes = tuple(id_prefixes)
    return tuple(compile_rule(rule, index, id_prefixes) for index, rule in enumerate(rules))


MAX_GRANTS = 64  # patterns per action in one token's `channels` claim
MAX_GRANT_LENGTH = 256


@dataclass(frozen=True, slots=True)
class Grants:
    """An application token's `channels` claim (§13): channels granted on top of the rules."""

    subscribe: tuple[re.Pattern[str], ...] = ()
    publish: tuple[re.Pattern[str], ...] = ()

    def allows(self, action: Action, channel: str) -> bool:
        patterns = self.subscribe if action == "subscribe" else self.publish
        return any(pattern.match(channel) for pattern in patterns)


def compile_grants(claim: object, identity_id: str) -> Grants | None:
    """The claim's patterns as anchored regexes, {sub} being exactly this identity's id.
    ValueError says what is wrong with a malformed claim (the token is then refused)."""
    if claim is None:
        return None
    if not isinstance(claim, dict) or set(claim) - {"subscribe", "publish"}:
        raise ValueError('must be an object with "subscribe" and/or "publish" lists')
    compiled: dict[str, tuple[re.Pattern[str], ...]] = {}
    for action in ("subscribe", "publish"):
        patterns = claim.get(action, [])
        if not isinstance(patterns, list) or len(patterns) > MAX_GRANTS:
            raise ValueError(f"{action} must be a list of at most {MAX_GRANTS} patterns")
        if not all(isinstance(p, str) and 0 < len(p) <= MAX_GRANT_LENGTH for p in patterns):
            raise ValueError(f"{action} patterns must be strings of 1 to {MAX_GRANT_LENGTH} characters")
        compiled[action] = tuple(_grant_regex(p, identity_id) for p in patterns)
    return Grants(compiled["subscribe"], compiled["publish"])


def _grant_regex(pattern: str, identity_id: str) -> re.Pattern[str]:
    pieces = [_unanchored(fnmatch.translate(piece)) for piece in pattern.split(SUB_PLACEHOLDER)]
    try:
        return re.compile(f"(?s:{re.escape(identity_id).join(pieces)})\\Z")
    except re.error as exc:
        raise ValueError(f"{pattern!r} is not a valid pattern: {exc}") from None


def channel_rule_for(rules: Iterable[CompiledRule], channel: str) -> tuple[CompiledRule, str | None] | None:
    """The first rule matching the channel and the {sub} it captured, or None."""
    for rule in rules:
        match = rule.regex.match(channel)
        if match:
            return rule, match.groupdict().get("sub")
    return None


def has_presence(channel: str, rules: Iterable[CompiledRule]) -> bool:
    """Presence is the matching rule's choice (PROTOCOL §14): off without a rule, for admins too."""
    found = channel_rule_for(rules, channel)
    return found is not None and found[0].presence


def check_presence(identity: Identity | None, channel: str, rules: Iterable[CompiledRule]) -> None:
    """Who may ask who is here: subscribers of a presence channel. Permission is decided first,
    so a caller who may not subscribe learns nothing, not even whether presence is on."""
    check_permission(identity, "subscribe", channel, rules)
    if not has_presence(channel, rules):
        raise Forbidden(f"Presence is off for {channel}")


def may(identity: Identity | None, action: Action, channel: str, rules: Iterable[CompiledRule]) -> bool:
    """First match wins, default deny; admin may do everything; a token's grants add channels."""
    if identity is not None and identity.is_admin:
        return True
    if identity is not None and identity.grants is not None and identity.grants.allows(action, channel):
        return True  # a grant holds whatever rule matches first (§15)
    found = channel_rule_for(rules, channel)
    if found is None:
        return False
    rule, sub = found
    allowed = rule.allowed(action)
    if "anonymous" in allowed:
        return True
    if identity is None:
        return False
    if "authenticated" in allowed or not allowed.isdisjoint(identity.roles):
        return True
    return "owner" in allowed and sub is not None and sub == identity.id


def check_channel_name(channel: object) -> None:
    """422 (`validation_error` on WebSocket) for a name no channel can have."""
    if not is_valid_channel(channel):
        raise ValidationError.field("channel", "must be 1 to 128 characters of A-Z a-z 0-9 _ . : @ -")


def check_permission(identity: Identity | None, action: Action, channel: str, rules: Iterable[CompiledRule]) -> None:
    """Raise unless allowed: 422 for a bad name, 401 without credentials, 403 with them."""
    check_channel_name(channel)
    if may(identity, action, channel, rules):
        return
    if identity is None:
        raise Unauthorized(f"Credentials are needed to {action} on {channel}")
    raise Forbidden(f"You may not {action} on {channel}")


def owner_channel_warnings(rules: tuple[CompiledRule, ...]) -> list[str]:
    """Owner rules whose channels' children a later, broader rule catches.

    `user:{sub}` matches `user:42` only: `user:42:inbox` falls through to the next rule
    that matches, often a broad one. Herald does not widen owner patterns by itself (a
    rule means what it says); it warns at start-up so the deployment writes
    `user:{sub}:*` explicitly, as the shipped settings.toml does.
    """
    warnings = []
    for index, rule in enumerate(rules):
        if "owner" not in rule.subscribe | rule.publish or "[" in rule.pattern:
            continue
        own = rule.pattern.replace(SUB_PLACEHOLDER, "42").replace("*", "x").replace("?", "x")
        child = f"{own}:inbox"
        found = channel_rule_for(rules, child)
        if found is None or found[0] is rule or "owner" in found[0].subscribe | found[0].publish:
            continue
        later = rules.index(found[0])
        warnings.append(
            f"channels[{later}] ({found[0].pattern!r}) decides who may use {child!r}, a sub-channel of the "
            f"owner channel {own!r} of channels[{index}] ({rule.pattern!r}); add a rule "
            f"{rule.pattern + ':*'!r} with owner before it if sub-channels should be private too"
        )
    return warnings


# The same rules as SQL, for lists that filter in the database (GET /api/channels).


def pattern_to_sql_regex(pattern: str, sub: str | None = None, id_prefixes: Iterable[str] = ()) -> str:
    """A rule pattern as an anchored PostgreSQL regular expression (ARE).

    `*` any run, `?` one character, `[...]` / `[!...]` a set, `{sub}` one id segment
    (`[^:]+`, optionally behind an issuer's id prefix, as sub_regex), or exactly `sub`
    when given; everything else literal.
    """
    prefixes = "|".join(_are_text(p) for p in sorted(id_prefixes, key=len, reverse=True))
    any_sub = f"(?:{prefixes})?[^:]+" if prefixes else "[^:]+"
    out, i = ["^"], 0
    while i < len(pattern):
        if pattern.startswith(SUB_PLACEHOLDER, i):
            out.append(any_sub if sub is None else _are_text(sub))
            i += len(SUB_PLACEHOLDER)
            continue
        c = pattern[i]
        if c == "*":
            out.append(".*")
        elif c == "?":
            out.append(".")
        elif c == "[" and (end := pattern.find("]", i + 2 if pattern[i + 1 : i + 2] in ("!", "]") else i + 1)) != -1:
            body = pattern[i + 1 : end]
            negate = body.startswith("!")
            body = body[1:] if negate else body
            out.append("[" + ("^" if negate else "") + body.replace("\\", "\\\\") + "]")
            i = end
        else:
            out.append(_are_literal(c))
        i += 1
    return "".join(out) + "$"


def _are_literal(c: str) -> str:
    return c if c.isalnum() else "\\" + c


def _are_text(text: str) -> str:
    return "".join(_are_literal(c) for c in text)


def subscribable_sql(
    identity: Identity, rules: Iterable[CompiledRule], first_param: int, id_prefixes: Iterable[str] = ()
) -> tuple[str, list]:
    """A boolean SQL expression over `name`: may `identity` subscribe (first match wins,
    default deny), with its parameters numbered from first_param. Mirrors may(), except a
    token's grants (§13), which stay Python regexes: for such an identity it admits
    everything and the caller filters with may()."""
    if identity.is_admin or identity.grants is not None:
        return "true", []
    id_prefixes = tuple(id_prefixes)
    cases, params = [], []

    def param(value) -> str:
        params.append(value)
        return f"${first_param + len(params) - 1}"

    for rule in rules:
        allowed = rule.subscribe
        if "anonymous" in allowed or "authenticated" in allowed or not allowed.isdisjoint(identity.roles):
            verdict = "true"
        elif "owner" in allowed and SUB_PLACEHOLDER in rule.pattern:
            verdict = f"name ~ {param(pattern_to_sql_regex(rule.pattern, identity.id))}"
        else:
            verdict = "false"
        cases.append(f"WHEN name ~ {param(pattern_to_sql_regex(rule.pattern, id_prefixes=id_prefixes))} THEN {verdict}")
    if not cases:
        return "false", []
    return f"CASE {' '.join(cases)} ELSE false END", params
