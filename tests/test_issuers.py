"""Application tokens (PROTOCOL §13): issuers with their own keys, JWKS, grants and revocation.

Every key is generated here with `cryptography`; a JWKS is served by a local aiohttp app the
test controls (what it answers, and whether it answers at all).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import jwt
import orjson
import pytest
from aiohttp import WSMsgType, web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from server.identity import issuers as issuers_module
from server.identity.auth import VERIFIED_CACHE_SIZE, TokenService
from server.identity.identify import Authenticator
from server.identity.issuers import Issuers
from server.identity.revocations import Revocations
from server.identity.users import UserStore
from server.keys import (
    authenticator_key,
    broker_key,
    issuers_key,
    pool_key,
    revocations_key,
    tokens_key,
    users_key,
)
from server.settings import AuthSettings, IssuerSettings, SettingsError
from tests.conftest import wait_for
from tests.helpers import SseClient, WsClient, add_user, bearer, publish, token_for

AUDIENCE = "herald"
SECRET = "an application secret of 32+ bytes!!"


def rsa_key():
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def new_key(algorithm: str):
    if algorithm.startswith(("RS", "PS")):
        return rsa_key()
    if algorithm == "ES256":
        return ec.generate_private_key(ec.SECP256R1())
    if algorithm == "EdDSA":
        return ed25519.Ed25519PrivateKey.generate()
    return SECRET


def pem(private_key) -> bytes:
    return private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def jwk(private_key, kid: str) -> dict[str, Any]:
    public = private_key.public_key()
    if isinstance(public, rsa.RSAPublicKey):
        data = jwt.algorithms.RSAAlgorithm.to_jwk(public, as_dict=True)
    elif isinstance(public, ec.EllipticCurvePublicKey):
        data = jwt.algorithms.ECAlgorithm.to_jwk(public, as_dict=True)
    else:
        data = jwt.algorithms.OKPAlgorithm.to_jwk(public, as_dict=True)
    return {**data, "kid": kid, "use": "sig"}


def jwks(*pairs) -> bytes:
    return orjson.dumps({"keys": [jwk(key, kid) for key, kid in pairs]})


def mint(key, algorithm: str, iss: str, *, kid: str | None = None, drop=(), **claims: Any) -> str:
    now = int(time.time())
    body = {"sub": "u1", "iss": iss, "aud": AUDIENCE, "iat": now, "exp": now + 300, **claims}
    for name in drop:
        body.pop(name)
    headers = {"kid": kid} if kid else None
    return jwt.encode(body, key, algorithm=algorithm, headers=headers)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hs256_signed_with(secret: bytes, claims: dict[str, Any]) -> str:
    """An HS256 token made by hand (pyjwt refuses a PEM key as an HMAC secret, an attacker doesn't)."""
    header = b64(orjson.dumps({"alg": "HS256", "typ": "JWT"}))
    signing_input = f"{header}.{b64(orjson.dumps(claims))}"
    signature = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(signature)}"


@dataclass
class JwksServer:
    """A JWKS endpoint the test controls: what it answers, and how often it was asked."""

    body: bytes = b'{"keys": []}'
    status: int = 200
    hits: int = 0
    url: str = ""
    served: list[bytes] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.Response:
        self.hits += 1
        return web.Response(body=self.body, status=self.status, content_type="application/json")


@pytest.fixture
async def jwks_server(aiohttp_server):
    server = JwksServer()
    app = web.Application()
    app.router.add_get("/jwks.json", server.handle)
    running = await aiohttp_server(app)
    server.url = str(running.make_url("/jwks.json"))
    return server


@dataclass
class Bed:
    """A Herald app with one issuer per algorithm, and the private keys to sign as each."""

    client: Any
    keys: dict[str, Any]
    jwks: JwksServer

    def iss(self, algorithm: str) -> str:
        return f"https://{algorithm.lower()}.app.example"

    def token(self, algorithm: str, **claims: Any) -> str:
        kid = claims.pop("kid", "k1" if algorithm in ("RS256", "EdDSA") else None)
        return mint(self.keys[algorithm], algorithm, self.iss(algorithm), kid=kid, **claims)

    def issuer(self, algorithm: str):
        return self.client.app[issuers_key].by_iss[self.iss(algorithm)]


