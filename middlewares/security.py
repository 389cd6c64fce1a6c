"""Security headers on every response, streamed ones included (an on_response_prepare hook).

Cookies set over TLS (direct, or per a trusted proxy) are marked Secure here too.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from aiohttp import web

from server.web.headers import API_CSP, PAGE_CSP, SECURITY_HEADERS
from server.web.net import is_tls

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
        headers.update(SECURITY_HEADERS)
        # The raw header, not response.content_type, which parses it on every call.
        is_page = headers.get("Content-Type", "").startswith("text/html")
        headers.setdefault("Content-Security-Policy", PAGE_CSP if is_page else API_CSP)
        if is_tls(request, trusted_proxies):
            headers["Strict-Transport-Security"] = "max-age=63072000; includeSubDomains"
            mark_cookies_secure(headers)

    return add_security_headers
