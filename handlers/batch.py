"""Batch publish and broadcast (PROTOCOL §11): many events in one request, all or none."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from handlers.events import raw_json_response
from handlers.http import identity_of, read_json_object
from server.errors import ValidationError
from server.events.store import StoredEvent, validate_event, validate_idempotency_key
from server.identity.permissions import check_permission, is_valid_channel
from server.keys import rules_key, settings_key, store_key

CHANNEL_RULE = "must be 1 to 128 characters of A-Z a-z 0-9 _ . : @ -"


def check_publish_permissions(request: web.Request, channels: list[Any]) -> None:
    """401/403 for the first refused channel, before any item is validated (§15 §11)."""
    identity, rules = identity_of(request), request.app[rules_key]
    for channel in channels:
        if is_valid_channel(channel):
            check_permission(identity, "publish", channel, rules)


def check_fields(body: dict[str, Any], allowed: set[str]) -> None:
    unknown = set(body) - allowed
    if unknown:
        raise ValidationError.field(sorted(unknown)[0], "is not a field of this request")


def validated_event(body: dict[str, Any], field: str) -> tuple[str, str]:
    """validate_event with the offending field named inside the request (events[3].type)."""
    try:
        return validate_event(body)
    except ValidationError as exc:
        error = (exc.errors or [{"field": "", "message": exc.detail}])[0]
        raise ValidationError.field(f"{field}.{error['field']}", error["message"]) from None


def listed(body: dict[str, Any], name: str, limit: int) -> list[Any]:
    value = body.get(name)
    if not isinstance(value, list) or not 1 <= len(value) <= limit:
        raise ValidationError.field(name, f"must be a list of 1 to {limit} items")
    return value


async def store(request: web.Request, endpoint: str, items: list[tuple[str, str, str]]) -> web.Response:
    key = validate_idempotency_key(request.headers.get("Idempotency-Key"))
    store_ = request.app[store_key]
    if key is not None:
        identity = identity_of(request)
        scope = f"{endpoint} {identity.id if identity is not None else 'anonymous'}"
        body, created = await store_.publish_keyed(scope, key, items)
        return raw_json_response(body, status=201 if created else 200)
    events = await store_.publish_many(items)
    return raw_json_response(items_body(events), status=201)


def items_body(events: list[StoredEvent]) -> bytes:
    return b'{"items":[' + b",".join(e.json.encode() for e in events) + b"]}"


async def publish_events(request: web.Request) -> web.Response:
    limits = request.app[settings_key].limits
    body = await read_json_object(request, max_size=limits.batch_body_bytes)
    events = listed(body, "events", limits.batch_events)
    check_publish_permissions(request, [e.get("channel") if isinstance(e, dict) else None for e in events])
    check_fields(body, {"events"})
    items = []
    for index, event in enumerate(events):
        field = f"events[{index}]"
        if not isinstance(event, dict):
            raise ValidationError.field(field, "must be an object")
        channel = event.get("channel")
        if not is_valid_channel(channel):
            raise ValidationError.field(f"{field}.channel", CHANNEL_RULE)
        event_type, data = validated_event({k: v for k, v in event.items() if k != "channel"}, field)
        items.append((channel, event_type, data))
    return await store(request, "events", items)


async def broadcast(request: web.Request) -> web.Response:
    limits = request.app[settings_key].limits
    body = await read_json_object(request, max_size=limits.batch_body_bytes)
    channels = listed(body, "channels", limits.batch_events)
    check_publish_permissions(request, channels)
    check_fields(body, {"channels", "type", "data"})
    seen = set()
    for index, channel in enumerate(channels):
        if not is_valid_channel(channel):
            raise ValidationError.field(f"channels[{index}]", CHANNEL_RULE)
        if channel in seen:
            raise ValidationError.field(f"channels[{index}]", "repeats an earlier channel")
        seen.add(channel)
    event_type, data = validate_event({k: v for k, v in body.items() if k != "channels"})
    return await store(request, "broadcast", [(channel, event_type, data) for channel in channels])