def issuer_table(algorithm: str, **source: str) -> dict[str, Any]:
    return {
        "issuer": f"https://{algorithm.lower()}.app.example",
        "audience": AUDIENCE,
        "algorithms": [algorithm],
        "id_prefix": f"{algorithm.lower()}:",
        "allowed_roles": ["subscriber", "publisher"],
        **source,
    }


@pytest.fixture
async def bed(make_client, jwks_server, tmp_path):
    """RS256 from a jwks_url, ES256 from a public_key_file, EdDSA from a jwks_file, HS256 from a secret."""
    keys = {alg: new_key(alg) for alg in ("RS256", "ES256", "EdDSA", "HS256")}
    jwks_server.body = jwks((keys["RS256"], "k1"))
    (tmp_path / "es256.pem").write_bytes(pem(keys["ES256"]))
    (tmp_path / "eddsa.jwks").write_bytes(jwks((keys["EdDSA"], "k1")))
    tables = [
        issuer_table("RS256", jwks_url=jwks_server.url),
        issuer_table("ES256", public_key_file=str(tmp_path / "es256.pem")),
        issuer_table("EdDSA", jwks_file=str(tmp_path / "eddsa.jwks")),
        issuer_table("HS256", secret=SECRET),
    ]
    client = await make_client({"auth": {"issuers": tables}})
    return Bed(client, keys, jwks_server)


ALGORITHMS = ["RS256", "ES256", "EdDSA", "HS256"]


async def opened(sse: SseClient) -> SseClient:
    """Read up to the id-only message sent once every channel is subscribed."""
    while set(await sse.message()) != {"id"}:
        pass
    return sse


async def me(client, token: str):
    return await client.get("/api/me", headers=bearer(token))


# --- accepted on REST, WS and SSE, without any Herald user --------------------------------


@pytest.mark.parametrize("algorithm", ALGORITHMS)
async def test_an_app_token_is_an_identity_on_rest_without_a_herald_user(bed, algorithm):
    token = bed.token(algorithm, name="Ann", roles=["publisher", "subscriber"])
    resp = await me(bed.client, token)
    assert resp.status == 200, await resp.text()
    prefix = algorithm.lower()
    assert await resp.json() == {"id": f"{prefix}:u1", "username": "Ann", "roles": ["publisher", "subscriber"]}
    assert await bed.client.app[pool_key].fetchval("SELECT count(*) FROM users") == 0
    event = await publish(bed.client, token, "news", {"n": 1})  # "*" lets publishers publish
    assert event["offset"] == 1


@pytest.mark.parametrize("algorithm", ALGORITHMS)
async def test_an_app_token_follows_channels_over_websocket_and_sse(bed, algorithm):
    token = bed.token(algorithm, roles=["publisher"])
    ws = await WsClient.connect(bed.client, f"/ws?access_token={token}")
    assert ws.welcome["user"]["id"] == f"{algorithm.lower()}:u1"
    await ws.subscribe("news")
    sse = await opened(await SseClient.connect(bed.client, "channel=news", headers=bearer(token)))
    await publish(bed.client, token, "news", {"n": 1})
    assert [e["data"] for e in await ws.events(1)] == [{"n": 1}]
    assert [e["data"] for e in await sse.events(1)] == [{"n": 1}]
    sse.close()
    await ws.ws.close()


async def test_the_websocket_auth_op_takes_an_app_token_and_refreshes_it(bed):
    ws = await WsClient.connect(bed.client)
    reply = await ws.request("auth", token=bed.token("EdDSA", name="Eve"))
    assert reply["op"] == "ok"
    assert reply["user"] == {"id": "eddsa:u1", "username": "Eve", "roles": []}
    other = await ws.request("auth", token=bed.token("EdDSA", sub="u2"))
    assert other["op"] == "error"
    assert other["code"] == "forbidden"
    await ws.ws.close()


