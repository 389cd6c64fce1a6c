"""GET /metrics (PROTOCOL §7 and §10's §7): who may read it, and what it counts, through real HTTP."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import wait_for
from tests.helpers import SseClient, WsClient, bearer, publish, token_for

METRICS_TOKEN = "s3cret-metrics"
EVENTS_ROUTE = "/api/channels/{channel}/events"
FAMILIES = {
    "herald_http_requests": "counter",
    "herald_http_request_duration_seconds": "histogram",
    "herald_connections": "gauge",
    "herald_events_published": "counter",
    "herald_events_delivered": "counter",
    "herald_slow_consumer_closes": "counter",
}


@pytest.fixture
async def admin(client) -> str:
    return await token_for(client, "root", roles=("admin",))


@pytest.fixture
async def publisher(client) -> str:
    return await token_for(client, "pub", roles=("publisher",))


async def scrape(client, token: str) -> dict[str, list]:
    """The metric families by name, each a list of (sample name, labels, value)."""
    resp = await client.get("/metrics", headers=bearer(token))
    assert resp.status == 200, await resp.text()
    text = await resp.text()
    return {
        family.name: [(s.name, s.labels, s.value) for s in family.samples]
        for family in text_string_to_metric_families(text)
    }


def value(families: dict[str, list], sample: str, **labels: str) -> float:
    """The value of one sample (0 when absent), matching the given labels exactly."""
    for samples in families.values():
        for name, found, number in samples:
            if name == sample and found == labels:
                return number
    return 0.0


async def test_metrics_need_credentials(client):
    resp = await client.get("/metrics")
    assert resp.status == 401
    assert resp.headers["Content-Type"].startswith("application/problem+json")
    assert (await resp.json(content_type=None))["code"] == "unauthorized"
    assert resp.headers["WWW-Authenticate"].startswith("Bearer")


async def test_metrics_forbidden_to_non_admins(client):
    token = await token_for(client, "alice", roles=("subscriber", "publisher"))
    resp = await client.get("/metrics", headers=bearer(token))
    assert resp.status == 403
    assert (await resp.json(content_type=None))["code"] == "forbidden"


async def test_metrics_for_admins(client, admin):
    resp = await client.get("/metrics", headers=bearer(admin))
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/plain")
    families = {family.name: family.type for family in text_string_to_metric_families(await resp.text())}
    for name, kind in FAMILIES.items():
        assert families.get(name) == kind, (name, families)


async def test_metrics_token(make_client):
    client = await make_client({"metrics": {"token": METRICS_TOKEN}})
    resp = await client.get("/metrics", headers=bearer(METRICS_TOKEN))
    assert resp.status == 200, await resp.text()
    assert resp.headers["Content-Type"].startswith("text/plain")
    assert "herald_http_requests_total" in await resp.text()

    for header in (f"Bearer {METRICS_TOKEN}x", "Bearer wrong", f"Basic {METRICS_TOKEN}", METRICS_TOKEN):
        resp = await client.get("/metrics", headers={"Authorization": header})
        assert resp.status == 401, header
    # The metrics token is no credential anywhere else.
    assert (await client.get("/api/me", headers=bearer(METRICS_TOKEN))).status == 401
    # Admins still may.
    admin = await token_for(client, "root", roles=("admin",))
    assert (await client.get("/metrics", headers=bearer(admin))).status == 200


async def test_metrics_token_unset_means_admin_only(client):
    # An empty metrics.token must not make "Bearer " (or "Bearer") a key.
    for header in ("Bearer ", "Bearer"):
        assert (await client.get("/metrics", headers={"Authorization": header})).status == 401


async def test_requests_counted_by_route_template(client, admin, publisher):
    for n in range(3):
        await publish(client, publisher, "public:news", {"n": n})
    assert (await client.get("/api/channels/public:news/events", headers=bearer(admin))).status == 200
    assert (await client.get("/api/nope")).status == 404
    assert (await client.get("/api/me")).status == 401

    families = await scrape(client, admin)
    requests = "herald_http_requests_total"
    assert value(families, requests, method="POST", route=EVENTS_ROUTE, status="201") == 3
    assert value(families, requests, method="GET", route=EVENTS_ROUTE, status="200") == 1
    assert value(families, requests, method="GET", route="/api/me", status="401") == 1
    assert value(families, requests, method="GET", route="unmatched", status="404") == 1
    routes = {labels["route"] for _, labels, _ in families["herald_http_requests"]}
    assert not [route for route in routes if "public:news" in route or "nope" in route], routes

    histogram = families["herald_http_request_duration_seconds"]
    buckets = [(labels["le"], number) for name, labels, number in histogram if name.endswith("_bucket")]
    assert len(buckets) > 1
    assert buckets[-1][0] == "+Inf"
    counts = [number for _, number in buckets]
    assert counts == sorted(counts)  # cumulative
    total = sum(number for name, _, number in families["herald_http_requests"] if name == requests)
    assert value(families, "herald_http_request_duration_seconds_count") == total == buckets[-1][1]
    assert value(families, "herald_http_request_duration_seconds_sum") > 0


async def test_open_connections_by_transport(client, admin):
    def reads(ws: float, sse: float):
        async def check() -> bool:
            families = await scrape(client, admin)
            return (
                value(families, "herald_connections", transport="ws"),
                value(families, "herald_connections", transport="sse"),
            ) == (ws, sse)

        return check

    assert await reads(0, 0)()

    ws = await WsClient.connect(client)
    sse = await SseClient.connect(client, "channel=public:news")
    try:
        await wait_for(reads(1, 1))
    finally:
        await ws.ws.close()
        sse.close()
    await wait_for(reads(0, 0))


async def test_events_published_and_delivered(client, admin, publisher):
    before = await scrape(client, admin)
    ws = await WsClient.connect(client, headers=bearer(admin))
    await ws.subscribe("public:news")
    sse = await SseClient.connect(client, "channel=public:news")
    try:
        while "id" not in await sse.message():  # the stream's first cursor: subscribed
            pass
        for n in range(3):
            await publish(client, publisher, "public:news", {"n": n})
        assert [e["data"] for e in await ws.events(3)] == [{"n": 0}, {"n": 1}, {"n": 2}]
        assert [e["data"] for e in await sse.events(3)] == [{"n": 0}, {"n": 1}, {"n": 2}]

        published = "herald_events_published_total"
        delivered = "herald_events_delivered_total"

        async def counted() -> bool:
            now = await scrape(client, admin)
            return (
                value(now, delivered, transport="ws") - value(before, delivered, transport="ws") >= 3
                and value(now, delivered, transport="sse") - value(before, delivered, transport="sse") >= 3
            )

        await wait_for(counted)
        after = await scrape(client, admin)
        assert value(after, published) - value(before, published) == 3
        assert value(after, "herald_slow_consumer_closes_total") == 0
        assert "herald_slow_consumer_closes" in after
    finally:
        await ws.ws.close()
        sse.close()
