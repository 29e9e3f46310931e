"""How headsets reach this laptop: the LAN addresses the server listens on."""

from __future__ import annotations

import contextlib
import ipaddress
import socket


def lan_addresses() -> list[str]:
    """IPv4 addresses of this machine's interfaces, LAN first, loopback last (no traffic sent)."""
    found: set[str] = set()
    try:
        import psutil

        for addrs in psutil.net_if_addrs().values():
            for addr in addrs:
                if addr.family == socket.AF_INET:
                    found.add(addr.address)
    except Exception:  # psutil missing or restricted: fall back to the host name
        with contextlib.suppress(OSError):
            found.update(
                info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)
            )
    found.add("127.0.0.1")

    def order(ip: str) -> tuple[int, str]:
        addr = ipaddress.ip_address(ip)
        return (2 if addr.is_loopback else 0 if addr.is_private else 1, ip)

    return sorted(found, key=order)


def teacher_urls(host: str, port: int) -> list[str]:
    if host not in ("0.0.0.0", "", "::"):
        return [f"http://{host}:{port}"]
    return [f"http://{ip}:{port}" for ip in lan_addresses()]