async def test_an_expiring_app_token_closes_the_websocket_with_4401_and_ends_the_sse_stream(bed):
    soon = int(time.time()) + 2
    token = bed.token("HS256", exp=soon)
    ws = await WsClient.connect(bed.client, f"/ws?access_token={token}")
    sse = await SseClient.connect(bed.client, f"channel=news&access_token={token}")
    assert await ws.closed_with(timeout=10) == 4401
    await wait_for(lambda: sse.response.content.at_eof() or sse.response.connection is None, timeout=10)
    sse.close()


async def test_an_auth_op_with_a_fresh_app_token_keeps_the_websocket_past_the_old_expiry(bed):
    first_exp = int(time.time()) + 2
    ws = await WsClient.connect(bed.client, f"/ws?access_token={bed.token('HS256', exp=first_exp)}")
    assert (await ws.request("auth", token=bed.token("HS256")))["op"] == "ok"
    await wait_for(lambda: time.time() > first_exp + 0.5, timeout=10)
    assert (await ws.request("ping"))["op"] == "pong"
    await ws.ws.close()


# --- refused: 401 ----------------------------------------------------------------------------


def claims_for(iss: str, **extra: Any) -> dict[str, Any]:
    now = int(time.time())
    return {"sub": "u1", "iss": iss, "aud": AUDIENCE, "iat": now, "exp": now + 300, **extra}


async def test_refused_app_tokens_get_401(bed):
    rsa_iss, es_iss = bed.iss("RS256"), bed.iss("ES256")
    stranger = rsa_key()
    refused = {
        "unknown issuer": mint(bed.keys["RS256"], "RS256", "https://nobody.example", kid="k1"),
        "another issuer's key": mint(bed.keys["ES256"], "ES256", rsa_iss, kid="k1"),
        "a key nobody configured": mint(stranger, "RS256", rsa_iss, kid="k1"),
        "HS256 with the RSA public key as secret": hs256_signed_with(pem(bed.keys["RS256"]), claims_for(rsa_iss)),
        "HS256 with the EC public key as secret": hs256_signed_with(pem(bed.keys["ES256"]), claims_for(es_iss)),
        "no exp": bed.token("ES256", drop=("exp",)),
        "no iat": bed.token("ES256", drop=("iat",)),
        "no sub": bed.token("HS256", drop=("sub",)),
        "wrong aud": bed.token("HS256", aud="someone-else"),
        "no aud": bed.token("HS256", drop=("aud",)),
        "expired": bed.token("HS256", iat=int(time.time()) - 600, exp=int(time.time()) - 10),
        "alg none": jwt.encode(claims_for(bed.iss("HS256")), None, algorithm="none"),
        "roles not a list": bed.token("HS256", roles="publisher"),
        "channels malformed": bed.token("HS256", channels={"subscribe": "news"}),
        "longer than max_token_ttl": bed.token("HS256", exp=int(time.time()) + 86401),
        "not a JWT": "garbage",
    }
    for why, token in refused.items():
        resp = await me(bed.client, token)
        assert resp.status == 401, (why, resp.status)
        body = await resp.json()
        assert body["code"] == "unauthorized", why
        assert "Traceback" not in json.dumps(body), why
        ws_resp = await bed.client.get(f"/ws?access_token={token}")
        assert ws_resp.status == 401, why
        sse_resp = await bed.client.get(f"/sse?channel=news&access_token={token}")
        assert sse_resp.status == 401, why


async def test_a_roles_claim_saying_admin_is_accepted_but_admin_is_simply_not_granted(bed):
    token = bed.token("HS256", roles=["admin", "publisher", "owner", "authenticated"])
    resp = await me(bed.client, token)
    assert resp.status == 200
    assert (await resp.json())["roles"] == ["publisher"]
    assert (await bed.client.get("/api/users", headers=bearer(token))).status == 403
    assert (await bed.client.post("/api/revocations", json={"id": "hs256:u2"}, headers=bearer(token))).status == 403
    ws = await WsClient.connect(bed.client, f"/ws?access_token={token}")
    reply = await ws.request("subscribe", channel="secret:x")  # admin only
    assert reply["op"] == "error"
    assert reply["code"] == "forbidden"
    await ws.ws.close()


