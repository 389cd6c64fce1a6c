"""PROTOCOL §2: login, tokens, sessions, and the attacks tokens must withstand."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import statistics
import time

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from server.app import create_app
from server.keys import tokens_key, users_key
from tests.helpers import PASSWORD, add_user, login


def origin_of(client) -> str:
    url = client.make_url("/")
    return f"{url.scheme}://{url.host}:{url.port}"


def claims_for(client, user_id: str, **changes):
    settings = client.app[tokens_key].settings
    now = int(time.time())
    claims = {
        "sub": user_id,
        "name": "x",
        "roles": [],
        "iat": now,
        "exp": now + 60,
        "iss": settings.jwt_issuer,
        "aud": settings.jwt_audience,
        "jti": "j1",
    }
    claims.update(changes)
    return {k: v for k, v in claims.items() if v is not None}


def secret_of(client) -> str:
    return client.app[tokens_key]._signing_key


async def me_with(client, token: str):
    return await client.get("/api/me", headers={"Authorization": f"Bearer {token}"})


# login


async def test_login_returns_a_token_and_an_httponly_lax_session_cookie(client):
    user = await add_user(client)
    resp = await login(client)
    assert resp.status == 200
    body = await resp.json()
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] == 3600
    assert body["user"] == {"id": str(user.id), "username": "alice", "roles": ["subscriber"]}
    cookie = resp.cookies["herald_session"]
    assert cookie["httponly"]
    assert cookie["samesite"] == "Lax"
    assert not cookie["secure"]
    me = await me_with(client, body["access_token"])
    assert await me.json() == {"id": str(user.id), "username": "alice", "roles": ["subscriber"]}


async def test_session_cookie_is_secure_under_tls_from_a_trusted_proxy(aiohttp_client, make_settings, settings):
    client = await aiohttp_client(create_app(make_settings({"server": {"trusted_proxies": ["127.0.0.1", "::1"]}})))
    await add_user(client)
    resp = await client.post(
        "/api/auth/login",
        json={"username": "alice", "password": PASSWORD},
        headers={"X-Forwarded-Proto": "https"},
    )
    assert resp.status == 200
    assert "Secure" in resp.headers["Set-Cookie"]


async def test_unknown_user_and_wrong_password_get_the_same_401(client):
    await add_user(client)
    a = await login(client, "nobody")
    b = await login(client, "alice", "wrong password!")
    assert a.status == b.status == 401
    body_a, body_b = await a.json(content_type=None), await b.json(content_type=None)
    body_a.pop("request_id"), body_b.pop("request_id")
    assert body_a == body_b
    assert a.headers["WWW-Authenticate"] == b.headers["WWW-Authenticate"]
    assert "herald_session" not in a.cookies


async def test_unknown_user_costs_a_bcrypt_check_like_a_wrong_password(aiohttp_client, make_settings, settings):
    """Without the dummy hash an unknown name answers ~50x faster: a user-enumeration oracle."""
    client = await aiohttp_client(create_app(make_settings({"auth": {"bcrypt_rounds": 10}})))
    await add_user(client)
    await login(client, "nobody")  # the dummy hash is made once, lazily

    async def median_seconds(username, password):
        times = []
        for _ in range(3):
            start = time.perf_counter()
            assert (await login(client, username, password)).status == 401
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    unknown = await median_seconds("nobody", PASSWORD)
    wrong = await median_seconds("alice", "wrong password!")
    assert unknown > wrong * 0.5


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"username": "alice"},
        {"password": PASSWORD},
        {"username": 1, "password": PASSWORD},
        {"username": "a", "password": None},
    ],
)
async def test_login_with_a_missing_or_non_string_field_is_422(client, body):
    resp = await client.post("/api/auth/login", json=body)
    assert resp.status == 422
    assert (await resp.json(content_type=None))["errors"][0]["field"] in ("username", "password")


async def test_login_with_a_password_over_72_bytes_is_401_not_500(client):
    await add_user(client)
    resp = await login(client, "alice", PASSWORD + "x" * 80)
    assert resp.status == 401
    # bcrypt only reads 72 bytes: a longer password sharing them must not log in either.
    await add_user(client, "bob", password="b" * 72)
    assert (await login(client, "bob", "b" * 72)).status == 200
    assert (await login(client, "bob", "b" * 73)).status == 401


async def test_username_is_case_insensitive_at_login(client):
    await add_user(client, "Alice")
    assert (await login(client, "aLICE")).status == 200


# tokens


async def test_a_token_minted_by_a_backend_with_the_secret_is_accepted(client):
    user = await add_user(client)
    token = jwt.encode(claims_for(client, str(user.id)), secret_of(client), algorithm="HS256")
    assert (await me_with(client, token)).status == 200


@pytest.mark.parametrize(
    ("name", "changes"),
    [
        ("expired", {"exp": int(time.time()) - 10}),
        ("not yet valid", {"nbf": int(time.time()) + 300}),
        ("issued in the future", {"iat": int(time.time()) + 300}),
        ("wrong audience", {"aud": "someone-else"}),
        ("wrong issuer", {"iss": "someone-else"}),
        ("missing exp", {"exp": None}),
        ("missing iss", {"iss": None}),
        ("missing aud", {"aud": None}),
        ("unknown user", {"sub": "999999"}),
        ("non-numeric sub", {"sub": "alice"}),
    ],
)
async def test_bad_claims_are_401(client, name, changes):
    user = await add_user(client)
    claims = claims_for(client, str(user.id), **changes)
    token = jwt.encode(claims, secret_of(client), algorithm="HS256")
    resp = await me_with(client, token)
    assert resp.status == 401, name
    assert resp.headers["WWW-Authenticate"].startswith("Bearer")


async def test_wrong_key_alg_none_and_other_algorithms_are_401(client):
    user = await add_user(client)
    claims = claims_for(client, str(user.id))
    forged = [
        jwt.encode(claims, "not-the-secret-but-long-enough-to-pass-hmac-checks", algorithm="HS256"),
        jwt.encode(claims, None, algorithm="none"),
        jwt.encode(claims, secret_of(client), algorithm="HS512"),
        "not.a.jwt",
        "",
    ]
    for token in forged:
        resp = await client.get("/api/me", headers={"Authorization": f"Bearer {token}"})
        assert resp.status == 401, token


@pytest.mark.parametrize("header", ["Basic YWxpY2U6cHc=", "Bearer", "Token abc", "bearer  "])
async def test_malformed_authorization_headers_are_401(client, header):
    resp = await client.get("/api/me", headers={"Authorization": header})
    assert resp.status == 401


async def test_an_invalid_credential_is_401_even_where_anonymous_is_allowed(client):
    resp = await client.get("/healthz", headers={"Authorization": "Bearer nope"})
    assert resp.status == 401
    assert resp.content_type == "application/problem+json"


async def test_access_token_in_the_query_is_ignored_outside_ws_and_sse(client):
    await add_user(client)
    token = (await (await login(client)).json())["access_token"]
    client.session.cookie_jar.clear()
    resp = await client.get(f"/api/me?access_token={token}")
    assert resp.status == 401


async def test_no_credentials_is_401_on_authenticated_endpoints(client):
    resp = await client.get("/api/me")
    assert resp.status == 401
    assert resp.headers["WWW-Authenticate"].startswith("Bearer")


async def test_cors_headers_on_error_responses_to_an_allowed_origin(aiohttp_client, make_settings, settings):
    client = await aiohttp_client(create_app(make_settings({"cors": {"origins": ["https://app.example"]}})))
    resp = await client.get("/api/me", headers={"Origin": "https://app.example"})
    assert resp.status == 401
    assert resp.headers["Access-Control-Allow-Origin"] == "https://app.example"


# asymmetric algorithms


def key_files(tmp_path, algorithm):
    if algorithm == "EdDSA":
        private = ed25519.Ed25519PrivateKey.generate()
    else:
        private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    priv = tmp_path / "key.pem"
    pub = tmp_path / "key.pub.pem"
    priv.write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    pub.write_bytes(
        private.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return str(priv), str(pub)


@pytest.mark.parametrize("algorithm", ["RS256", "EdDSA"])
async def test_asymmetric_algorithms_issue_and_verify_and_refuse_hmac_confusion(
    aiohttp_client, make_settings, settings, tmp_path, algorithm
):
    priv, pub = key_files(tmp_path, algorithm)
    auth = {"jwt_algorithm": algorithm, "jwt_private_key_file": priv, "jwt_public_key_file": pub}
    client = await aiohttp_client(create_app(make_settings({"auth": auth})))
    user = await add_user(client)
    token = (await (await login(client)).json())["access_token"]
    assert jwt.get_unverified_header(token)["alg"] == algorithm
    client.session.cookie_jar.clear()
    assert (await me_with(client, token)).status == 200
    # The classic confusion attack: HS256 signed with the public key as the HMAC secret.
    with open(pub, "rb") as f:
        forged = hmac_signed(claims_for(client, str(user.id)), f.read())
    assert (await me_with(client, forged)).status == 401


def hmac_signed(claims: dict, key: bytes) -> str:
    """An HS256 JWT built by hand: pyjwt itself refuses a PEM key as an HMAC secret."""

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    signing_input = f"{b64(json.dumps({'alg': 'HS256', 'typ': 'JWT'}).encode())}.{b64(json.dumps(claims).encode())}"
    signature = hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(signature)}"


# secrets


async def test_generated_secrets_are_0600_and_shared_by_apps_using_the_same_dir(
    aiohttp_client, make_settings, settings, tmp_path
):
    first = await aiohttp_client(create_app(settings))
    secrets_dir = settings.auth.secrets_dir
    for name in ("jwt_secret", "session_secret"):
        mode = os.stat(os.path.join(secrets_dir, name)).st_mode & 0o777
        assert mode == 0o600, name
    await add_user(first)
    token = (await (await login(first)).json())["access_token"]
    second = await aiohttp_client(create_app(make_settings()))
    assert (await me_with(second, token)).status == 200


# browser sessions


async def test_the_session_cookie_authenticates_and_logout_ends_it_for_good(client):
    user = await add_user(client)
    await login(client)
    me = await client.get("/api/me")
    assert (await me.json())["id"] == str(user.id)
    saved = {c.key: c.value for c in client.session.cookie_jar}
    resp = await client.post("/api/auth/logout", headers={"Origin": origin_of(client)})
    assert resp.status == 204
    assert (await client.get("/api/me")).status == 401
    # A saved copy of the old cookie no longer authenticates.
    client.session.cookie_jar.update_cookies(saved)
    assert (await client.get("/api/me")).status == 401


async def test_cookie_authenticated_unsafe_requests_need_a_trusted_origin(aiohttp_client, make_settings, settings):
    client = await aiohttp_client(create_app(make_settings({"cors": {"origins": ["https://app.example"]}})))
    await add_user(client, "root", roles=("admin",))
    await login(client, "root")
    new_user = {"username": "bob", "password": "password123", "roles": []}
    for headers in ({}, {"Origin": "https://evil.example"}, {"Origin": "null"}):
        resp = await client.post("/api/users", json=new_user, headers=headers)
        assert resp.status == 403, headers
        assert (await resp.json(content_type=None))["code"] == "forbidden"
    assert (await client.post("/api/auth/logout")).status == 403
    resp = await client.post("/api/users", json=new_user, headers={"Origin": "https://app.example"})
    assert resp.status == 201
    resp = await client.post(
        "/api/users", json={**new_user, "username": "carol"}, headers={"Origin": origin_of(client)}
    )
    assert resp.status == 201
    # Safe methods need no Origin.
    assert (await client.get("/api/users")).status == 200


async def test_bearer_requests_need_no_origin(client):
    await add_user(client, "root", roles=("admin",))
    token = (await (await login(client, "root")).json())["access_token"]
    client.session.cookie_jar.clear()
    resp = await client.post(
        "/api/users",
        json={"username": "bob", "password": "password123"},
        headers={"Authorization": f"Bearer {token}", "Origin": "https://evil.example"},
    )
    assert resp.status == 201


async def test_a_disabled_users_session_stops_working(client):
    user = await add_user(client)
    await login(client)
    assert (await client.get("/api/me")).status == 200
    await client.app[users_key].update(user.id, disabled=True)
    assert (await client.get("/api/me")).status == 401
