"""Revocation across real process trees (PROTOCOL §13): both workers of one instance and a
second instance on the same database close the identity's connections within 2 s."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import aiohttp
import jwt
import pytest

from tests.conftest import truncate_all, wait_for
from tests.procs import Herald, bearer, make_users

pytestmark = pytest.mark.slow

ISS, SECRET = "https://app.example", "a shared application secret, 32+ bytes"
ISSUER_TOML = f"""
[[auth.issuers]]
issuer = "{ISS}"
audience = "herald"
algorithms = ["HS256"]
secret = "{SECRET}"
id_prefix = "app:"
allowed_roles = ["subscriber"]
"""
WITHIN = 2.0  # seconds, §15


def app_token(sub: str) -> str:
    now = int(time.time())
    claims = {"sub": sub, "iss": ISS, "aud": "herald", "iat": now, "exp": now + 600}
    return jwt.encode(claims, SECRET, algorithm="HS256")


@pytest.fixture
async def instances(database_url, tmp_path) -> AsyncIterator[tuple[Herald, Herald]]:
    await truncate_all(database_url)
    secrets = tmp_path / "shared-secrets"
    started = [
        Herald.start(tmp_path, database_url, workers=2, name="a", secrets_dir=secrets, extra_settings=ISSUER_TOML),
        Herald.start(tmp_path, database_url, workers=1, name="b", secrets_dir=secrets, extra_settings=ISSUER_TOML),
    ]
    try:
        for herald in started:
            await herald.wait_ready()
        yield started[0], started[1]
    finally:
        for herald in started:
            herald.kill()
        for herald in started:
            print(f"--- {herald.log_path.name}, last lines ---\n{herald.log_tail()}")


async def websocket(session: aiohttp.ClientSession, url: str) -> aiohttp.ClientWebSocketResponse:
    ws = await session.ws_connect(url)
    assert (await ws.receive_json(timeout=10))["op"] == "welcome"
    return ws


async def close_code(ws: aiohttp.ClientWebSocketResponse) -> int:
    while True:
        message = await ws.receive()
        if message.type == aiohttp.WSMsgType.CLOSE:
            return message.data
        if message.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
            return ws.close_code


async def test_revocation_closes_connections_on_both_workers_and_a_second_instance(instances):
    a, b = instances
    tokens = await make_users(a.base)
    token, bystander_token = app_token("u1"), app_token("u2")
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
        by_worker: dict[int, aiohttp.ClientWebSocketResponse] = {}
        spare: list[aiohttp.ClientWebSocketResponse] = []

        async def one_on_each_worker() -> bool:
            ws = await websocket(session, a.url(f"/ws?access_token={token}"))
            pid = a.worker_holding(ws.get_extra_info("sockname")[1])
            if pid is None or pid in by_worker:
                spare.append(ws)
            else:
                by_worker[pid] = ws
            return len(by_worker) == a.workers

        await wait_for(one_on_each_worker, timeout=30, interval=0)
        on_b = await websocket(session, b.url(f"/ws?access_token={token}"))
        bystander = await websocket(session, a.url(f"/ws?access_token={bystander_token}"))
        sse = await session.get(b.url(f"/sse?channel=news&access_token={token}"))
        assert sse.status == 200
        await sse.content.readuntil(b"\n\n")  # the stream is open

        async with session.post(a.url("/api/revocations"), json={"id": "app:u1"}, headers=bearer(tokens.admin)) as r:
            assert r.status == 204, await r.text()
        started = time.monotonic()
        closing = [*by_worker.values(), *spare, on_b]
        codes = await asyncio.wait_for(asyncio.gather(*(close_code(ws) for ws in closing)), timeout=10)
        await asyncio.wait_for(sse.content.read(), timeout=10)  # the stream ends
        elapsed = time.monotonic() - started
        assert codes == [4403] * len(closing)
        assert elapsed < WITHIN, elapsed

        await bystander.send_json({"op": "ping", "id": 1})
        assert (await bystander.receive_json(timeout=10))["op"] == "pong"
        for base in (a.base, a.base, a.base, b.base):  # fresh connections: either worker of a
            async with session.get(f"{base}/api/me", headers=bearer(token)) as resp:
                assert resp.status == 401
            async with session.get(f"{base}/api/me", headers=bearer(bystander_token)) as resp:
                assert resp.status == 200
        await bystander.close()
        sse.close()
