"""The socket-interface choice of a multi-node run (rlengine/network.py), without a network: the
parsers of `ip` output, and what each rank does before it connects."""
from __future__ import annotations

import socket

import pytest

from rlengine.network import (NetworkSetupError, configure_sockets, interface_addresses, interface_holding,
                              is_multi_node, route_interface)


def test_route_and_address_parsers():
    # as printed by iproute2 on the namespace hosts of tests/netns_hosts.py
    assert route_interface("10.213.7.1 dev rl0 src 10.213.7.2 uid 0 \\    cache ") == "rl0"
    assert route_interface("local 10.213.7.1 dev lo table local src 10.213.7.1 uid 0") == "lo"
    assert route_interface("RTNETLINK answers: Network is unreachable") is None
    shown = ("1: lo    inet 127.0.0.1/8 scope host lo\\       valid_lft forever preferred_lft forever\n"
             "2: rl0    inet 10.213.7.1/24 scope global rl0\\       valid_lft forever preferred_lft forever\n"
             "3: eth0@if9    inet 10.213.7.11/24 scope global eth0")
    assert interface_holding(shown, "10.213.7.1") == "rl0"       # not 10.213.7.11's eth0
    assert interface_holding(shown, "10.213.7.11") == "eth0"
    assert interface_holding(shown, "10.0.0.1") is None


def test_multi_node_is_more_ranks_than_this_node_started():
    assert is_multi_node({"WORLD_SIZE": "2", "LOCAL_SIZE": "1"})
    assert not is_multi_node({"WORLD_SIZE": "2", "LOCAL_SIZE": "2"})
    assert not is_multi_node({})


def test_a_named_interface_is_set_for_gloo_and_nccl():
    env = {"NCCL_SOCKET_IFNAME": "ib0"}
    configure_sockets("lo", env)
    assert env == {"GLOO_SOCKET_IFNAME": "lo", "NCCL_SOCKET_IFNAME": "ib0"}     # a user's NCCL choice stays
    with pytest.raises(NetworkSetupError, match="run.socket_ifname='nosuch0': no such interface"):
        configure_sockets("nosuch0", {})


def test_a_loopback_host_name_stops_a_multi_node_rank_naming_the_key(monkeypatch):
    monkeypatch.setattr(socket, "gethostbyname", lambda name: "127.0.1.1")
    multi = {"WORLD_SIZE": "2", "LOCAL_SIZE": "1"}
    with pytest.raises(NetworkSetupError) as e:
        configure_sockets(None, dict(multi))
    assert "resolves to 127.0.1.1" in str(e.value) and "set run.socket_ifname=<interface>" in str(e.value)
    configure_sockets(None, dict(multi, GLOO_SOCKET_IFNAME="lo"))     # chosen in ~/.deepspeed_env: fine
    configure_sockets(None, {"WORLD_SIZE": "2", "LOCAL_SIZE": "2"})  # one node: loopback is right
    monkeypatch.setattr(socket, "gethostbyname", lambda name: "10.0.0.2")
    configure_sockets(None, dict(multi))                               # a routable address: fine


def test_interfaces_include_loopback():
    assert interface_addresses().get("lo") == "127.0.0.1"


def test_groups_created_without_a_timeout_get_the_runs():
    """DeepSpeed creates its own groups with no timeout, which torch fixes at 30 minutes unless
    told otherwise: run.collective_timeout_s must reach them too (rlengine/patches.py)."""
    from datetime import timedelta

    import torch.distributed.distributed_c10d as c10d

    from rlengine.patches import default_group_timeout

    saved = c10d.default_pg_timeout
    try:
        default_group_timeout(123.0)
        assert c10d._get_default_timeout(c10d.Backend.GLOO) == timedelta(seconds=123)
    finally:
        c10d.default_pg_timeout = saved
