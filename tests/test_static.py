"""The dashboard and its assets (PROTOCOL §7): fingerprints, caching, 304s, compression, 404s."""

from __future__ import annotations

import gzip
import hashlib
import re
from html.parser import HTMLParser
from pathlib import Path

import brotli
import pytest

from server.app import create_app
from server.web.static import build_static

STATIC = Path(__file__).resolve().parents[1] / "static"
PAGE_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
IMMUTABLE = "public, max-age=31536000, immutable"
FINGERPRINTED = re.compile(r"^/static/(?P<stem>[A-Za-z0-9_-]+)\.(?P<hash>[0-9a-f]{8})\.(?P<ext>js|css|svg)$")


@pytest.fixture
async def client(aiohttp_client, make_settings):
    """An app serving this repository's static/ (whatever the working directory)."""
    return await aiohttp_client(create_app(make_settings({"server": {"static_dir": str(STATIC)}})))


class PageParser(HTMLParser):
    """Collects what a strict CSP cares about: asset references, inline scripts and styles."""

    def __init__(self) -> None:
        super().__init__()
        self.refs: list[str] = []
        self.inline_scripts = 0
        self.style_blocks = 0
        self.inline_attributes: list[str] = []
        self.ids: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        for name in ("src", "href"):
            if values.get(name):
                self.refs.append(values[name] or "")
        if tag == "script" and not values.get("src"):
            self.inline_scripts += 1
        if tag == "style":
            self.style_blocks += 1
        self.inline_attributes += [name for name, _ in attrs if name == "style" or name.startswith("on")]
        if values.get("id"):
            self.ids.add(values["id"] or "")


def parse_page(html: str) -> PageParser:
    parser = PageParser()
    parser.feed(html)
    return parser


async def page_assets(client) -> dict[str, str]:
    """Plain file name (herald.js) -> the fingerprinted URL the page refers to."""
    resp = await client.get("/")
    refs = parse_page(await resp.text()).refs
    assets = {}
    for ref in refs:
        match = FINGERPRINTED.match(ref)
        assert match, f"{ref} is not a fingerprinted /static/ URL"
        assets[f"{match['stem']}.{match['ext']}"] = ref
    return assets


async def test_the_dashboard_page_is_served_with_revalidation_and_the_strict_csp(client):
    resp = await client.get("/")
    assert resp.status == 200
    assert resp.content_type == "text/html"
    assert resp.headers["Cache-Control"] == "no-cache"
    assert resp.headers["ETag"]
    assert resp.headers["Last-Modified"]
    assert resp.headers["Content-Security-Policy"] == PAGE_CSP
    assert resp.headers["X-Content-Type-Options"] == "nosniff"
    assert resp.headers["X-Request-Id"]
    assert "<title>Herald</title>" in await resp.text()


async def test_the_page_has_no_inline_script_or_style_and_the_ids_tests_use(client):
    page = parse_page(await (await client.get("/")).text())
    assert page.inline_scripts == 0
    assert page.style_blocks == 0
    assert page.inline_attributes == []
    expected = {"login-form", "username", "password", "state", "transport", "feed", "feed-filter"}
    expected |= {"publish-form", "subscribe-input", "subscribe-button", "channels", "state-log", "logout"}
    assert expected <= page.ids


def test_the_scripts_never_build_markup_or_styles_from_strings():
    """textContent and classes only: no injection through event data, nothing the CSP blocks."""
    for name in ("app.js", "herald.js"):
        source = (STATIC / name).read_text()
        for forbidden in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "style="):
            assert forbidden not in source, f"{name} uses {forbidden}"


async def test_the_page_refers_to_fingerprinted_assets_cached_for_a_year(client):
    assets = await page_assets(client)
    assert {"herald.js", "app.js", "app.css", "favicon.svg"} <= set(assets)
    for plain, url in assets.items():
        resp = await client.get(url)
        assert resp.status == 200, url
        assert resp.headers["Cache-Control"] == IMMUTABLE
        assert resp.headers["ETag"]
        assert resp.headers["Last-Modified"]
        body = await resp.read()
        assert body == (STATIC / plain).read_bytes()
        assert FINGERPRINTED.match(url)["hash"] == hashlib.sha256(body).hexdigest()[:8]
    js = await client.get(assets["herald.js"])
    assert js.content_type in ("application/javascript", "text/javascript")
    css = await client.get(assets["app.css"])
    assert css.content_type == "text/css"