async def test_a_token_without_kid_needs_an_issuer_with_exactly_one_key(bed):
    assert (await me(bed.client, bed.token("ES256"))).status == 200  # one PEM key: no kid needed
    assert (await me(bed.client, bed.token("RS256", kid=None))).status == 200  # one JWKS key
    bed.jwks.body = jwks((bed.keys["RS256"], "k1"), (rsa_key(), "k2"))
    bed.issuer("RS256").clock = lambda: time.monotonic() + 3600
    assert (await me(bed.client, bed.token("RS256", kid="k2"))).status == 401  # refetched: now two keys
    assert (await me(bed.client, bed.token("RS256", kid=None, sub="u9"))).status == 401
    assert (await me(bed.client, bed.token("RS256", kid="k1", sub="u9"))).status == 200


# --- channel grants --------------------------------------------------------------------------


async def test_channels_grants_add_exactly_their_patterns_to_the_rules(bed):
    grants = {"subscribe": ["secret:team-*", "secret:{sub}"], "publish": ["secret:team-a"]}
    token = bed.token("HS256", channels=grants)  # no roles: the rules alone would allow little
    ws = await WsClient.connect(bed.client, f"/ws?access_token={token}")
    for channel in ("secret:team-a", "secret:team-b", "secret:hs256:u1", "user:hs256:u1", "news"):
        assert (await ws.request("subscribe", channel=channel))["op"] == "ok", channel
    for channel in ("secret:other", "secret:hs256:u2", "secret:u1", "secret:team", "user:hs256:u2", "user:1"):
        reply = await ws.request("subscribe", channel=channel)
        assert (reply["op"], reply["code"]) == ("error", "forbidden"), channel
    published = await ws.request("publish", channel="secret:team-a", data=1)
    assert published["op"] == "ok"
    for channel in ("secret:team-b", "news"):  # granted to read only; "*" publishes need the publisher role
        reply = await ws.request("publish", channel=channel, data=1)
        assert reply["code"] == "forbidden", channel
    resp = await bed.client.post("/api/channels/secret:team-a/events", json={"data": 2}, headers=bearer(token))
    assert resp.status == 201
    sse = await SseClient.connect(bed.client, f"channel=secret:team-b&access_token={token}")
    sse.close()
    refused = await bed.client.get(f"/sse?channel=secret:other&access_token={token}")
    assert refused.status == 403
    await ws.ws.close()


async def test_the_owner_rule_compares_with_the_prefixed_id(bed):
    ann = bed.token("HS256")
    assert (await bed.client.get("/api/channels/user:hs256:u1/events", headers=bearer(ann))).status == 200
    assert (await bed.client.get("/api/channels/user:hs256:u2/events", headers=bearer(ann))).status == 403
    herald_user = await token_for(bed.client, "bob")
    assert (await bed.client.get("/api/channels/user:hs256:u1/events", headers=bearer(herald_user))).status == 403


# --- JWKS: kid rotation, refetch limit, failures -------------------------------------------


async def test_kid_rotation_new_key_published_old_tokens_valid_until_removed(bed):
    old_key, new = bed.keys["RS256"], rsa_key()
    iss = bed.iss("RS256")
    old_token = mint(old_key, "RS256", iss, kid="k1")
    assert (await me(bed.client, old_token)).status == 200
    assert bed.jwks.hits == 1  # the start-up fetch

    bed.jwks.body = jwks((old_key, "k1"), (new, "k2"))
    assert (await me(bed.client, mint(new, "RS256", iss, kid="k2"))).status == 200
    assert bed.jwks.hits == 2  # the unknown kid refetched once
    assert (await me(bed.client, old_token)).status == 200

    bed.jwks.body = jwks((new, "k2"))
    now = time.monotonic()
    bed.issuer("RS256").clock = lambda: now + issuers_module.REFETCH_INTERVAL + 1
    assert (await me(bed.client, mint(new, "RS256", iss, kid="k3"))).status == 401  # unknown: refetch, still unknown
    assert bed.jwks.hits == 3
    assert (await me(bed.client, old_token)).status == 401  # k1 is gone: a cached identity does not outlive it
    assert (await me(bed.client, mint(new, "RS256", iss, kid="k2", sub="u2"))).status == 200


