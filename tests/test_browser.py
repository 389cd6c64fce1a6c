"""The dashboard and herald.js in a real headless Chromium, against a real server on a real port.

Playwright's async API runs inside the test's event loop, beside the aiohttp test server, so
a test can drive the page, publish over REST and cut connections from the server side.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from server.app import create_app
from server.keys import hub_key, store_key, tokens_key
from tests.conftest import TEST_CHANNEL_RULES, deep_merge, wait_for
from tests.helpers import PASSWORD, WsClient, add_user, publish, token_for

async_api = pytest.importorskip("playwright.async_api", reason="playwright is not installed")

CHROMIUM = shutil.which("chromium")
pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(CHROMIUM is None, reason="no `chromium` on PATH (Playwright cannot download browsers here)"),
]

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "tests" / "artifacts"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
TIMEOUT_MS = 10_000
TRANSPORTS = ["ws", "sse"]

expect = async_api.expect
expect.set_options(timeout=TIMEOUT_MS)


@pytest.fixture
async def make_server(aiohttp_server, make_settings, settings):
    """The whole app on 127.0.0.1:<port> (requesting `settings` empties the tables)."""

    async def make(raw: dict | None = None):
        overrides = deep_merge({"server": {"static_dir": str(ROOT / "static")}}, raw or {})
        return await aiohttp_server(create_app(make_settings(overrides)))

    return make


@pytest.fixture
async def server(make_server):
    return await make_server()


@pytest.fixture
async def api(aiohttp_client, server):
    """A REST client for the same server: users, tokens, publishing."""
    return await aiohttp_client(server)


@pytest.fixture
async def publisher(api) -> str:
    return await token_for(api, "service", roles=("publisher",))


class BrowserLog:
    """What the page said: uncaught errors and console errors (CSP violations among them)."""

    def __init__(self) -> None:
        self.errors: list[str] = []

    def on_console(self, message) -> None:
        # A 401 from GET /api/me before signing in is expected; Chromium logs every 4xx.
        if message.type == "error" and not message.text.startswith("Failed to load resource"):
            self.errors.append(message.text)

    def on_page_error(self, error) -> None:
        self.errors.append(f"uncaught: {error}")


@pytest.fixture
async def browser():
    async with async_api.async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            await browser.close()


@pytest.fixture
async def page(browser):
    context = await browser.new_context(viewport={"width": 1280, "height": 900})
    page = await context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    log = BrowserLog()
    page.on("console", log.on_console)
    page.on("pageerror", log.on_page_error)
    page.browser_log = log
    try:
        yield page
    finally:
        await context.close()


def base_url(server) -> str:
    return str(server.make_url("/"))


async def sign_in(page, server, username: str, password: str = PASSWORD) -> None:
    await page.goto(base_url(server))
    await expect(page.locator("#login-form")).to_be_visible()
    await page.fill("#username", username)
    await page.fill("#password", password)
    await page.click("#login-form button[type=submit]")
    await expect(page.locator("#user")).to_contain_text(username)


async def choose_transport(page, transport: str) -> None:
    await page.select_option("#transport", transport)
    if transport == "ws":
        await expect(page.locator("#state")).to_have_attribute("data-state", "connected")
    # SSE opens a stream only once there is a channel to follow.


async def subscribe(page, server, channel: str) -> None:
    """Subscribe through the UI, then wait until the server has the subscription registered."""
    await page.fill("#subscribe-input", channel)
    await page.click("#subscribe-button")
    await expect(page.locator(f'[data-testid="chart-{channel}"]')).to_be_visible()
    await expect(page.locator(f'[data-testid="toggle-{channel}"]')).to_have_attribute("aria-pressed", "true")
    await wait_for(lambda: is_live(server, channel))
    await expect(page.locator("#state")).to_have_attribute("data-state", re.compile("connected|resumed"))


def is_live(server, channel: str) -> bool:
    """The server has a subscription to the channel past its start (replay done, now live).

    Registered is not enough: an event published before the subscription has read where
    the channel stands counts as before its start, which is the end at subscribe time.
    """
    subscriptions = server.app[hub_key].channels.get(channel)
    return bool(subscriptions) and all(sub.pending is None for sub in subscriptions.values())


def feed_rows(page, channel: str):
    return page.locator(f'#feed li.event[data-channel="{channel}"]')


async def feed_offsets(page, channel: str) -> list[int]:
    """The channel's offsets in the feed, oldest first (the feed shows newest first)."""
    texts = await feed_rows(page, channel).evaluate_all("rows => rows.map(r => r.dataset.offset)")
    return [int(t) for t in reversed(texts)]


async def state_history(page) -> list[str]:
    """Connection states as the page logged them, oldest first."""
    states = await page.locator("#state-log li").evaluate_all("items => items.map(i => i.dataset.state)")
    return list(reversed(states))


