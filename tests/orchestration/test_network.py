"""orchestration.network: the socket interface a worker's Gloo/NCCL use when the user set none,
and the node a worker records. On this machine's real interfaces (lo and whatever else it
has); the multi-node case (each node its own eth0, the hostname on 127.0.1.1) runs in
tests/integration/test_multinode.py. Under a second."""
import ipaddress
import os
import socket
import subprocess

import pytest

from orchestration import network


def ip_addr_table() -> dict[str, set[str]]:
    """`ip -o addr`: the kernel's own list, the oracle for psutil's."""
    out = subprocess.run(["ip", "-o", "addr"], capture_output=True, text=True, check=True).stdout
    table: dict[str, set[str]] = {}
    for line in out.splitlines():
        fields = line.split()
        table.setdefault(fields[1], set()).add(fields[3].split("/")[0])
    return table


def an_outside_address() -> tuple[str, str]:
    """(interface, IPv4) of a non-loopback interface of this machine."""
    for name, ips in ip_addr_table().items():
        for ip in ips:
            if ":" not in ip and not ipaddress.ip_address(ip).is_loopback:
                return name, ip
    pytest.skip("no non-loopback IPv4 interface here")


def test_interfaces_are_the_kernels():
    table = ip_addr_table()
    found = network.interfaces()
    for name, ips in found.items():
        assert set(ips) <= table[name], (name, ips, table[name])
    assert "127.0.0.1" in found["lo"]
    name, ip = an_outside_address()
    assert network.interface_of(ip) == name
    assert network.interface_of("203.0.113.77") is None  # TEST-NET-3: on no interface here


def test_unset_variables_get_the_interface_of_the_address_and_it_is_said_once():
    name, ip = an_outside_address()
    env, said = {}, []
    got = network.pick_socket_interfaces(ip, "the test's node IP", env=env, say=said.append)
    assert got == env == {"GLOO_SOCKET_IFNAME": name, "NCCL_SOCKET_IFNAME": name}
    assert said == [f"[network] GLOO_SOCKET_IFNAME={name} NCCL_SOCKET_IFNAME={name}: the interface of {ip}, "
                    "the test's node IP; set them to choose another"]
    network.pick_socket_interfaces(ip, "the test's node IP", env={}, say=said.append)
    assert len(said) == 1  # once per process


def test_a_value_the_user_set_wins():
    name, ip = an_outside_address()
    env, said = {"GLOO_SOCKET_IFNAME": "ib7"}, []
    got = network.pick_socket_interfaces(ip, "user-set case", env=env, say=said.append)
    assert got == {"GLOO_SOCKET_IFNAME": "ib7", "NCCL_SOCKET_IFNAME": name}
    assert said[0].endswith("(GLOO_SOCKET_IFNAME=ib7 as set); set them to choose another")


def test_an_address_on_no_interface_leaves_them_unset_and_says_why():
    env, said = {}, []
    assert network.pick_socket_interfaces("203.0.113.78", "a NAT'd address", env=env, say=said.append) == {}
    assert env == {}
    assert said[0].startswith("[network] 203.0.113.78 (a NAT'd address) is on no interface of this host (")
    assert "left unset" in said[0]


def test_torchrun_picks_the_interface_towards_master_addr():
    name, ip = an_outside_address()
    env = {"MASTER_ADDR": ip, "MASTER_PORT": "29511", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}
    assert network.pick_for_master(env, say=lambda _: None)["GLOO_SOCKET_IFNAME"] == name
    one = {"MASTER_ADDR": "127.0.0.1", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}
    assert network.pick_for_master(one, say=lambda _: None) == {"GLOO_SOCKET_IFNAME": "lo", "NCCL_SOCKET_IFNAME": "lo"}
    assert network.pick_for_master({}, say=lambda _: None) == {}  # one process: nothing to pick


def test_rank_0s_node_named_on_loopback_takes_the_route_out_when_the_job_spans_nodes():
    """MASTER_ADDR is rank 0's hostname, which on rank 0's own (Debian) node is 127.0.1.1."""
    name, ip = an_outside_address()
    route = subprocess.run(["ip", "route", "get", ip], capture_output=True, text=True).stdout
    env = {"MASTER_ADDR": "127.0.1.1", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "1", "SLURM_LAUNCH_NODE_IPADDR": ip}
    said = []
    got = network.pick_for_master(env, say=said.append)
    expected = route.split(" dev ")[1].split()[0] if " dev lo" not in route else name
    assert got["GLOO_SOCKET_IFNAME"] == expected, (route, got)
    assert "MASTER_ADDR=127.0.1.1 is this node, on loopback here" in said[0]


def test_an_unresolvable_master_addr_names_it():
    with pytest.raises(RuntimeError, match=r"MASTER_ADDR=no-such-host.invalid does not resolve or has no route"):
        network.pick_for_master({"MASTER_ADDR": "no-such-host.invalid"}, say=lambda _: None)


def test_node_identity_names_host_pid_and_slurm_node(monkeypatch):
    monkeypatch.setenv("SLURMD_NODENAME", "gpu-17")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.setattr(network, "_node_address", [])  # no pick yet in this process
    found = network.node_identity()
    assert found["hostname"] == socket.gethostname() and found["pid"] == os.getpid()
    assert found["slurm_node"] == "gpu-17"
    name, ip = an_outside_address()
    monkeypatch.setenv("MASTER_ADDR", ip)
    assert network.node_identity()["ip"] == ip
    # After a pick, the address picked for: on rank 0's node MASTER_ADDR's route is loopback.
    network.pick_socket_interfaces(ip, "identity test", env={}, say=lambda _: None)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    assert network.node_identity()["ip"] == ip
