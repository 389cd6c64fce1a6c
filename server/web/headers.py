"""The security headers every response carries (PROTOCOL §1), in one place for the app's
hook (middlewares/security.py) and for the answers aiohttp makes below the app
(server/web/protocol.py)."""

from __future__ import annotations

PAGE_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
API_CSP = "default-src 'none'; frame-ancestors 'none'"
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Server": "Herald",  # aiohttp would otherwise announce its version
}