async def screenshot(page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / name), full_page=True)


def assert_page_was_clean(page) -> None:
    assert page.browser_log.errors == []


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_live_events_then_a_drop_resumes_with_every_event_exactly_once(server, api, publisher, page, transport):
    await add_user(api, "alice", roles=("publisher",))
    await sign_in(page, server, "alice")
    await choose_transport(page, transport)
    await subscribe(page, server, "orders")

    first = await publish(api, publisher, "orders", {"n": 1}, "order.created")
    row = feed_rows(page, "orders").first
    await expect(row).to_have_attribute("data-offset", "1")
    await expect(row).to_contain_text("order.created")
    await expect(row).to_contain_text('{"n":1}')
    assert first["offset"] == 1

    # Cut every connection from the server side, and publish while the client is away.
    server.app[hub_key].close_all(1012, "restart")
    for n in range(2, 7):
        await publish(api, publisher, "orders", {"n": n}, "order.updated")

    await expect(page.locator("#state")).to_have_attribute("data-state", "resumed")
    await expect(feed_rows(page, "orders")).to_have_count(6)
    assert await feed_offsets(page, "orders") == [1, 2, 3, 4, 5, 6]
    assert (await state_history(page))[-2:] == ["reconnecting", "resumed"]

    # Live again: the next event arrives once, on top.
    await publish(api, publisher, "orders", {"n": 7})
    await expect(feed_rows(page, "orders")).to_have_count(7)
    assert await feed_offsets(page, "orders") == [1, 2, 3, 4, 5, 6, 7]
    await expect(page.locator('#channels tr[data-channel="orders"] .last-offset')).to_have_text("7")

    await screenshot(page, f"dashboard-{transport}.png")
    await page.set_viewport_size({"width": 390, "height": 844})
    await screenshot(page, f"dashboard-{transport}-narrow.png")
    assert_page_was_clean(page)


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_the_publish_form_publishes_and_the_feed_filters_by_type(server, api, page, transport):
    await add_user(api, "alice", roles=("publisher",))
    await sign_in(page, server, "alice")
    await choose_transport(page, transport)
    await subscribe(page, server, "chat")

    await expect(page.locator("#publish-form")).to_be_visible()
    for event_type, data in (("greeting", '{"text": "hello"}'), ("farewell", '"bye"')):
        await page.fill("#publish-channel", "chat")
        await page.fill("#publish-type", event_type)
        await page.fill("#publish-data", data)
        await page.click("#publish-submit")
        await expect(page.locator("#publish-result")).to_contain_text(f"({event_type})")
    await expect(feed_rows(page, "chat")).to_have_count(2)
    assert await feed_offsets(page, "chat") == [1, 2]
    await expect(feed_rows(page, "chat").first).to_contain_text('"bye"')

    await page.fill("#feed-filter", "greet")
    await expect(page.locator("#feed li.event:visible")).to_have_count(1)
    await expect(page.locator("#feed li.event:visible")).to_have_attribute("data-type", "greeting")
    await page.fill("#feed-filter", "")
    await expect(page.locator("#feed li.event:visible")).to_have_count(2)

    await page.fill("#publish-data", "{not json")
    await page.click("#publish-submit")
    await expect(page.locator("#publish-result")).to_have_text("Data is not valid JSON.")
    await page.fill("#publish-data", "1")
    await page.fill("#publish-channel", "secret:plans")
    await page.click("#publish-submit")
    await expect(page.locator("#publish-result")).to_have_class(re.compile("bad"))
    assert_page_was_clean(page)


async def test_switching_transports_keeps_the_subscriptions_and_misses_nothing(server, api, publisher, page):
    await add_user(api, "alice", roles=("subscriber",))
    await sign_in(page, server, "alice")
    await choose_transport(page, "ws")
    await subscribe(page, server, "prices")
    await publish(api, publisher, "prices", 1)
    await expect(feed_rows(page, "prices")).to_have_count(1)

    expected = 1
    for transport in ("sse", "ws", "sse"):
        await page.select_option("#transport", transport)
        for _ in range(3):  # published while the page is switching
            expected += 1
            await publish(api, publisher, "prices", expected)
        await expect(feed_rows(page, "prices")).to_have_count(expected)
        await expect(page.locator("#state")).to_have_attribute("data-state", "connected")
    assert await feed_offsets(page, "prices") == list(range(1, expected + 1))
    await expect(page.locator("#publish-section")).to_be_hidden()  # a subscriber may not publish
    assert_page_was_clean(page)


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_forbidden_channel_is_refused_without_breaking_the_others(server, api, publisher, page, transport):
    await add_user(api, "bob", roles=("subscriber",))
    await sign_in(page, server, "bob")
    await choose_transport(page, transport)
    await subscribe(page, server, "news")

    await page.fill("#subscribe-input", "secret:plans")
    await page.click("#subscribe-button")
    await expect(page.locator("#subscribe-error")).to_contain_text("secret:plans")
    await expect(page.locator('[data-testid="chart-secret:plans"]')).to_have_count(0)

    await publish(api, publisher, "news", "still here")
    await expect(feed_rows(page, "news")).to_have_count(1)
    assert_page_was_clean(page)


