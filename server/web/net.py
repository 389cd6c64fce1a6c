"""Who is calling and how: client address and TLS, believing only trusted proxies."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from functools import lru_cache

from aiohttp import web

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@lru_cache(maxsize=16)
def parse_networks(proxies: Sequence[str]) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(p, strict=False) for p in proxies)


def _is_trusted(address: str, networks: tuple[Network, ...]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in net for net in networks)


def client_ip(request: web.Request, trusted_proxies: Sequence[str]) -> str:
    """The peer address, or under trusted proxies the rightmost untrusted X-Forwarded-For hop."""
    peer = request.remote or ""
    networks = parse_networks(tuple(trusted_proxies))
    if not networks or not _is_trusted(peer, networks):
        return peer
    hops = [h.strip() for h in ",".join(request.headers.getall("X-Forwarded-For", [])).split(",") if h.strip()]
    for hop in reversed(hops):
        if not _is_trusted(hop, networks):
            return hop
    return hops[0] if hops else peer


def is_tls(request: web.Request, trusted_proxies: Sequence[str]) -> bool:
    if request.transport is not None and request.transport.get_extra_info("sslcontext") is not None:
        return True
    networks = parse_networks(tuple(trusted_proxies))
    if networks and _is_trusted(request.remote or "", networks):
        proto = request.headers.get("X-Forwarded-Proto", "").split(",")[-1].strip().lower()
        return proto == "https"
    return False
