"""Open connections follow their user's changes: roles, disable, delete, the end of a session.

Every process hears a user's change on the users NOTIFY channel (server/realtime/engine.py)
and re-checks that user's connections here, so a change reaches every worker and every
instance within moments (PROTOCOL §10a allows 5 s). A connection's identity takes the
current roles (its publishes use them), a subscription its new roles forbid ends, and a
connection opened with a browser session that has ended closes.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable

from server.identity.permissions import CompiledRule, may
from server.identity.sessions import SessionStore
from server.identity.users import UserStore
from server.realtime.hub import Hub

log = logging.getLogger("herald.realtime")


async def follow_user_change(
    hub: Hub, users: UserStore, sessions: SessionStore, rules: Iterable[CompiledRule], user_id: str
) -> None:
    users.forget(user_id)
    connections = hub.connections_of(user_id)
    if not connections:
        return
    user = await users.active_user(user_id)
    if user is None:
        for conn in connections:
            conn.close(4403, "user removed or disabled")
        return
    rules = tuple(rules)
    roles = frozenset(user.roles)
    live: dict[str, bool] = {}  # tabs share a browser session: ask once per session
    for conn in connections:
        identity = conn.identity
        if identity is None or conn.closed:
            continue
        if identity.session is not None and identity.session not in live:
            live[identity.session] = await sessions.is_live(identity.session)
        if identity.session is not None and not live[identity.session]:
            conn.close(4401, "session ended")
            continue
        if identity.roles != roles or identity.username != user.username:
            conn.identity = dataclasses.replace(identity, roles=roles, username=user.username)
        for channel in list(conn.subscriptions):
            if not may(conn.identity, "subscribe", channel, rules):
                hub.unsubscribe(conn, channel)
                conn.subscription_forbidden(channel)
                log.info("subscription ended: roles changed", extra={"connection": conn.id, "channel": channel})