async def test_a_bad_password_is_refused_and_logout_ends_the_session(server, api, page):
    await add_user(api, "carol", roles=("subscriber",))
    await page.goto(base_url(server))
    await page.fill("#username", "carol")
    await page.fill("#password", "wrong password")
    await page.click("#login-form button[type=submit]")
    await expect(page.locator("#login-error")).to_contain_text("Invalid username or password")

    await page.fill("#password", PASSWORD)
    await page.click("#login-form button[type=submit]")
    await expect(page.locator("#user")).to_contain_text("carol")
    await page.reload()  # the session cookie keeps the user signed in
    await expect(page.locator("#user")).to_contain_text("carol")

    await page.click("#logout")  # a cookie POST: it must carry the page's Origin
    await expect(page.locator("#login-form")).to_be_visible()
    await page.reload()
    await expect(page.locator("#login-form")).to_be_visible()
    await expect(page.locator("#dashboard")).to_be_hidden()
    assert_page_was_clean(page)


# herald.js on its own, driven from the page (the dashboard's page has it loaded)

START_CLIENT = """
([transport, token, channels]) => {
  const log = { events: [], states: [], resets: [], errors: [], tokenCalls: 0 };
  window.log = log;
  const options = { transport };
  if (token) options.getToken = async () => { log.tokenCalls += 1; return token; };
  const client = new Herald.Client(options);
  window.client = client;
  for (const name of ["connecting", "connected", "reconnecting", "resumed", "closed"]) {
    client.on(name, () => log.states.push(name));
  }
  client.on("reset", ({ channel }) => log.resets.push(channel));
  client.on("error", (err) => log.errors.push(`${err.code}: ${err.message}`));
  for (const [channel, offset] of channels) {
    const handler = (e) => log.events.push([e.channel, e.offset, e.type]);
    client.subscribe(channel, handler, offset === null ? undefined : { offset });
  }
}
"""


async def start_client(page, transport: str, channels: dict[str, int | None], token: str | None = None):
    await page.evaluate(START_CLIENT, [transport, token, list(channels.items())])


async def received(page, count: int) -> list[tuple[str, int, str]]:
    await page.wait_for_function("n => window.log.events.length >= n", arg=count)
    return [tuple(e) for e in await page.evaluate("() => window.log.events")]


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_herald_js_with_a_token_resumes_and_asks_for_a_fresh_token(server, api, publisher, page, transport):
    user = await add_user(api, "dave", roles=("publisher",))
    token = api.app[tokens_key].issue(str(user.id), user.username, user.roles)
    channel = f"user:{user.id}"  # only its owner may follow it: the token is what identifies the page
    await page.goto(base_url(server))
    await start_client(page, transport, {channel: None}, token=token)
    await wait_for(lambda: is_live(server, channel))
    hub = server.app[hub_key]
    assert all(conn.identity is not None and conn.identity.username == "dave" for conn in hub.connections)

    await publish(api, publisher, channel, 1)
    await publish(api, publisher, channel, 2)
    assert await received(page, 2) == [(channel, 1, "message"), (channel, 2, "message")]

    hub.close_all(4401, "token expired")
    for n in range(3, 6):
        await publish(api, publisher, channel, n, "later")
    events = await received(page, 5)
    assert [offset for _, offset, _ in events] == [1, 2, 3, 4, 5]
    await page.wait_for_function("() => window.log.states.at(-1) === 'resumed'")
    log = await page.evaluate("() => window.log")
    assert log["states"] == ["connecting", "connected", "reconnecting", "resumed"]
    assert log["tokenCalls"] >= 2  # before the first connection and before the reconnect

    stored = await page.evaluate(f"() => window.client.publish({channel!r}, 'note', {{x: 1}})")
    assert stored["offset"] == 6
    assert stored["data"] == {"x": 1}
    assert (await received(page, 6))[-1] == (channel, 6, "note")
    await page.evaluate("() => window.client.close()")
    assert (await page.evaluate("() => window.log.states"))[-1] == "closed"
    assert_page_was_clean(page)


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_herald_js_reports_a_reset_when_history_is_gone(make_server, aiohttp_client, page, transport):
    server = await make_server({"events": {"history_size": 3}})
    api = await aiohttp_client(server)
    token = await token_for(api, "service2", roles=("publisher",))
    for channel in ("public:pruned", "public:kept"):
        for n in range(1, 11):
            await publish(api, token, channel, n)
    store = server.app[store_key]

    async def pruned() -> bool:
        await store.prune()
        return (await store.state("public:pruned")).first_kept == 8

    await wait_for(pruned)

    await page.goto(base_url(server))
    # Anonymous (public channels): one resume is older than the kept history, one is not.
    await start_client(page, transport, {"public:pruned": 2, "public:kept": 8})
    events = await received(page, 2)
    assert events == [("public:kept", 9, "message"), ("public:kept", 10, "message")]
    await page.wait_for_function("() => window.log.resets.length === 1")
    assert await page.evaluate("() => window.log.resets") == ["public:pruned"]

    await publish(api, token, "public:pruned", 11)
    events = await received(page, 3)
    assert events[-1] == ("public:pruned", 11, "message")  # nothing replayed; live events follow
    assert len(events) == 3
    assert_page_was_clean(page)


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_herald_js_resumes_a_channel_that_had_no_event_before_the_drop(server, api, publisher, page, transport):
    """The subscribe reply (WS) or the reset (SSE) tells where an empty channel stands."""
    channel = "public:quiet"
    await page.goto(base_url(server))
    await start_client(page, transport, {channel: None})
    await wait_for(lambda: is_live(server, channel))
    await page.wait_for_function("() => window.log.states.includes('connected')")

    server.app[hub_key].close_all(1012, "restart")
    for n in (1, 2):
        await publish(api, publisher, channel, n)
    events = await received(page, 2)
    assert [offset for _, offset, _ in events] == [1, 2]
    await publish(api, publisher, channel, 3)
    assert [offset for _, offset, _ in await received(page, 3)] == [1, 2, 3]
    assert await page.evaluate("() => window.log.resets") == []
    assert_page_was_clean(page)


