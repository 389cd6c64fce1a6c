"""The OpenAPI document (server/web/openapi.json) kept true: well formed, complete against the
router, and matching what the server really answers.

openapi-spec-validator is not a dependency, so the document is checked structurally here,
and response bodies are checked with a small validator of the JSON Schema keywords the
document uses (a keyword it does not know fails the test rather than being ignored).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from handlers.openapi import DOCUMENT_PATH, document_handler
from server.app import create_app
from server.errors import CODES_BY_STATUS
from server.keys import static_key
from tests.helpers import PASSWORD, add_user, bearer, login, token_for

DOCUMENT: dict[str, Any] = json.loads(DOCUMENT_PATH.read_text(encoding="utf-8"))
SCHEMAS = DOCUMENT["components"]["schemas"]

HTTP_METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
STATUS_KEY = re.compile(r"[1-5](?:[0-9]{2}|XX)|default")
TEMPLATE_VARIABLE = re.compile(r"{([^{}]+)}")
PROBLEM_TYPE = "application/problem+json"
JSON_TYPES = ("application/json", PROBLEM_TYPE)
# Keywords the validator below checks, and those that only annotate.
CHECKED_KEYWORDS = {
    "$ref", "type", "const", "enum", "oneOf", "pattern", "minLength", "maxLength", "minimum", "maximum",
    "items", "minItems", "required", "properties", "additionalProperties",
}  # fmt: skip
ANNOTATIONS = {"description", "examples", "default", "format", "contentMediaType"}
RATE_LIMIT_HEADERS = ("RateLimit-Limit", "RateLimit-Remaining", "RateLimit-Reset")


# --- reading the document -------------------------------------------------------------


def resolve(ref: str) -> Any:
    assert ref.startswith("#/"), f"only local references are used: {ref}"
    node: Any = DOCUMENT
    for part in ref[2:].split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        assert isinstance(node, dict), f"{ref} does not resolve"
        assert part in node, f"{ref} does not resolve"
        node = node[part]
    return node


def deref(node: Any) -> Any:
    """A response, parameter or header object, following $ref (those take no siblings)."""
    while isinstance(node, dict) and "$ref" in node:
        node = resolve(node["$ref"])
    return node


def walk(node: Any, where: str = "#") -> Iterator[tuple[str, Any]]:
    yield where, node
    if isinstance(node, dict):
        for key, value in node.items():
            yield from walk(value, f"{where}/{key}")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from walk(value, f"{where}/{index}")


def operations() -> Iterator[tuple[str, str, dict[str, Any], dict[str, Any]]]:
    """(path, method, operation, path item) for every operation described."""
    for path, item in DOCUMENT["paths"].items():
        for method in HTTP_METHODS:
            if method in item:
                yield path, method, item[method], item


def parameters_of(item: dict[str, Any], operation: dict[str, Any]) -> list[dict[str, Any]]:
    """The effective parameters: the operation's override the path item's of the same name and place."""
    found = {(p["name"], p["in"]): p for p in map(deref, item.get("parameters", []))}
    found.update({(p["name"], p["in"]): p for p in map(deref, operation.get("parameters", []))})
    return list(found.values())


def schemas_in(schema: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """A schema and every schema nested in it (not following $ref)."""
    yield schema
    for sub in schema.get("properties", {}).values():
        yield from schemas_in(sub)
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            yield from schemas_in(schema[key])
    for sub in schema.get("oneOf", []):
        yield from schemas_in(sub)


def every_schema() -> Iterator[tuple[str, dict[str, Any]]]:
    """Every schema object of the document, with where it is."""
    for where, node in walk(DOCUMENT):
        is_component = where.startswith("#/components/schemas/") and where.count("/") == 3
        if is_component or (where.endswith("/schema") and isinstance(node, dict)):
            yield where, node


# --- a validator for the keywords the document uses ------------------------------------


def is_type(value: Any, name: str) -> bool:
    if name == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if name == "number":
        return isinstance(value, int | float) and not isinstance(value, bool)
    kinds = {"string": str, "boolean": bool, "object": dict, "array": list, "null": type(None)}
    return isinstance(value, kinds[name])


def schema_errors(value: Any, schema: dict[str, Any], where: str = "$") -> list[str]:
    if "$ref" in schema:
        rest = {k: v for k, v in schema.items() if k != "$ref"}
        return schema_errors(value, resolve(schema["$ref"]), where) + schema_errors(value, rest, where)
    types = schema.get("type")
    if types is not None:
        types = types if isinstance(types, list) else [types]
        if not any(is_type(value, t) for t in types):
            return [f"{where}: {value!r} is not of type {types}"]
    errors: list[str] = []
    if "const" in schema and value != schema["const"]:
        errors.append(f"{where}: {value!r} is not {schema['const']!r}")
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{where}: {value!r} is not one of {schema['enum']}")
    if "oneOf" in schema:
        matching = sum(not schema_errors(value, sub, where) for sub in schema["oneOf"])
        if matching != 1:
            errors.append(f"{where}: {value!r} matches {matching} of oneOf")
    if isinstance(value, str):
        if "pattern" in schema and not re.search(schema["pattern"], value):
            errors.append(f"{where}: {value!r} does not match {schema['pattern']}")
        if len(value) < schema.get("minLength", 0) or len(value) > schema.get("maxLength", len(value)):
            errors.append(f"{where}: {value!r} has the wrong length")
    if is_type(value, "number") and not schema.get("minimum", value) <= value <= schema.get("maximum", value):
        errors.append(f"{where}: {value!r} is out of range")
    if isinstance(value, list):
        if len(value) < schema.get("minItems", 0):
            errors.append(f"{where}: too few items")
        if "items" in schema:
            for index, item in enumerate(value):
                errors += schema_errors(item, schema["items"], f"{where}[{index}]")
    if isinstance(value, dict):
        errors += [f"{where}: {name} is missing" for name in schema.get("required", []) if name not in value]
        properties = schema.get("properties", {})
        for name, item in value.items():
            if name in properties:
                errors += schema_errors(item, properties[name], f"{where}.{name}")
            elif schema.get("additionalProperties") is False:
                errors.append(f"{where}: {name} is not a property")
            elif isinstance(schema.get("additionalProperties"), dict):
                errors += schema_errors(item, schema["additionalProperties"], f"{where}.{name}")
    return errors


def test_validator_catches_what_it_should():
    event = {"channel": "orders", "offset": 1, "type": "message", "data": None, "time": "2026-01-01T00:00:00.000Z"}
    assert schema_errors(event, {"$ref": "#/components/schemas/Event"}) == []
    assert schema_errors({**event, "extra": 1}, {"$ref": "#/components/schemas/Event"})
    assert schema_errors({**event, "offset": 0}, {"$ref": "#/components/schemas/Event"})
    assert schema_errors({**event, "offset": True}, {"$ref": "#/components/schemas/Event"})
    assert schema_errors({**event, "channel": "no spaces"}, {"$ref": "#/components/schemas/Event"})
    assert schema_errors({"items": [], "next": "x"}, {"$ref": "#/components/schemas/EventPage"})
    assert schema_errors({"items": [], "next": None}, {"$ref": "#/components/schemas/ChannelPage"}) == []
    assert schema_errors({"items": [], "next": "bad name"}, {"$ref": "#/components/schemas/ChannelPage"})


# --- the document is well formed -------------------------------------------------------


async def test_the_document_is_served_as_written(client):
    resp = await client.get("/api/openapi.json")
    assert resp.status == 200
    assert resp.content_type == "application/json"
    served = await resp.read()
    assert served == DOCUMENT_PATH.read_bytes()
    assert json.loads(served)["openapi"].startswith("3.1")
    for name in RATE_LIMIT_HEADERS:  # an /api/* request like any other
        assert name in resp.headers


async def test_anyone_may_read_it_but_a_bad_credential_is_still_refused(client):
    resp = await client.get("/api/openapi.json", headers=bearer("not-a-jwt"))
    assert resp.status == 401
    token = await token_for(client, "reader")
    resp = await client.get("/api/openapi.json", headers=bearer(token))
    assert resp.status == 200


async def test_the_file_is_read_when_the_app_is_built_not_per_request(tmp_path):
    copy = tmp_path / "openapi.json"
    copy.write_bytes(DOCUMENT_PATH.read_bytes())
    handler = document_handler(copy)
    copy.unlink()
    resp = await handler(make_mocked_request("GET", "/api/openapi.json"))
    assert resp.body == DOCUMENT_PATH.read_bytes()


@pytest.mark.parametrize("content", ["{not json", "[]", '{"openapi": "3.0.3"}'])
def test_a_broken_document_stops_the_app_from_being_built(tmp_path, content):
    broken = tmp_path / "openapi.json"
    broken.write_text(content)
    with pytest.raises(ValueError, match=r"."):
        document_handler(broken)


def test_top_level_fields():
    assert DOCUMENT["openapi"].startswith("3.1")
    assert DOCUMENT["info"]["title"]
    assert DOCUMENT["info"]["version"]
    assert set(DOCUMENT) <= {
        "openapi", "info", "jsonSchemaDialect", "servers", "paths", "webhooks", "components", "security",
        "tags", "externalDocs",
    }  # fmt: skip
    assert all(path.startswith("/") for path in DOCUMENT["paths"])


def test_every_ref_resolves():
    refs = [(where, node["$ref"]) for where, node in walk(DOCUMENT) if isinstance(node, dict) and "$ref" in node]
    assert len(refs) > 50
    for where, ref in refs:
        assert isinstance(ref, str), where
        resolve(ref)


def test_every_component_is_used():
    used = {node["$ref"] for _, node in walk(DOCUMENT) if isinstance(node, dict) and "$ref" in node}
    for _, _, operation, _ in operations():
        used |= {f"#/components/securitySchemes/{name}" for req in operation.get("security", []) for name in req}
    for kind, components in DOCUMENT["components"].items():
        for name in components:
            assert f"#/components/{kind}/{name}" in used, f"components/{kind}/{name} is never used"


def test_every_operation_has_responses_with_descriptions():
    for path, method, operation, _ in operations():
        responses = operation.get("responses")
        assert responses, f"{method} {path} has no responses"
        assert any(s.startswith(("1", "2", "3")) for s in responses), f"{method} {path} never succeeds"
        for status, response in responses.items():
            assert STATUS_KEY.fullmatch(status), f"{method} {path}: {status}"
            assert deref(response).get("description"), f"{method} {path} {status} has no description"


def test_operation_ids_are_unique_and_tags_declared():
    ids = [operation["operationId"] for _, _, operation, _ in operations()]
    assert len(ids) == len(set(ids))
    declared = {tag["name"] for tag in DOCUMENT["tags"]}
    for path, method, operation, _ in operations():
        assert operation.get("tags"), f"{method} {path} has no tag"
        assert set(operation["tags"]) <= declared, f"{method} {path}"


def test_path_parameters_match_the_templates():
    for path, method, operation, item in operations():
        parameters = parameters_of(item, operation)
        for parameter in parameters:
            assert parameter["in"] in ("path", "query", "header", "cookie"), parameter
            assert "schema" in parameter, f"{method} {path}: {parameter['name']} has no schema"
        declared = {p["name"] for p in parameters if p["in"] == "path"}
        assert declared == set(TEMPLATE_VARIABLE.findall(path)), f"{method} {path}: path parameters {declared}"
        assert all(p.get("required") is True for p in parameters if p["in"] == "path"), f"{method} {path}"


def test_security_names_exist_and_query_and_metrics_tokens_stay_where_they_belong():
    schemes = DOCUMENT["components"]["securitySchemes"]
    assert {"bearer", "session", "accessToken", "metricsToken"} <= set(schemes)
    assert schemes["session"] == {**schemes["session"], "in": "cookie", "name": "herald_session"}
    for path, method, operation, _ in operations():
        assert "security" in operation, f"{method} {path} does not say who may call it"
        names = {name for requirement in operation["security"] for name in requirement}
        assert names <= set(schemes), f"{method} {path}"
        assert ("accessToken" in names) == (path in ("/ws", "/sse")), f"{method} {path}"
        assert ("metricsToken" in names) == (path == "/metrics"), f"{method} {path}"


def test_errors_are_problem_documents():
    for path, method, operation, _ in operations():
        for status, response in operation["responses"].items():
            if status == "default" or status[0] in "45":
                content = deref(response)["content"]
                assert list(content) == [PROBLEM_TYPE], f"{method} {path} {status}"
                assert content[PROBLEM_TYPE]["schema"] == {"$ref": "#/components/schemas/Problem"}
            if status == "429":
                assert "Retry-After" in deref(response)["headers"]
    for name, response in DOCUMENT["components"]["responses"].items():
        if "content" in response and name != "NotModified":
            assert list(response["content"]) == [PROBLEM_TYPE], name


def test_problem_codes_are_the_servers():
    assert set(SCHEMAS["Problem"]["properties"]["code"]["enum"]) == set(CODES_BY_STATUS.values())


def test_limited_paths_document_the_rate_limit():
    for path, method, operation, _ in operations():
        limited = path.startswith("/api/") or path in ("/ws", "/sse")
        assert ("429" in operation["responses"]) == limited, f"{method} {path}"
        for status, response in operation["responses"].items():
            if status.startswith(("1", "2")):
                headers = deref(response).get("headers", {})
                assert all((name in headers) == limited for name in RATE_LIMIT_HEADERS), f"{method} {path} {status}"
    idempotency = deref({"$ref": "#/components/parameters/IdempotencyKey"})
    assert (idempotency["name"], idempotency["in"]) == ("Idempotency-Key", "header")


def test_schemas_use_only_keywords_the_tests_check():
    for where, schema in every_schema():
        for sub in schemas_in(schema):
            unknown = set(sub) - CHECKED_KEYWORDS - ANNOTATIONS
            assert not unknown, f"{where} uses {unknown}: teach schema_errors() before using them"


def test_examples_fit_their_schemas():
    checked = 0
    for where, node in walk(DOCUMENT):
        if not isinstance(node, dict):
            continue
        if "schema" in node and "example" in node:
            assert schema_errors(node["example"], node["schema"]) == [], where
            checked += 1
        if isinstance(node.get("examples"), list):  # JSON Schema examples (a parameter's are a map)
            for example in node["examples"]:
                assert schema_errors(example, node) == [], where
                checked += 1
    assert checked > 10


def test_the_required_schemas_exist():
    assert {
        "Event", "EventPage", "Channel", "ChannelPage", "User", "UserPage", "Me", "LoginRequest", "LoginResponse",
        "NewUser", "UserUpdate", "PublishRequest", "Problem",
    } <= set(SCHEMAS)  # fmt: skip
    assert set(SCHEMAS["Problem"]["required"]) == {"type", "title", "status", "detail", "code", "request_id"}
    assert "errors" in SCHEMAS["Problem"]["properties"]


# --- the document and the router agree ------------------------------------------------


def routed_operations(app: web.Application) -> set[tuple[str, str]]:
    """(path template, method) of every route, less HEAD (added to every GET) and OPTIONS
    (aiohttp-cors's preflights)."""
    found = set()
    for route in app.router.routes():
        if route.method in ("HEAD", "OPTIONS"):
            continue
        assert route.resource is not None
        found.add((route.resource.canonical, route.method.lower()))
    return found


def described_operations() -> set[tuple[str, str]]:
    return {(path, method) for path, method, _, _ in operations()}


async def test_every_route_is_described_and_every_description_is_routed(client):
    routed = routed_operations(client.app)
    assert ("/api/openapi.json", "get") in routed
    assert routed - described_operations() == set(), "routes missing from server/web/openapi.json"
    assert described_operations() - routed == set(), "server/web/openapi.json describes routes that do not exist"


async def test_cors_preflight_routes_are_not_operations(aiohttp_client, settings, make_settings):
    client = await aiohttp_client(create_app(make_settings({"cors": {"origins": ["https://app.example.com"]}})))
    assert any(route.method == "OPTIONS" for route in client.app.router.routes())
    assert routed_operations(client.app) == described_operations()


# --- what the server answers is what the document says -------------------------------


def header_errors(resp, response: dict[str, Any]) -> list[str]:
    errors = []
    for name, header in response.get("headers", {}).items():
        header = deref(header)
        if name not in resp.headers:
            errors.append(f"header {name} is missing")
            continue
        value: Any = resp.headers[name]
        if header["schema"].get("type") == "integer":
            if not value.isdigit():
                errors.append(f"header {name}: {value!r} is not an integer")
                continue
            value = int(value)
        errors += schema_errors(value, header["schema"], name)
    return errors


async def conform(resp, operation: str, status: int, *, stream: bool = False) -> Any:
    """Check that a response has the expected status and is as the document describes
    `operation` ("GET /api/me") answering it; returns the decoded body."""
    body = b"" if stream else await resp.read()
    where = f"{operation} -> {resp.status}"
    assert resp.status == status, f"{where}, expected {status}: {body[:300]!r}"
    method, template = operation.split(" ")
    responses = DOCUMENT["paths"][template][method.lower()]["responses"]
    assert str(status) in responses, f"{where} is not documented"
    response = deref(responses[str(status)])
    assert "X-Request-Id" in resp.headers, where
    assert header_errors(resp, response) == [], where
    content = response.get("content")
    if content is None:
        assert body == b"", where
        return None
    assert resp.content_type in content or "*/*" in content, f"{where}: {resp.content_type} is not documented"
    if resp.content_type not in JSON_TYPES:
        return body
    value = orjson.loads(body)
    assert schema_errors(value, content[resp.content_type]["schema"]) == [], where
    if resp.content_type == PROBLEM_TYPE:
        assert value["status"] == status, where
        assert value["code"] == CODES_BY_STATUS[status], where
        assert value["request_id"] == resp.headers["X-Request-Id"], where
    return value


def event_schema_fields() -> set[str]:
    assert set(SCHEMAS["Event"]["required"]) == set(SCHEMAS["Event"]["properties"])
    return set(SCHEMAS["Event"]["required"])


async def test_a_published_event_has_the_event_schemas_fields(client):
    token = await token_for(client, "pub", ("publisher",))
    body = {"type": "order.created", "data": {"id": 7}}
    resp = await client.post("/api/channels/orders/events", json=body, headers=bearer(token))
    event = await conform(resp, "POST /api/channels/{channel}/events", 201)
    assert set(event) == event_schema_fields()


async def test_me_has_the_me_schemas_fields(client):
    token = await token_for(client, "alice", ("publisher",))
    me = await conform(await client.get("/api/me", headers=bearer(token)), "GET /api/me", 200)
    assert set(me) == set(SCHEMAS["Me"]["required"]) == set(SCHEMAS["Me"]["properties"])


async def test_problem_fields_are_within_the_problem_schema(client):
    token = await token_for(client, "alice")
    for resp in (
        await client.get("/api/channels/orders/events?limit=0", headers=bearer(token)),  # with errors
        await client.get("/api/nope"),  # without
    ):
        problem = orjson.loads(await resp.read())
        assert resp.content_type == PROBLEM_TYPE
        assert set(SCHEMAS["Problem"]["required"]) <= set(problem) <= set(SCHEMAS["Problem"]["properties"])


async def test_operations_answer_as_described(client):
    admin = await token_for(client, "root", ("admin",))
    subscriber = await token_for(client, "sub")
    await conform(await client.get("/healthz"), "GET /healthz", 200)
    await conform(await client.get("/healthz", headers=bearer("not-a-jwt")), "GET /healthz", 401)
    await conform(await client.get("/readyz"), "GET /readyz", 200)
    await conform(await client.get("/metrics"), "GET /metrics", 401)
    await conform(await client.get("/metrics", headers=bearer(subscriber)), "GET /metrics", 403)
    text = await conform(await client.get("/metrics", headers=bearer(admin)), "GET /metrics", 200)
    assert b"herald_http_requests_total" in text
    document = await conform(await client.get("/api/openapi.json"), "GET /api/openapi.json", 200)
    assert document == DOCUMENT


async def test_auth_answers_as_described(client):
    await add_user(client, "alice", ("publisher",))
    login_op, me_op, logout_op = "POST /api/auth/login", "GET /api/me", "POST /api/auth/logout"
    path = "/api/auth/login"
    await conform(await login(client, "alice", "wrong password"), login_op, 401)
    await conform(await client.post(path, json={"username": "alice"}), login_op, 422)
    await conform(await client.post(path, data=b"{", headers={"Content-Type": "application/json"}), login_op, 400)
    await conform(await client.post(path, data=b"{}", headers={"Content-Type": "text/plain"}), login_op, 415)
    await conform(await client.post(path, json={"username": "x" * 70000, "password": "y"}), login_op, 413)
    await conform(await client.get("/api/me"), me_op, 401)
    await conform(await client.post("/api/auth/logout"), logout_op, 401)

    body = await conform(await login(client, "alice", PASSWORD), login_op, 200)
    assert body["user"]["username"] == "alice"
    assert "herald_session" in client.session.cookie_jar.filter_cookies(client.make_url("/"))
    assert await conform(await client.get("/api/me"), me_op, 200) == body["user"]  # by the cookie
    assert await conform(await client.get("/api/me", headers=bearer(body["access_token"])), me_op, 200) == body["user"]
    await conform(await client.post("/api/auth/logout"), logout_op, 403)  # a cookie without an Origin
    origin = str(client.make_url("/")).rstrip("/")
    await conform(await client.post("/api/auth/logout", headers={"Origin": origin}), logout_op, 204)


async def test_users_answer_as_described(client):
    admin = bearer(await token_for(client, "root", ("admin",)))
    subscriber = bearer(await token_for(client, "sub"))
    list_op, create_op = "GET /api/users", "POST /api/users"
    patch_op, delete_op = "PATCH /api/users/{id}", "DELETE /api/users/{id}"
    page = await conform(await client.get("/api/users", headers=admin), list_op, 200)
    assert [u["username"] for u in page["items"]] == ["root", "sub"]
    await conform(await client.get("/api/users", params={"limit": "0"}, headers=admin), list_op, 422)
    await conform(await client.get("/api/users", headers=subscriber), list_op, 403)
    await conform(await client.get("/api/users"), list_op, 401)

    new = {"username": "bob", "password": "a long passphrase", "roles": ["publisher"]}
    bob = await conform(await client.post("/api/users", json=new, headers=admin), create_op, 201)
    await conform(await client.post("/api/users", json=new, headers=admin), create_op, 409)
    await conform(await client.post("/api/users", json={**new, "password": "short"}, headers=admin), create_op, 422)
    await conform(await client.post("/api/users", json=new, headers=subscriber), create_op, 403)

    bob_path = f"/api/users/{bob['id']}"
    patched = await conform(await client.patch(bob_path, json={"disabled": True}, headers=admin), patch_op, 200)
    assert patched["disabled"] is True
    await conform(await client.patch(bob_path, json={"roles": "admin"}, headers=admin), patch_op, 422)
    await conform(await client.patch("/api/users/999", json={}, headers=admin), patch_op, 404)
    await conform(await client.delete(bob_path, headers=admin), delete_op, 204)
    await conform(await client.delete(bob_path, headers=admin), delete_op, 404)


async def test_channels_and_events_answer_as_described(client):
    publisher = bearer(await token_for(client, "pub", ("publisher",)))
    subscriber = bearer(await token_for(client, "sub"))
    publish_op, history_op = "POST /api/channels/{channel}/events", "GET /api/channels/{channel}/events"
    list_op = "GET /api/channels"
    orders = "/api/channels/orders/events"
    keyed = {**publisher, "Idempotency-Key": "order-7"}
    body = {"type": "order.created", "data": {"id": 7}}
    first = await conform(await client.post(orders, json=body, headers=keyed), publish_op, 201)
    assert await conform(await client.post(orders, json=body, headers=keyed), publish_op, 200) == first
    await conform(await client.post(orders, json={"data": 8}, headers=keyed), publish_op, 409)
    await conform(await client.post(orders, json={"data": 1, "x": 2}, headers=publisher), publish_op, 422)
    await conform(await client.post(orders, json=body, headers=subscriber), publish_op, 403)
    await conform(await client.post(orders, json=body), publish_op, 401)
    await conform(await client.post("/api/channels/bad!name/events", json=body, headers=publisher), publish_op, 422)
    await conform(await client.post(orders, json={"data": "x" * 70000}, headers=publisher), publish_op, 413)

    page = await conform(await client.get(orders, params={"limit": "1"}, headers=subscriber), history_op, 200)
    assert page == {"items": [first], "next": 1}
    await conform(await client.get(orders, params={"after": "-1"}, headers=subscriber), history_op, 422)
    await conform(await client.get("/api/channels/secret:x/events", headers=subscriber), history_op, 403)
    await conform(await client.get(orders), history_op, 401)

    channels = await conform(await client.get("/api/channels", headers=subscriber), list_op, 200)
    assert channels == {"items": [{"name": "orders", "last_offset": 1, "subscribers": 0}], "next": None}
    await conform(await client.get("/api/channels", params={"after": "bad name"}, headers=subscriber), list_op, 422)
    await conform(await client.get("/api/channels"), list_op, 401)


async def test_realtime_endpoints_answer_as_described(client):
    token = await token_for(client, "sub")
    ws = await client.ws_connect("/ws", headers=bearer(token))
    await conform(ws._response, "GET /ws", 101, stream=True)  # the handshake's response
    await ws.close()
    await conform(await client.get("/ws"), "GET /ws", 400)  # not an upgrade
    await conform(await client.get("/ws", params={"access_token": "not-a-jwt"}), "GET /ws", 401)

    stream = await client.get("/sse", params={"channel": "public:news", "access_token": token})
    await conform(stream, "GET /sse", 200, stream=True)
    assert await stream.content.readuntil(b"\n\n") == b"retry: 3000\n\n"
    stream.close()
    await conform(await client.get("/sse"), "GET /sse", 422)  # no channel
    await conform(await client.get("/sse", params={"channel": "orders"}), "GET /sse", 401)
    await conform(await client.get("/sse", params={"channel": "secret:x"}, headers=bearer(token)), "GET /sse", 403)

    await login(client, "sub", PASSWORD)
    upgrade = {"Upgrade": "websocket", "Connection": "Upgrade"}
    await conform(await client.get("/ws", headers=upgrade), "GET /ws", 403)  # a cookie without an Origin


async def test_dashboard_answers_as_described(client):
    page = await client.get("/")
    await conform(page, "GET /", 200)
    await conform(await client.get("/", headers={"If-None-Match": page.headers["ETag"]}), "GET /", 304)
    await conform(await client.get("/", headers=bearer("not-a-jwt")), "GET /", 401)
    await conform(await client.get("/static/herald.js"), "GET /static/{name}", 200)
    fingerprinted = next(name for name in client.app[static_key].fingerprinted if name.startswith("herald."))
    resp = await client.get(f"/static/{fingerprinted}")
    await conform(resp, "GET /static/{name}", 200)
    assert "immutable" in resp.headers["Cache-Control"]
    await conform(await client.get("/static/.hidden"), "GET /static/{name}", 404)


async def test_rate_limited_answers_are_described(aiohttp_client, settings, make_settings):
    client = await aiohttp_client(create_app(make_settings({"limits": {"rate": 0.01, "burst": 1}})))
    await conform(await client.get("/api/openapi.json"), "GET /api/openapi.json", 200)
    await conform(await client.get("/api/openapi.json"), "GET /api/openapi.json", 429)
    await conform(await client.get("/sse", params={"channel": "public:news"}), "GET /sse", 429)
