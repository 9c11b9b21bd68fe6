"""``HOST:PORT`` addresses, for the broker and its clients alike."""

from __future__ import annotations

import ipaddress


def split_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6) -> (host, port); ValueError otherwise."""
    host, sep, port = address.rpartition(":")
    if not (sep and host and port.isdigit() and int(port) <= 65535):
        raise ValueError(f"must be HOST:PORT, not {address!r}")
    return host.strip("[]"), int(port)


def is_loopback(address: str) -> bool:
    """Whether ``HOST:PORT`` names this machine only."""
    host = address.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
