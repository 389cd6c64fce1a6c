"""User administration over HTTP (PROTOCOL §2 users table, §10 §2), on a real PostgreSQL."""

from __future__ import annotations

import time

import pytest

from server.keys import pool_key, tokens_key, users_key
from tests.conftest import truncate_all, wait_for

PASSWORD = "correct horse"


@pytest.fixture
async def settings(make_settings, database_url):
    """The conftest settings, with a login limit these tests never reach (they log in a lot)."""
    await truncate_all(database_url)
    return make_settings({"limits": {"login_rate": 10_000}})


async def make_user(client, username: str, *roles: str, password: str = PASSWORD):
    return await client.app[users_key].create(username, password, roles)


async def login(client, username: str, password: str = PASSWORD) -> str:
    resp = await client.post("/api/auth/login", json={"username": username, "password": password})
    assert resp.status == 200, await resp.text()
    token = (await resp.json())["access_token"]
    # Only the bearer token is used from here on: no session cookie rides along.
    client.session.cookie_jar.clear()
    return token


async def login_status(client, username: str, password: str = PASSWORD) -> int:
    resp = await client.post("/api/auth/login", json={"username": username, "password": password})
    client.session.cookie_jar.clear()
    return resp.status


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
async def admin(client) -> dict[str, str]:
    await make_user(client, "root", "admin")
    return bearer(await login(client, "root"))


async def problem(resp, status: int, code: str) -> dict:
    assert resp.status == status, await resp.text()
    assert resp.content_type == "application/problem+json"
    body = await resp.json(content_type=None)
    assert body["status"] == status
    assert body["code"] == code
    return body


def assert_no_hash(text: str) -> None:
    assert "hash" not in text.lower()
    assert "$2b$" not in text
    assert PASSWORD not in text


async def test_admin_creates_a_user(client, admin):
    resp = await client.post(
        "/api/users", json={"username": "carol", "password": PASSWORD, "roles": ["publisher", "ops"]}, headers=admin
    )
    assert resp.status == 201, await resp.text()
    assert resp.content_type == "application/json"
    text = await resp.text()
    assert_no_hash(text)
    body = await resp.json()
    assert isinstance(body["id"], str)
    assert body["id"].isdigit()
    assert body["username"] == "carol"
    assert body["roles"] == ["publisher", "ops"]
    token = await login(client, "carol")
    me = await client.get("/api/me", headers=bearer(token))
    assert await me.json() == {"id": body["id"], "username": "carol", "roles": ["ops", "publisher"]}


async def test_roles_default_to_none(client, admin):
    resp = await client.post("/api/users", json={"username": "plain", "password": PASSWORD}, headers=admin)
    assert resp.status == 201
    assert (await resp.json())["roles"] == []


@pytest.mark.parametrize("taken", ["bob", "Bob", "BOB"])
async def test_a_taken_username_is_409_case_insensitively(client, admin, taken):
    await make_user(client, "bob")
    resp = await client.post("/api/users", json={"username": taken, "password": PASSWORD}, headers=admin)
    await problem(resp, 409, "conflict")
    rows = await client.app[pool_key].fetchval("SELECT count(*) FROM users WHERE lower(username) = 'bob'")
    assert rows == 1


@pytest.mark.parametrize(
    "password",
    ["a" * 8, "a" * 72, "é" * 36, "pass word", "🔑" * 18],  # 8 chars; 72 bytes; 72 bytes; space ok; 72 bytes
)
async def test_passwords_within_the_limits_are_accepted(client, admin, password):
    resp = await client.post("/api/users", json={"username": "dora", "password": password}, headers=admin)
    assert resp.status == 201, await resp.text()
    assert await login_status(client, "dora", password) == 200


@pytest.mark.parametrize(
    "password",
    ["a" * 7, "", "é" * 7, "a" * 73, "é" * 37, "🔑" * 19, "a" * 10_000],  # short; or over 72 bytes
)
async def test_a_password_too_short_or_over_72_bytes_is_422_naming_the_field(client, admin, password):
    resp = await client.post("/api/users", json={"username": "dora", "password": password}, headers=admin)
    body = await problem(resp, 422, "validation_error")
    assert [e["field"] for e in body["errors"]] == ["password"]
    assert await client.app[pool_key].fetchval("SELECT count(*) FROM users") == 1  # only the admin