async def test_an_unknown_kid_refetches_at_most_once_per_60_seconds(bed):
    issuer = bed.issuer("RS256")
    clock = [time.monotonic()]
    issuer.clock = lambda: clock[0]
    iss = bed.iss("RS256")
    for n in range(5):
        assert (await me(bed.client, mint(bed.keys["RS256"], "RS256", iss, kid=f"nope{n}"))).status == 401
    assert bed.jwks.hits == 2  # start-up, then one refetch
    clock[0] += issuers_module.REFETCH_INTERVAL - 1
    assert (await me(bed.client, mint(bed.keys["RS256"], "RS256", iss, kid="nope9"))).status == 401
    assert bed.jwks.hits == 2
    clock[0] += 2
    assert (await me(bed.client, mint(bed.keys["RS256"], "RS256", iss, kid="nope10"))).status == 401
    assert bed.jwks.hits == 3


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (500, b"oops"),
        (200, b"<html>not json</html>"),
        (200, b'{"keys": "no"}'),
        (200, b'{"keys": [{"kty": "RSA", "n": "garbage", "e": "AQAB", "kid": "k2"}]}'),
        (200, b"[1, 2, 3]"),
    ],
)
async def test_a_jwks_endpoint_answering_garbage_keeps_the_last_good_keys(bed, status, body, caplog):
    issuer = bed.issuer("RS256")
    good = bed.token("RS256")
    assert (await me(bed.client, good)).status == 200
    bed.jwks.status, bed.jwks.body = status, body
    issuer.clock = lambda: time.monotonic() + 3600
    with caplog.at_level(logging.WARNING, logger="herald.issuers"):
        assert (await me(bed.client, bed.token("RS256", kid="k2"))).status == 401  # refetch fails: 401, not 500
    assert bed.jwks.hits == 2
    assert any("keeping 1 last good keys" in r.getMessage() for r in caplog.records)
    assert (await me(bed.client, bed.token("RS256", sub="u2"))).status == 200


async def test_a_jwks_endpoint_that_is_down_keeps_the_last_good_keys(bed, jwks_server, caplog):
    issuer = bed.issuer("RS256")
    assert (await me(bed.client, bed.token("RS256"))).status == 200
    issuer.settings = type(issuer.settings)(**{**_fields(issuer.settings), "jwks_url": "http://127.0.0.1:9/jwks"})
    issuer.clock = lambda: time.monotonic() + 3600
    with caplog.at_level(logging.WARNING, logger="herald.issuers"):
        assert (await me(bed.client, bed.token("RS256", kid="k2"))).status == 401
    assert any("not updated from jwks_url" in r.getMessage() for r in caplog.records)
    assert (await me(bed.client, bed.token("RS256", sub="u2"))).status == 200


def _fields(settings: IssuerSettings) -> dict[str, Any]:
    return {name: getattr(settings, name) for name in IssuerSettings.__dataclass_fields__}


# --- revocation --------------------------------------------------------------------------------


async def admin_headers(client) -> dict[str, str]:
    return bearer(await token_for(client, f"admin-{uuid.uuid4().hex[:6]}", roles=("admin",)))


