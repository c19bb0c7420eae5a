"""Before a multi-node launch: check every node of the hostfile, and pick the socket interface.

What `deepspeed --hostfile` leaves to the user, found on two network-namespace hosts
(tests/test_multinode.py): its multi-node launcher is pdsh (`launcher 'pdsh' not installed`
otherwise), it ssh-checks only the first host, it does not forward GLOO_* variables, and gloo
advertises a loopback address where the host name resolves to one (Debian's 127.0.1.1). So
`rlengine train --hostfile` checks pdsh and ssh to every host (BatchMode: a password prompt would
hang), then asks each node which interface reaches the first node, and passes that interface to
every rank as `run.socket_ifname`.
"""
from __future__ import annotations

import ipaddress
import shutil
import socket
import subprocess
from pathlib import Path

from rlengine.network import interface_holding, route_interface

SSH_TIMEOUT_S = 15


class HostCheckError(RuntimeError):
    """A node of the hostfile cannot take part; the message names it and what to do."""


def read_hostfile(path: str) -> list[str]:
    """Host names of a deepspeed hostfile (`name slots=N` lines; # comments)."""
    names = []
    for line in Path(path).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            names.append(line.split()[0])
    return names


def _ssh(host: str, command: str) -> subprocess.CompletedProcess:
    args = ["ssh", "-o", "BatchMode=yes", "-o", f"ConnectTimeout={SSH_TIMEOUT_S}", host, command]
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=2 * SSH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(args, 255, "", f"no answer within {2 * SSH_TIMEOUT_S} s")


def check_hosts(hosts: list[str]) -> None:
    """pdsh is installed and every host answers ssh without a prompt."""
    if shutil.which("pdsh") is None:
        raise HostCheckError("the multi-node launch needs pdsh (DeepSpeed's multi-node launcher) on this node: "
                             "apt-get install pdsh (or your distribution's package)")
    for host in hosts:
        r = _ssh(host, "true")
        if r.returncode != 0:
            why = (r.stderr.strip().splitlines() or [f"exit code {r.returncode}"])[-1]
            raise HostCheckError(f"host {host!r} of the hostfile does not answer ssh without a prompt ({why}): "
                                 "the launcher reaches every node by ssh (keys, known_hosts)")


def master_address(hosts: list[str]) -> str:
    """The first node's address, where every rank meets (MASTER_ADDR); never a loopback one."""
    try:
        master = socket.gethostbyname(hosts[0])
    except OSError as e:
        raise HostCheckError(f"host {hosts[0]!r} (the first of the hostfile) does not resolve here: {e}") from None
    if ipaddress.ip_address(master).is_loopback:
        raise HostCheckError(f"host {hosts[0]!r} resolves to the loopback address {master} here, which the other "
                             "nodes cannot reach: name it by an address or a name of its network interface")
    return master


def pick_socket_interface(hosts: list[str], master: str) -> str:
    """The interface every node uses toward `master`, the first node's address (`master_address`)."""
    chosen = {}
    for i, host in enumerate(hosts):
        query = "ip -o -4 addr show" if i == 0 else f"ip -o route get {master}"
        r = _ssh(host, query)
        dev = (interface_holding(r.stdout, master) if i == 0 else route_interface(r.stdout)) if r.returncode == 0 else None
        if dev is None or dev == "lo":
            raise HostCheckError(f"cannot tell which interface host {host!r} uses toward {hosts[0]} ({master}): "
                                 f"`{query}` gave {r.stdout.strip() or r.stderr.strip()!r}; set run.socket_ifname")
        chosen[host] = dev
    if len(set(chosen.values())) > 1:
        raise HostCheckError(f"the nodes reach {hosts[0]} through differently named interfaces ({chosen}), and "
                             "gloo takes one name for every rank: give them one name, then set run.socket_ifname")
    return chosen[hosts[0]]