PRESENCE_RULES = [{"pattern": "room:*", "subscribe": ["authenticated"], "publish": ["publisher"], "presence": True}]


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_the_dashboard_shows_who_is_here_on_presence_channels(make_server, aiohttp_client, page, transport):
    server = await make_server({"channels": PRESENCE_RULES + TEST_CHANNEL_RULES, "realtime": {"presence_grace": 0}})
    api = await aiohttp_client(server)
    await add_user(api, "alice")
    bob = await token_for(api, "bob")
    await sign_in(page, server, "alice")
    await choose_transport(page, transport)
    await subscribe(page, server, "room:lobby")
    await subscribe(page, server, "orders")  # no presence on its rule: nothing shown

    here = page.locator('[data-testid="presence-room:lobby"]')
    await expect(here).to_be_visible()
    await expect(here.locator('[data-testid="presence-user"]')).to_have_text(["alice"])
    ws = await WsClient.connect(api, f"/ws?access_token={bob}")
    await ws.subscribe("room:lobby")
    # bob's join reaches the page, which asks who is here again.
    await expect(here.locator('[data-testid="presence-user"]')).to_have_text(["alice", "bob"])
    await expect(here.locator(".presence-count")).to_have_text("Here: 2 users")
    await ws.ws.close()
    await expect(here.locator('[data-testid="presence-user"]')).to_have_text(["alice"])
    await expect(page.locator('[data-testid="presence-orders"]')).to_be_hidden()

    # herald.js itself: client.presence() and the join/leave events.
    await page.evaluate(
        """(transport) => {
            window.seen = [];
            const c = new Herald.Client({ transport });
            c.on("join", (e) => seen.push(["join", e.channel, e.user.username]));
            c.on("leave", (e) => seen.push(["leave", e.channel, e.user.username]));
            c.subscribe("room:lobby");
            window.probe = c;
        }""",
        transport,
    )
    await wait_for(
        lambda: len(server.app[hub_key].channels.get("room:lobby", {})) == 2 and is_live(server, "room:lobby")
    )
    ws = await WsClient.connect(api, f"/ws?access_token={bob}")
    await ws.subscribe("room:lobby")
    await wait_for(lambda: page.evaluate("seen.length === 1"))
    assert await page.evaluate("seen") == [["join", "room:lobby", "bob"]]
    body = await page.evaluate("probe.presence('room:lobby')")
    assert body["clients"] == 3
    assert [(u["username"], u["connections"]) for u in body["users"]] == [("alice", 2), ("bob", 1)]
    await ws.ws.close()
    await wait_for(lambda: page.evaluate("seen.length === 2"))
    assert (await page.evaluate("seen"))[1] == ["leave", "room:lobby", "bob"]
    refused = await page.evaluate("probe.presence('orders').then(() => null, (e) => e.code)")
    assert refused == "forbidden"
    await screenshot(page, f"dashboard-presence-{transport}.png")
    assert_page_was_clean(page)
