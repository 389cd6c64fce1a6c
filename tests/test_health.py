from tests.conftest import wait_for


async def test_healthz_answers_with_request_id_and_security_headers(client):
    resp = await client.get("/healthz")
    assert resp.status == 200
    assert await resp.json() == {"status": "ok"}
    assert resp.headers["X-Request-Id"]
    assert resp.headers["X-Content-Type-Options"] == "nosniff"


async def test_readyz_is_200_when_the_database_answers(client):
    resp = await client.get("/readyz")
    assert resp.status == 200
    assert (await resp.json())["checks"]["database"] is True


async def test_readyz_goes_503_when_the_database_stops_and_back_to_200_without_restart(client, postgres):
    postgres.stop()
    try:

        async def not_ready():
            resp = await client.get("/readyz")
            return resp.status == 503 and resp

        resp = await wait_for(not_ready)
        assert resp.content_type == "application/problem+json"
        body = await resp.json()
        assert body["code"] == "unavailable"
        assert "database" in body["detail"]
    finally:
        postgres.start()

    async def ready():
        return (await client.get("/readyz")).status == 200

    await wait_for(ready, timeout=20)