async def test_revocation_closes_connections_refuses_old_tokens_and_survives_a_restart(bed, make_client):
    admin = await admin_headers(bed.client)
    token = bed.token("ES256", roles=["subscriber"])
    other = bed.token("ES256", sub="u2")
    assert (await me(bed.client, token)).status == 200  # seen: cached from now on
    ws = await WsClient.connect(bed.client, f"/ws?access_token={token}")
    await ws.subscribe("news")
    bystander = await WsClient.connect(bed.client, f"/ws?access_token={other}")
    sse = await opened(await SseClient.connect(bed.client, f"channel=news&access_token={token}"))

    resp = await bed.client.post("/api/revocations", json={"id": "es256:u1"}, headers=admin)
    assert resp.status == 204, await resp.text()
    started = time.monotonic()
    assert await ws.closed_with(timeout=5) == 4403
    await wait_for(lambda: sse.response.content.at_eof(), timeout=5)
    assert time.monotonic() - started < 2
    assert (await me(bed.client, token)).status == 401
    assert (await bystander.request("ping"))["op"] == "pong"
    assert (await me(bed.client, other)).status == 200

    revoked_at = await bed.client.app[pool_key].fetchval("SELECT revoked_at FROM revocations")
    await wait_for(lambda: time.time() >= revoked_at + 1)  # a token with iat after the revocation
    fresh = bed.token("ES256")
    assert (await me(bed.client, fresh)).status == 200
    restarted = await make_client({"auth": {"issuers": [issuer_table("ES256", public_key_file=_pem_path(bed))]}})
    assert (await me(restarted, token)).status == 401  # the table, read at start-up
    assert (await me(restarted, fresh)).status == 200
    sse.close()
    await bystander.ws.close()


def _pem_path(bed: Bed) -> str:
    return bed.issuer("ES256").settings.public_key_file


async def test_revocation_needs_an_admin_and_a_string_id(bed):
    admin = await admin_headers(bed.client)
    user = bearer(await token_for(bed.client, "carl", roles=("publisher",)))
    assert (await bed.client.post("/api/revocations", json={"id": "x"})).status == 401
    assert (await bed.client.post("/api/revocations", json={"id": "x"}, headers=user)).status == 403
    for body in ({}, {"id": 5}, {"id": ""}, {"id": "x" * 513}, {"id": "a\nb"}):
        resp = await bed.client.post("/api/revocations", json=body, headers=admin)
        assert resp.status == 422, body
        assert (await resp.json())["errors"][0]["field"] == "id"
    assert (await bed.client.post("/api/revocations", json={"id": "never-seen"}, headers=admin)).status == 204


async def test_revoking_a_herald_user_refuses_their_tokens_and_closes_their_connections(bed):
    admin = await admin_headers(bed.client)
    user = await add_user(bed.client, "dora", ("subscriber",))
    token = bed.client.app[tokens_key].issue(str(user.id), user.username, user.roles)
    ws = await WsClient.connect(bed.client, f"/ws?access_token={token}")
    assert (await bed.client.post("/api/revocations", json={"id": str(user.id)}, headers=admin)).status == 204
    assert await ws.closed_with(timeout=5) == 4403
    assert (await me(bed.client, token)).status == 401


async def test_disabling_a_user_closes_their_connections_and_enabling_revives_no_old_token(bed):
    admin = await admin_headers(bed.client)
    user = await add_user(bed.client, "ed", ("subscriber",))
    token = bed.client.app[tokens_key].issue(str(user.id), user.username, user.roles)
    ws = await WsClient.connect(bed.client, f"/ws?access_token={token}")
    resp = await bed.client.patch(f"/api/users/{user.id}", json={"disabled": True}, headers=admin)
    assert resp.status == 200
    assert await ws.closed_with(timeout=5) == 4403
    assert (await bed.client.patch(f"/api/users/{user.id}", json={"disabled": False}, headers=admin)).status == 200
    bed.client.app[users_key].forget(str(user.id))
    assert (await me(bed.client, token)).status == 401
    assert (await bed.client.get(f"/ws?access_token={token}")).status == 401


# --- the cache and the database ----------------------------------------------------------------