@pytest.mark.parametrize("path", ["/", "asset"])
async def test_if_none_match_and_if_modified_since_answer_304(client, path):
    url = (await page_assets(client))["herald.js"] if path == "asset" else path
    first = await client.get(url)
    etag, modified = first.headers["ETag"], first.headers["Last-Modified"]

    again = await client.get(url, headers={"If-None-Match": etag})
    assert again.status == 304
    assert await again.read() == b""
    assert again.headers["ETag"] == etag

    since = await client.get(url, headers={"If-Modified-Since": modified})
    assert since.status == 304

    stale = await client.get(url, headers={"If-None-Match": '"something-else"'})
    assert stale.status == 200


@pytest.mark.parametrize(
    ("accept", "encoding", "decompress"),
    [
        ("br", "br", brotli.decompress),
        ("gzip", "gzip", gzip.decompress),
        ("gzip, deflate, br", "br", brotli.decompress),
    ],
)
async def test_a_compressed_sibling_is_served_to_clients_that_accept_it(client, accept, encoding, decompress):
    url = (await page_assets(client))["herald.js"]
    resp = await client.get(url, headers={"Accept-Encoding": accept}, auto_decompress=False)
    assert resp.status == 200
    assert resp.headers["Content-Encoding"] == encoding
    assert resp.headers["Cache-Control"] == IMMUTABLE
    assert decompress(await resp.read()) == (STATIC / "herald.js").read_bytes()


async def test_identity_is_served_when_no_encoding_is_accepted(client):
    url = (await page_assets(client))["herald.js"]
    resp = await client.get(url, headers={"Accept-Encoding": "identity"}, auto_decompress=False)
    assert "Content-Encoding" not in resp.headers
    assert await resp.read() == (STATIC / "herald.js").read_bytes()


async def test_a_plain_asset_name_still_works_but_must_revalidate(client):
    resp = await client.get("/static/herald.js")
    assert resp.status == 200
    assert resp.headers["Cache-Control"] == "no-cache"
    assert resp.headers["ETag"]
    assert await resp.read() == (STATIC / "herald.js").read_bytes()


async def not_found_paths(client) -> list[str]:
    herald = (await page_assets(client))["herald.js"]
    return [
        "/static/.env",
        "/static/.build-x",
        "/static/..%2Fsettings.toml",
        "/static/%2e%2e/run.py",
        "/static/%2e%2e%2frun.py",
        "/static/../run.py",
        "/static/",
        "/static",
        "/static/nope.js",
        "/static/herald.00000000.js",
        f"{herald}.gz",  # the compressed siblings exist on disk but are no public names
        f"{herald}.br",
        "/static/app.js/extra",
    ]


async def test_dotfiles_traversal_siblings_and_directories_are_404_problems(client):
    for path in await not_found_paths(client):
        resp = await client.get(path)
        assert resp.status == 404, path
        assert resp.content_type == "application/problem+json", path
        body = await resp.json()
        assert body["code"] == "not_found", path
        assert resp.headers["X-Request-Id"] == body["request_id"]


def test_build_rewrites_pages_to_the_current_fingerprint(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    (source / "index.html").write_text('<script src="/static/app.js"></script><link href="/static/app.css">')
    (source / "app.js").write_text("console.log(1);\n" * 40)
    (source / "app.css").write_text("body{}")
    (source / ".secret").write_text("nope")

    first = build_static(source, tmp_path / "build")
    (source / "app.js").write_text("console.log(2);\n" * 40)
    second = build_static(source, tmp_path / "build")

    def page_of(files) -> str:
        path, immutable = files.lookup("index.html")
        assert not immutable
        return path.read_text()

    assert first.plain["app.js"] != second.plain["app.js"]
    assert f"/static/{first.plain['app.js']}" in page_of(first)
    assert f"/static/{second.plain['app.js']}" in page_of(second)
    assert f"/static/{second.plain['app.css']}" in page_of(second)
    assert second.lookup(".secret") is None
    assert second.lookup(second.plain["app.js"]) == (tmp_path.resolve() / "build" / second.plain["app.js"], True)
    assert (tmp_path / "build" / (second.plain["app.js"] + ".br")).exists()
    assert not (tmp_path / "build" / (second.plain["app.css"] + ".gz")).exists()  # too small to bother


async def test_the_sign_in_page_says_how_to_get_a_user(client):
    """Issue 10: a newcomer facing the sign-in form learns where the first admin comes from."""
    text = await (await client.get("/")).text()
    help_start = text.index('id="login-help"')
    help_text = text[help_start : text.index("</p>", help_start)]
    assert "admin" in help_text
    assert "standard error" in help_text
    assert "createuser" in help_text
