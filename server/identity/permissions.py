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

    def allowed(self, action: Action) -> frozenset[str]:
        return self.subscribe if action == "subscribe" else self.publish


def compile_rule(rule: ChannelRule, index: int = 0) -> CompiledRule:
    """An fnmatch pattern, in which {sub} stands for one caller's id, as an anchored regex."""
    pieces = rule.pattern.split(SUB_PLACEHOLDER)
    translated = [_unanchored(fnmatch.translate(piece)) for piece in pieces]
    regex = "(?P<sub>[^:]+)".join(translated)
    if len(pieces) > 2:
        raise SettingsError(f"channels[{index}].pattern", "may hold {sub} at most once")
    try:
        compiled = re.compile(f"(?s:{regex})\\Z")
    except re.error as exc:
        raise SettingsError(f"channels[{index}].pattern", f"is not a valid pattern: {exc}") from None
    return CompiledRule(rule.pattern, compiled, frozenset(rule.subscribe), frozenset(rule.publish))


def _unanchored(translated: str) -> str:
    """fnmatch.translate gives `(?s:...)\\Z`; keep the inside to join pieces around {sub}."""
    match = re.fullmatch(r"\(\?s:(.*)\)\\[zZ]", translated, re.S)
    return match[1] if match else translated


def compile_rules(rules: Iterable[ChannelRule]) -> tuple[CompiledRule, ...]:
    return tuple(compile_rule(rule, index) for index, rule in enumerate(rules))


def channel_rule_for(rules: Iterable[CompiledRule], channel: str) -> tuple[CompiledRule, str | None] | None:
    """The first rule matching the channel and the {sub} it captured, or None."""
    for rule in rules:
        match = rule.regex.match(channel)
        if match:
            return rule, match.groupdict().get("sub")
    return None


def may(identity: Identity | None, action: Action, channel: str, rules: Iterable[CompiledRule]) -> bool:
    """First match wins, default deny; admin may do everything."""
    if identity is not None and identity.is_admin:
        return True
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


def check_permission(identity: Identity | None, action: Action, channel: str, rules: Iterable[CompiledRule]) -> None:
    """Raise unless allowed: 422 for a bad name, 401 without credentials, 403 with them."""
    if not is_valid_channel(channel):
        raise ValidationError.field("channel", "must be 1 to 128 characters of A-Z a-z 0-9 _ . : @ -")
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


def pattern_to_sql_regex(pattern: str, sub: str | None = None) -> str:
    """A rule pattern as an anchored PostgreSQL regular expression (ARE).

    `*` any run, `?` one character, `[...]` / `[!...]` a set, `{sub}` one id segment
    (`[^:]+`), or exactly `sub` when given; everything else literal.
    """
    out, i = ["^"], 0
    while i < len(pattern):
        if pattern.startswith(SUB_PLACEHOLDER, i):
            out.append("[^:]+" if sub is None else "".join(_are_literal(c) for c in sub))
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


def subscribable_sql(identity: Identity, rules: Iterable[CompiledRule], first_param: int) -> tuple[str, list]:
    """A boolean SQL expression over `name`: may `identity` subscribe (first match wins,
    default deny), with its parameters numbered from first_param. Mirrors may()."""
    if identity.is_admin:
        return "true", []
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
        cases.append(f"WHEN name ~ {param(pattern_to_sql_regex(rule.pattern))} THEN {verdict}")
    if not cases:
        return "false", []
    return f"CASE {' '.join(cases)} ELSE false END", params