def offline_authenticator(auth: AuthSettings) -> Authenticator:
    """No pool at all: any database round trip would fail loudly."""
    users = UserStore(None, 4)  # type: ignore[arg-type]
    return Authenticator(TokenService(auth), users, Issuers(auth.issuers), Revocations(None, 3600))  # type: ignore[arg-type]


def hs_auth(tmp_path) -> AuthSettings:
    issuer = IssuerSettings(
        issuer="https://app.example", audience=AUDIENCE, algorithms=("HS256",), id_prefix="app:", secret=SECRET
    )
    return AuthSettings(secrets_dir=str(tmp_path), issuers=(issuer,))


async def test_an_app_token_costs_no_database_round_trip(tmp_path):
    front_door = offline_authenticator(hs_auth(tmp_path))
    token = mint(SECRET, "HS256", "https://app.example")
    for _ in range(3):
        identity = await front_door.identity_for(token, via="bearer")
        assert identity.id == "app:u1"


async def test_the_token_cache_stays_bounded_and_never_serves_an_expired_or_revoked_token(tmp_path):
    front_door = offline_authenticator(hs_auth(tmp_path))
    for n in range(VERIFIED_CACHE_SIZE + 10):
        await front_door.identity_for(mint(SECRET, "HS256", "https://app.example", sub=f"u{n}"), via="bearer")
    assert len(front_door._verified) <= VERIFIED_CACHE_SIZE

    now = int(time.time())
    short = mint(SECRET, "HS256", "https://app.example", sub="short", exp=now + 1)
    await front_door.identity_for(short, via="bearer")
    await wait_for(lambda: time.time() > now + 1, timeout=5)
    with pytest.raises(Exception, match="invalid or expired"):
        await front_door.identity_for(short, via="bearer")

    kept = mint(SECRET, "HS256", "https://app.example", sub="kept", iat=now - 5)
    await front_door.identity_for(kept, via="bearer")
    front_door.revocations.remember("app:kept", now - 1, now + 3600)
    with pytest.raises(Exception, match="revoked"):
        await front_door.identity_for(kept, via="bearer")


# --- settings -------------------------------------------------------------------------------


def issuer_raw(**overrides: Any) -> dict[str, Any]:
    return {
        "issuer": "https://app.example",
        "audience": AUDIENCE,
        "algorithms": ["HS256"],
        "id_prefix": "app:",
        "secret": SECRET,
        **overrides,
    }


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"secret": "short"}, "auth.issuers[0].secret"),
        ({"secret": ""}, "auth.issuers[0]"),
        ({"allowed_roles": ["admin"]}, "auth.issuers[0].allowed_roles"),
        ({"allowed_roles": ["owner"]}, "auth.issuers[0].allowed_roles"),
        ({"algorithms": ["RS256"]}, "auth.issuers[0].algorithms"),
        ({"algorithms": ["none"]}, "auth.issuers[0].algorithms"),
        ({"algorithms": []}, "auth.issuers[0].algorithms"),
        ({"jwks_url": "https://x.example/jwks"}, "auth.issuers[0].jwks_url"),  # two sources
        ({"id_prefix": ""}, "auth.issuers[0].id_prefix"),
        ({"id_prefix": "app"}, "auth.issuers[0].id_prefix"),
        ({"issuer": "herald"}, "auth.issuers[0].issuer"),  # Herald's own iss
        ({"audience": ""}, "auth.issuers[0].audience"),
        ({"colour": "red"}, "auth.issuers[0].colour"),
        ({"max_token_ttl": 0}, "auth.issuers[0].max_token_ttl"),
    ],
)
def test_bad_issuer_settings_name_the_key(make_settings, overrides, key):
    with pytest.raises(SettingsError) as caught:
        make_settings({"auth": {"issuers": [issuer_raw(**overrides)]}})
    assert caught.value.key == key, str(caught.value)


