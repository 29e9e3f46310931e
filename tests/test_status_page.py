"""What the teacher reads before class: which address headsets use, and whether the class can run.

The page is rendered from real health bodies; the laptop's interfaces are described to the address
picker through psutil (the one thing a test cannot rearrange on this machine)."""

from __future__ import annotations

import socket
from types import SimpleNamespace

import psutil
import pytest

from pulmomed_edge import network
from pulmomed_edge.http.status_page import LOOPBACK_WARNING, render_status_page


def _health(status: str = "healthy", **failed: str) -> dict:
    components = {
        "embeddings": {"status": "ready", "model": "all-MiniLM-L6-v2 int8"},
        "index": {"status": "ready", "passages": 210},
        "llm": {"status": "ready", "model": "qwen2.5-coder-0.5b-instruct-q4_k_m"},
        "cache": {"status": "ready", "entries": 3},
    }
    for name, error in failed.items():
        components[name] = {"status": "failed", "error": error, "fix": "haz <esto> & aquello"}
    return {"status": status, "version": "0.1.0", "components": components, "activity": None}


def test_a_server_on_this_laptop_only_says_headsets_cannot_reach_it():
    page = render_status_page(_health(), "127.0.0.1", 8000)
    assert LOOPBACK_WARNING.split(":")[0] in page and "--host 0.0.0.0" in page
    assert "<code>http://" not in page  # it listed every LAN address, none of them listening


def test_degraded_says_whether_headsets_get_answers_and_states_are_spanish():
    page = render_status_page(_health("degraded", index="Índice dañado"), "0.0.0.0", 8000)
    assert "NO recibirán respuestas" in page and "Falla" in page
    assert "Solución: <code>haz &lt;esto&gt; &amp; aquello</code>" in page  # escaped
    page = render_status_page(_health("degraded", llm="Modelo incompleto"), "0.0.0.0", 8000)
    assert "respuestas resumidas de las fuentes" in page
    healthy = render_status_page(_health(), "0.0.0.0", 8000)
    assert "Listo</td>" in healthy and "210 pasajes" in healthy and "ready" not in healthy


def _nic(address: str) -> SimpleNamespace:
    return SimpleNamespace(family=socket.AF_INET, address=address)


def test_the_classroom_address_comes_first_and_bridges_and_self_assigned_ones_are_left_out(monkeypatch):
    interfaces = {
        "tun0": [_nic("10.8.0.5")],  # a VPN: kept, after the route's address
        "docker0": [_nic("172.17.0.1")],
        "br-5f2a": [_nic("172.18.0.1")],
        "eth1": [_nic("169.254.12.7")],  # no DHCP answer
        "wlan0": [_nic("192.168.1.20")],
        "eth2": [_nic("192.168.50.9")],  # down
        "lo": [_nic("127.0.0.1")],
    }
    stats = {name: SimpleNamespace(isup=name != "eth2") for name in interfaces}
    monkeypatch.setattr(psutil, "net_if_addrs", lambda: interfaces)
    monkeypatch.setattr(psutil, "net_if_stats", lambda: stats)
    monkeypatch.setattr(network, "_default_route_address", lambda: "192.168.1.20")
    assert network.lan_addresses() == ["192.168.1.20", "10.8.0.5"]
    assert network.teacher_urls("0.0.0.0", 8000)[0] == "http://192.168.1.20:8000"


@pytest.mark.parametrize(
    ("host", "url"), [("::1", "http://[::1]:8000"), ("192.168.1.20", "http://192.168.1.20:8000")]
)
def test_a_server_bound_to_one_address_shows_that_address(host, url):
    assert network.teacher_urls(host, 8000) == [url]
    assert network.is_loopback_host(host) == (host == "::1")
