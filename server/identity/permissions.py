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
    return CompiledRule(rule.pattern, compiled, frozenset(rule.subscribe), frozenset(rule.publish), rule.presence)


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