def test_issuers_must_differ_and_key_files_must_hold_usable_keys(make_settings, tmp_path):
    second = issuer_raw(id_prefix="other:")
    with pytest.raises(SettingsError, match=r"auth.issuers\[1\].issuer"):
        make_settings({"auth": {"issuers": [issuer_raw(), second]}})
    with pytest.raises(SettingsError, match=r"auth.issuers\[1\].id_prefix"):
        make_settings({"auth": {"issuers": [issuer_raw(), issuer_raw(issuer="https://b.example")]}})
    bad_pem = tmp_path / "bad.pem"
    bad_pem.write_text("not a key")
    with pytest.raises(SettingsError, match=r"auth.issuers\[0\].public_key_file"):
        make_settings(
            {"auth": {"issuers": [issuer_raw(secret="", algorithms=["RS256"], public_key_file=str(bad_pem))]}}
        )
    ec_pem = tmp_path / "ec.pem"
    ec_pem.write_bytes(pem(new_key("ES256")))
    with pytest.raises(SettingsError, match=r"holds no key for RS256"):
        make_settings({"auth": {"issuers": [issuer_raw(secret="", algorithms=["RS256"], public_key_file=str(ec_pem))]}})
    with pytest.raises(SettingsError, match=r"auth.issuers\[0\].jwks_file"):
        make_settings(
            {"auth": {"issuers": [issuer_raw(secret="", algorithms=["RS256"], jwks_file=str(tmp_path / "no"))]}}
        )
    with pytest.raises(SettingsError, match="HERALD_AUTH_ISSUERS"):
        make_settings(environ={"HERALD_AUTH_ISSUERS": "x"})


async def test_expired_revocations_are_pruned_and_refuse_nothing(bed):
    revocations = bed.client.app[revocations_key]
    pool = bed.client.app[pool_key]
    now = int(time.time())
    await pool.execute(
        "INSERT INTO revocations (identity_id, revoked_at, expires_at)"
        " VALUES ('hs256:old', $1, $2), ('hs256:new', $1, $3)",
        now - 10,
        now - 5,
        now + 3600,
    )
    await revocations.reload()
    assert await revocations.prune() == 1
    assert await pool.fetchval("SELECT array_agg(identity_id) FROM revocations") == ["hs256:new"]
    assert (await me(bed.client, bed.token("HS256", sub="old", iat=now - 20))).status == 200
    assert (await me(bed.client, bed.token("HS256", sub="new", iat=now - 20))).status == 401


async def test_a_revocation_lasts_as_long_as_the_longest_token_any_verifier_accepts(bed):
    admin = await admin_headers(bed.client)
    assert (await bed.client.post("/api/revocations", json={"id": "hs256:u1"}, headers=admin)).status == 204
    row = await bed.client.app[pool_key].fetchrow("SELECT revoked_at, expires_at FROM revocations")
    assert row["expires_at"] - row["revoked_at"] == 86400  # max_token_ttl's default, over token_ttl (3600)


async def test_a_connection_verified_just_before_a_revocation_and_attached_after_it_is_closed(bed):
    """The race on purpose: the token passes the front door, then the revocation is recorded
    and announced (every open connection of that identity handled) before the stream attaches."""
    app = bed.client.app
    announced = asyncio.Event()
    broker, front_door = app[broker_key], app[authenticator_key]
    on_user_change, identity_for = broker.on_user_change, front_door.identity_for

    async def spy(payload: str) -> None:
        await on_user_change(payload)
        if payload.startswith("revoked "):
            announced.set()

    async def verified_then_revoked(token: str, via: str):
        identity = await identity_for(token, via)
        if via == "query":
            announced.clear()
            await app[revocations_key].revoke(identity.id)
            await asyncio.wait_for(announced.wait(), 10)
        return identity

    broker.on_user_change, front_door.identity_for = spy, verified_then_revoked
    ws = await bed.client.ws_connect(f"/ws?access_token={bed.token('HS256')}")
    message = await ws.receive(timeout=10)
    assert (message.type, message.data) == (WSMsgType.CLOSE, 4403)
    sse = await bed.client.get(f"/sse?channel=news&access_token={bed.token('HS256', sub='u2')}")
    assert sse.status == 200
    await asyncio.wait_for(sse.content.read(), 10)  # the stream ends at once
