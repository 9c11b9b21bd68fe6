"""``HOST:PORT`` addresses, for the broker and its clients alike."""

from __future__ import annotations

import ipaddress


def is_loopback(address: str) -> bool:
    """Whether ``HOST:PORT`` (``[::1]:PORT`` for IPv6) names this machine only."""
    host = address.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
