"""What a multi-node run needs to know about the network: which interface gloo and NCCL use,
and the address each rank is reachable at.

Why: gloo advertises to the other ranks the address its host name resolves to, unless
GLOO_SOCKET_IFNAME names an interface. Debian maps the host name to 127.0.1.1, so on a second
node the first node's rank is told to connect to 127.0.0.1: one rank fails in seconds, the other
then hangs with no message (measured on two network-namespace hosts). `run.socket_ifname` (which
`rlengine train --hostfile` fills in) sets the interface on every rank, since it travels on the
command line; the deepspeed launcher does not forward GLOO_* variables to other nodes.
"""
from __future__ import annotations

import ipaddress
import os
import socket


class NetworkSetupError(RuntimeError):
    """The sockets of a multi-node run would use a loopback or missing interface."""


def interface_addresses() -> dict[str, str]:
    """IPv4 address of each interface that has one: {'lo': '127.0.0.1', 'eth0': '10.0.0.2'}."""
    import psutil

    found = {}
    for name, addrs in psutil.net_if_addrs().items():
        for a in addrs:
            if a.family == socket.AF_INET:
                found[name] = a.address
                break
    return found


def _describe(addrs: dict[str, str]) -> str:
    return ", ".join(f"{n} {a}" for n, a in sorted(addrs.items()) if not ipaddress.ip_address(a).is_loopback) or "none"


def is_multi_node(env=os.environ) -> bool:
    """More ranks in the world than the launcher started on this node (deepspeed's LOCAL_SIZE)."""
    world = int(env.get("WORLD_SIZE", "1"))
    local = int(env.get("LOCAL_SIZE", env.get("LOCAL_WORLD_SIZE", str(world))))
    return world > local


def configure_sockets(socket_ifname: str | None, env=os.environ) -> None:
    """Point gloo (and NCCL, unless set) at `socket_ifname`; without one on a multi-node run, fail
    with a message saying what to set when gloo would advertise a loopback address."""
    addrs = interface_addresses()
    if socket_ifname:
        if socket_ifname not in addrs:
            raise NetworkSetupError(f"run.socket_ifname={socket_ifname!r}: no such interface with an IPv4 address "
                                    f"on {socket.gethostname()} (it has: {_describe(addrs)})")
        env["GLOO_SOCKET_IFNAME"] = socket_ifname
        env.setdefault("NCCL_SOCKET_IFNAME", socket_ifname)
        return
    if not is_multi_node(env) or env.get("GLOO_SOCKET_IFNAME"):
        return
    host = socket.gethostname()
    try:
        advertised = socket.gethostbyname(host)
    except OSError:
        advertised = None
    if advertised is None or ipaddress.ip_address(advertised).is_loopback:
        raise NetworkSetupError(
            f"this node's name {host!r} resolves to {advertised or 'nothing'}, which gloo would advertise to the "
            f"other nodes: set run.socket_ifname=<interface> (or GLOO_SOCKET_IFNAME in ~/.deepspeed_env); "
            f"interfaces here: {_describe(addrs)}")


def my_address(env=os.environ) -> str:
    """The address this rank's sockets use: the IPv4 of GLOO_SOCKET_IFNAME, else what the host
    name resolves to."""
    name = env.get("GLOO_SOCKET_IFNAME")
    if name:
        return interface_addresses().get(name, "?")
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "?"


def route_interface(ip_route_get: str) -> str | None:
    """The device in the output of `ip -o route get ADDR` ('10.0.0.1 dev eth0 src ...')."""
    words = ip_route_get.split()
    return words[words.index("dev") + 1] if "dev" in words[:-1] else None


def interface_holding(ip_addr_show: str, address: str) -> str | None:
    """The device that holds `address` in the output of `ip -o -4 addr show`
    ('2: eth0    inet 10.0.0.1/24 brd ...')."""
    for line in ip_addr_show.splitlines():
        words = line.split()
        if "inet" in words[:-1] and words[words.index("inet") + 1].split("/")[0] == address:
            return words[1].rstrip(":").split("@")[0]
    return None