@pytest.mark.parametrize(
    ("fields", "bad"),
    [
        ({"username": ""}, "username"),
        ({"username": "has space"}, "username"),
        ({"username": "a/b"}, "username"),
        ({"username": "a" * 65}, "username"),
        ({"username": "é"}, "username"),
        ({"username": 5}, "username"),
        ({"username": None}, "username"),
        ({"password": 12345678}, "password"),
        ({"password": None}, "password"),
        ({"roles": "admin"}, "roles"),
        ({"roles": {"admin": True}}, "roles"),
        ({"roles": ["owner"]}, "roles"),
        ({"roles": ["publisher", "anonymous"]}, "roles"),
        ({"roles": ["authenticated"]}, "roles"),
        ({"roles": [5]}, "roles"),
        ({"roles": [""]}, "roles"),
        ({"roles": ["has space"]}, "roles"),
    ],
)
async def test_a_bad_field_is_422_naming_it(client, admin, fields, bad):
    body = {"username": "erin", "password": PASSWORD, "roles": ["publisher"]} | fields
    resp = await client.post("/api/users", json=body, headers=admin)
    problem_body = await problem(resp, 422, "validation_error")
    assert [e["field"] for e in problem_body["errors"]] == [bad]


async def test_every_bad_field_is_named_at_once(client, admin):
    resp = await client.post("/api/users", json={"username": "", "password": "short", "roles": "x"}, headers=admin)
    body = await problem(resp, 422, "validation_error")
    assert [e["field"] for e in body["errors"]] == ["username", "password", "roles"]


@pytest.mark.parametrize(
    ("method", "path", "json"),
    [
        ("POST", "/api/users", {"username": "mallory", "password": PASSWORD, "roles": ["admin"]}),
        ("GET", "/api/users", None),
        ("PATCH", "/api/users/1", {"disabled": True}),
        ("DELETE", "/api/users/1", None),
    ],
)
async def test_user_administration_is_for_admins_only(client, method, path, json):
    await make_user(client, "root", "admin")  # id 1
    await make_user(client, "pub", "publisher", "subscriber")
    resp = await client.request(method, path, json=json)
    await problem(resp, 401, "unauthorized")
    assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    token = await login(client, "pub")
    resp = await client.request(method, path, json=json, headers=bearer(token))
    await problem(resp, 403, "forbidden")
    usernames = await client.app[pool_key].fetch("SELECT username, disabled FROM users ORDER BY id")
    assert [(r["username"], r["disabled"]) for r in usernames] == [("root", False), ("pub", False)]


async def test_list_users_pages_through_everyone_without_hashes(client, admin):
    for name in ("u1", "u2", "u3", "u4"):
        await make_user(client, name, "subscriber")
    seen, pages, url = [], [], "/api/users?limit=2"
    while url:
        resp = await client.get(url, headers=admin)
        assert resp.status == 200, await resp.text()
        text = await resp.text()
        assert_no_hash(text)
        page = await resp.json()
        assert set(page) == {"items", "next"}
        pages.append(len(page["items"]))
        for item in page["items"]:
            assert not any("hash" in key or "password" in key for key in item)
            assert isinstance(item["id"], str)
        seen += page["items"]
        url = f"/api/users?limit=2&after={page['next']}" if page["next"] is not None else None
        assert len(pages) <= 4
    assert pages == [2, 2, 1]
    assert [u["username"] for u in seen] == ["root", "u1", "u2", "u3", "u4"]
    assert len({u["id"] for u in seen}) == 5
    assert seen[1]["roles"] == ["subscriber"]


async def test_list_users_default_page_holds_everyone_and_ends(client, admin):
    await make_user(client, "u1")
    page = await (await client.get("/api/users", headers=admin)).json()
    assert [u["username"] for u in page["items"]] == ["root", "u1"]
    assert page["next"] is None


@pytest.mark.parametrize("query", ["limit=0", "limit=1001", "limit=-1", "after=-1"])
async def test_list_users_refuses_bad_paging_with_422(client, admin, query):
    resp = await client.get(f"/api/users?{query}", headers=admin)
    body = await problem(resp, 422, "validation_error")
    assert body["errors"][0]["field"] == query.split("=")[0]


@pytest.mark.parametrize("query", ["limit=abc", "after=abc", "limit=0x10", "limit=%00", "after=1.0"])
async def test_list_users_refuses_paging_values_that_are_not_integers_with_400(client, admin, query):
    resp = await client.get(f"/api/users?{query}", headers=admin)
    body = await problem(resp, 400, "bad_request")
    assert body["errors"][0]["field"] == query.split("=")[0]


@pytest.mark.parametrize("limit", ["1", "1000"])
async def test_list_users_accepts_limits_at_the_bounds(client, admin, limit):
    resp = await client.get(f"/api/users?limit={limit}", headers=admin)
    assert resp.status == 200
    assert len((await resp.json())["items"]) == 1


