"""Security headers on every response, streamed ones included (an on_response_prepare hook).

Cookies set over TLS (direct, or per a trusted proxy) are marked Secure here too.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from aiohttp import hdrs, web
from multidict import CIMultiDict, istr

from server.web.headers import API_CSP, PAGE_CSP, SECURITY_HEADERS
from server.web.net import is_tls, parse_networks

# istr names: multidict then skips folding the name's case on every response.
STATIC_HEADERS = CIMultiDict({istr(name): value for name, value in SECURITY_HEADERS.items()})
CSP_HEADER = istr("Content-Security-Policy")

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

    proxies = parse_networks(tuple(trusted_proxies))

    def add_security_headers(request: web.Request, response: web.StreamResponse) -> None:
        headers = response.headers
        headers.update(STATIC_HEADERS)
        # The raw header, not response.content_type, which parses it on every call.
        is_page = headers.get(hdrs.CONTENT_TYPE, "").startswith("text/html")
        headers.setdefault(CSP_HEADER, PAGE_CSP if is_page else API_CSP)
        transport = request.transport
        direct_tls = transport is not None and transport.get_extra_info("sslcontext") is not None
        if direct_tls or (proxies and is_tls(request, trusted_proxies)):
            headers["Strict-Transport-Security"] = "max-age=63072000; includeSubDomains"
            mark_cookies_secure(headers)

    return add_security_headers
