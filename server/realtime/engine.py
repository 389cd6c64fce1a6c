"""The real-time engine of one process: store, hub, broker, presence and their jobs."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

import aiojobs
from aiohttp import web

from server.events.broker import Broker
from server.events.store import EventStore
from server.identity.revocations import Revocations, parse_notification
from server.keys import (
    broker_key,
    hub_key,
    issuers_key,
    metrics_key,
    pool_key,
    presence_key,
    revocations_key,
    roster_key,
    rules_key,
    sessions_key,
    settings_key,
    store_key,
    users_key,
)
from server.realtime.connections import Connection, SseConnection, WebSocketConnection
from server.realtime.hub import Hub
from server.realtime.presence import Presence
from server.realtime.reauthorize import follow_user_change
from server.realtime.roster import Roster
from server.storage.db import DATABASE_DOWN_ERRORS

log = logging.getLogger("herald.realtime")

REVOCATION_PRUNE_INTERVAL = 60.0  # seconds


async def realtime_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[settings_key]
    metrics = app[metrics_key]
    store = app[store_key] = EventStore(
        app[pool_key],
        settings.events,
        on_published=metrics.published.inc,
        publish_wait=settings.database.publish_wait,
        publish_flights=settings.publish_flights,
        synchronous_commit=settings.database.publish_synchronous_commit,
    )
    realtime = settings.realtime
    hub = app[hub_key] = Hub(store, realtime.outbound_buffer, realtime.max_replays, realtime.heartbeat)
    presence = app[presence_key] = Presence(app[pool_key], app[rules_key], settings.database.schema)
    roster = app[roster_key] = Roster(presence, hub, realtime.presence_grace)
    presence.roster = roster
    hub.presence = presence

    async def on_user_change(user_id: str) -> None:
        if (revocation := parse_notification(user_id)) is not None:
            close_revoked(hub, app[revocations_key], *revocation)
            return
        await follow_user_change(hub, app[users_key], app[sessions_key], app[rules_key], user_id)

    broker = app[broker_key] = Broker(
        settings.database.url,
        store,
        hub.dispatch,
        on_user_change,
        schema=settings.database.schema,
        on_reconnect=app[revocations_key].reload,
    )
    hub.broker = broker
    broker.listen_also(presence.notify_channel, roster.on_notify, roster.on_reconnect)
    hub.revoked = app[revocations_key].refuses
    scheduler = aiojobs.Scheduler(close_timeout=2)
    for job in (
        broker.listen(),
        broker.process(),
        presence.report_forever(),
        roster.run(),
        prune_forever("events", store.prune, settings.events.prune_interval),
        beat_forever(hub, settings.realtime.sse_ping, SseConnection, SseConnection.ping),
        beat_forever(hub, settings.realtime.heartbeat, WebSocketConnection, WebSocketConnection.heartbeat),
        metrics.sync_forever(hub),
        prune_forever("expired revocations", app[revocations_key].prune, REVOCATION_PRUNE_INTERVAL),
        app[issuers_key].refresh_forever(),
    ):
        await scheduler.spawn(job)
    if not await broker.wait_connected(deadline=10):
        log.warning("serving before the event listener connected; /readyz says 503 until it does")
    try:
        yield
    finally:
        await scheduler.close()
        await store.close()
        try:
            await asyncio.wait_for(presence.withdraw(), timeout=2)
        except (*DATABASE_DOWN_ERRORS, TimeoutError):
            pass


async def close_connections(app: web.Application) -> None:
    """on_shutdown: WebSockets get 1001, SSE streams end, so draining never waits on them."""
    app[hub_key].close_all(1001, "server shutting down")


def close_revoked(hub: Hub, revocations: Revocations, identity_id: str, revoked_at: int, expires_at: int) -> None:
    """A revocation from any process or instance: remember it, close what it covers (4403)."""
    revocations.remember(identity_id, revoked_at, expires_at)
    for conn in hub.connections_of(identity_id):
        if revocations.refuses(conn.identity):
            conn.close(4403, "revoked")


async def prune_forever(what: str, prune: Callable[[], Awaitable[int]], interval: float) -> None:
    """Every `interval`, drop what has expired (events, revocations); a database outage skips a pass."""
    while True:
        await asyncio.sleep(interval)
        try:
            pruned = await prune()
            if pruned:
                log.info("pruned %d %s", pruned, what)
        except DATABASE_DOWN_ERRORS as exc:
            log.warning("pruning %s skipped: %s", what, type(exc).__name__)


async def beat_forever(hub: Hub, interval: float, kind: type[Connection], beat: Callable[[Connection], None]) -> None:
    """Every `interval`, one beat for each open connection of a kind: one loop, no per-socket timer."""
    while True:
        await asyncio.sleep(interval)
        for conn in list(hub.connections):
            if isinstance(conn, kind) and not conn.closed:
                beat(conn)