async def test_deleting_a_user_ends_their_tokens_and_logins(client, admin):
    dave = await make_user(client, "dave", "publisher")
    token = await login(client, "dave")
    assert (await client.get("/api/me", headers=bearer(token))).status == 200
    resp = await client.delete(f"/api/users/{dave.id}", headers=admin)
    assert resp.status == 204
    assert await resp.read() == b""
    resp = await client.get("/api/me", headers=bearer(token))
    await problem(resp, 401, "unauthorized")
    assert await login_status(client, "dave") == 401
    assert await client.app[pool_key].fetchval("SELECT count(*) FROM users WHERE id = $1", dave.id) == 0
    # Deleting again: gone. The name is free again, and the new dave is a different user.
    await problem(await client.delete(f"/api/users/{dave.id}", headers=admin), 404, "not_found")
    resp = await client.post("/api/users", json={"username": "dave", "password": PASSWORD}, headers=admin)
    assert resp.status == 201
    assert (await resp.json())["id"] != str(dave.id)
    await problem(await client.get("/api/me", headers=bearer(token)), 401, "unauthorized")


# "%C2%B2" is U+00B2 (superscript two) and "%D9%A1" U+0661 (Arabic-Indic one): str.isdigit() says
# yes to both, but neither is an id (int() of the first raises; the second must not reach the admin, id 1).
@pytest.mark.parametrize("user_id", ["999999", "0", "abc", "-1", "1" * 30, "%C2%B2", "%D9%A1", "1.0", "%201"])
async def test_deleting_or_patching_a_missing_user_is_404(client, admin, user_id):
    await problem(await client.delete(f"/api/users/{user_id}", headers=admin), 404, "not_found")
    resp = await client.patch(f"/api/users/{user_id}", json={"disabled": True}, headers=admin)
    await problem(resp, 404, "not_found")
    assert (await client.get("/api/me", headers=admin)).status == 200  # the admin (id 1) is untouched


@pytest.mark.parametrize("sub", ["999999", "0", "abc", "\u00b2", "\u0661", " 1", "1" * 30])
async def test_a_valid_token_for_no_existing_user_is_401(client, admin, sub):
    token = client.app[tokens_key].issue(sub, "ghost", ["admin"])
    resp = await client.get("/api/me", headers=bearer(token))
    await problem(resp, 401, "unauthorized")


async def test_disabling_a_user_stops_their_token_and_login_and_enabling_restores_only_login(client, admin):
    erin = await make_user(client, "erin", "subscriber")
    token = await login(client, "erin")
    resp = await client.patch(f"/api/users/{erin.id}", json={"disabled": True}, headers=admin)
    assert resp.status == 200, await resp.text()
    body = await resp.json()
    assert body["disabled"] is True
    assert body["roles"] == ["subscriber"]
    assert_no_hash(await resp.text())
    await problem(await client.get("/api/me", headers=bearer(token)), 401, "unauthorized")
    assert await login_status(client, "erin") == 401
    resp = await client.patch(f"/api/users/{erin.id}", json={"disabled": False}, headers=admin)
    assert resp.status == 200
    assert (await resp.json())["disabled"] is False
    # Re-enabling revives no token issued before the disable (it was a revocation, PROTOCOL §15 §13).
    await problem(await client.get("/api/me", headers=bearer(token)), 401, "unauthorized")
    revoked_at = await client.app[pool_key].fetchval(
        "SELECT revoked_at FROM revocations WHERE identity_id = $1", str(erin.id)
    )
    await wait_for(lambda: time.time() >= revoked_at + 1)  # iat at or before it (whole seconds) is refused
    fresh = await login(client, "erin")
    me = await client.get("/api/me", headers=bearer(fresh))
    assert (await me.json())["username"] == "erin"


@pytest.mark.parametrize(("body", "field"), [({"disabled": "yes"}, "disabled"), ({"roles": ["owner"]}, "roles")])
async def test_patch_refuses_bad_fields_with_422(client, admin, body, field):
    erin = await make_user(client, "erin")
    resp = await client.patch(f"/api/users/{erin.id}", json=body, headers=admin)
    problem_body = await problem(resp, 422, "validation_error")
    assert problem_body["errors"][0]["field"] == field


async def test_passwords_are_stored_as_bcrypt_hashes_at_the_configured_cost(client, admin, settings):
    assert settings.auth.bcrypt_rounds == 4
    resp = await client.post("/api/users", json={"username": "fay", "password": PASSWORD}, headers=admin)
    assert resp.status == 201
    rows = await client.app[pool_key].fetch("SELECT username, password_hash FROM users ORDER BY id")
    assert [r["username"] for r in rows] == ["root", "fay"]
    for row in rows:
        stored = row["password_hash"]
        assert stored.startswith("$2b$")
        assert int(stored.split("$")[2]) == settings.auth.bcrypt_rounds
        assert PASSWORD not in stored
    assert rows[0]["password_hash"] != rows[1]["password_hash"]  # salted
