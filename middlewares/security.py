"""Security headers on every response, streamed ones included (an on_response_prepare hook).

Cookies set over TLS (direct, or per a trusted proxy) are marked Secure here too.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from aiohttp import web

from server.web.net import is_tls

PAGE_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
API_CSP = "default-src 'none'; frame-ancestors 'none'"
STATIC_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Server": "Herald",  # aiohttp would otherwise announce its version
}

Adder = Callable[[web.Request, web.StreamResponse], None]


def mark_cookies_secure(headers) -> None:
    """Set-Cookie is already serialised when prepare hooks run, so edit the header lines."""
    cookies = headers.getall("Set-Cookie", [])
    if cookies:
        del headers["Set-Cookie"]
        for cookie in cookies:
            headers.add("Set-Cookie", cookie if "; Secure" in cookie else f"{cookie}; Secure")


def security_headers(trusted_proxies: Sequence[str]) -> Adder:
    """Part of the front door's response-headers hook."""

    def add_security_headers(request: web.Request, response: web.StreamResponse) -> None:
        headers = response.headers
        headers.update(STATIC_HEADERS)
        # The raw header, not response.content_type, which parses it on every call.
        is_page = headers.get("Content-Type", "").startswith("text/html")
        headers.setdefault("Content-Security-Policy", PAGE_CSP if is_page else API_CSP)
        if is_tls(request, trusted_proxies):
            headers["Strict-Transport-Security"] = "max-age=63072000; includeSubDomains"
            mark_cookies_secure(headers)

    return add_security_headers
