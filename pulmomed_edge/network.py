"""How headsets reach this laptop: the LAN addresses the server listens on."""

from __future__ import annotations

import contextlib
import ipaddress
import socket

# bridges of containers and virtual machines: no headset is on them (a VPN or a Hyper-V switch may
# carry the real LAN, so those stay, after the default route's address)
_VIRTUAL_PREFIXES = ("docker", "br-", "veth", "virbr", "vmnet", "vboxnet")
# a documentation address: connecting a UDP socket to it picks the default route, sending nothing
_ROUTE_PROBE = ("192.0.2.1", 9)


def lan_addresses() -> list[str]:
    """IPv4 addresses a headset on the classroom LAN could use, the default route's first;
    interfaces that are down or virtual and self-assigned (169.254.x.x) addresses are left out."""
    found: set[str] = set()
    try:
        import psutil

        stats = psutil.net_if_stats()
        for name, addrs in psutil.net_if_addrs().items():
            if (name in stats and not stats[name].isup) or name.lower().startswith(_VIRTUAL_PREFIXES):
                continue
            found.update(a.address for a in addrs if a.family == socket.AF_INET)
    except Exception:  # psutil missing or restricted: fall back to the host name
        with contextlib.suppress(OSError):
            found.update(
                info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)
            )
    usable = {ip for ip in found if not _unusable(ip)}
    routed = _default_route_address()

    def order(ip: str) -> tuple[int, int, ipaddress.IPv4Address]:
        addr = ipaddress.ip_address(ip)
        return (ip != routed, 0 if addr.is_private else 1, addr)  # type: ignore[return-value]

    return sorted(usable, key=order)


def _unusable(ip: str) -> bool:
    addr = ipaddress.ip_address(ip)
    return addr.is_loopback or addr.is_link_local or addr.is_unspecified


def _default_route_address() -> str | None:
    """The address this machine would send from towards other networks (no packet is sent)."""
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect(_ROUTE_PROBE)
        return probe.getsockname()[0]
    return None


def is_loopback_host(host: str) -> bool:
    """Whether a server bound to `host` can only be reached from this laptop."""
    if host.strip().lower() == "localhost":
        return True
    with contextlib.suppress(ValueError):
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    return False


def is_wildcard_host(host: str) -> bool:
    """Whether a server bound to `host` listens on every interface."""
    return host in ("0.0.0.0", "", "::")


def teacher_urls(host: str, port: int) -> list[str]:
    """The addresses headsets can use for a server bound to `host` (all LAN ones for 0.0.0.0)."""
    if not is_wildcard_host(host):
        shown = f"[{host}]" if ":" in host and not host.startswith("[") else host  # an IPv6 literal
        return [f"http://{shown}:{port}"]
    return [f"http://{ip}:{port}" for ip in lan_addresses()]
