"""Which interface a worker's collectives use, and where a worker runs.

Gloo and NCCL pick their socket interface from the hostname when GLOO_SOCKET_IFNAME /
NCCL_SOCKET_IFNAME are unset: on a default Debian/Ubuntu host the hostname resolves to
127.0.1.1 (/etc/hosts), so the address a rank advertises is loopback and a peer on another
node fails to connect (`Gloo connectFullMesh failed ... remote=[127.0.0.1]`). The interface a
worker should use is the one that carries its node's address in the cluster: its Ray node
IP, or under torchrun/Slurm the address this node reaches MASTER_ADDR from. A value the user
set wins; each process says once what it chose.
"""
from __future__ import annotations

import ipaddress
import os
import socket
from typing import Callable, MutableMapping

SOCKET_IFNAME_VARS = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")

_said: set[tuple] = set()  # what this process already printed
_node_address: list[str] = []  # the address the last pick was for: this node's, for node_identity


def interfaces() -> dict[str, list[str]]:
    """Interface name -> its IPv4/IPv6 addresses (psutil.net_if_addrs; link-local scopes dropped)."""
    import psutil

    found = {}
    for name, addrs in psutil.net_if_addrs().items():
        ips = [a.address.split("%")[0] for a in addrs if a.family in (socket.AF_INET, socket.AF_INET6)]
        if ips:
            found[name] = ips
    return found


def interface_of(address: str, table: dict[str, list[str]] | None = None) -> str | None:
    """The interface that holds `address` (an IP), None if none does."""
    wanted = ipaddress.ip_address(address)
    for name, ips in (interfaces() if table is None else table).items():
        if any(ipaddress.ip_address(ip) == wanted for ip in ips):
            return name
    return None


def source_address(peer: str, port: int = 29500) -> str:
    """This host's address on the route to `peer` (a name or an IP): what the kernel would
    send from (a UDP connect sends nothing). Raises OSError when `peer` does not resolve or
    has no route."""
    family, _, _, _, sockaddr = socket.getaddrinfo(peer, port, type=socket.SOCK_DGRAM)[0]
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.connect(sockaddr)
        return s.getsockname()[0]


def pick_socket_interfaces(address: str, why: str, *, env: MutableMapping[str, str] | None = None,
                           say: Callable[[str], None] = print) -> dict[str, str]:
    """Set GLOO_SOCKET_IFNAME and NCCL_SOCKET_IFNAME, where unset, to the interface holding
    `address` (this node's address in the cluster; `why` says where it came from, for the
    log line). A set value is kept. Returns the variables as they now are. An address on no
    interface (a NAT'd container) leaves them unset, and says so."""
    env = os.environ if env is None else env
    table = interfaces()
    name = interface_of(address, table)
    if name is not None:
        _node_address[:] = [address]
    chosen, kept = {}, {}
    for var in SOCKET_IFNAME_VARS:
        if env.get(var):
            kept[var] = env[var]
        elif name is not None:
            env[var] = chosen[var] = name
    if chosen:
        line = (f"[network] {' '.join(f'{k}={v}' for k, v in chosen.items())}: the interface of {address}, {why}"
                + (f" ({' '.join(f'{k}={v}' for k, v in kept.items())} as set)" if kept else "")
                + "; set them to choose another")
    elif kept:
        line = f"[network] {' '.join(f'{k}={v}' for k, v in kept.items())} as set"
    else:
        line = (f"[network] {address} ({why}) is on no interface of this host ({', '.join(sorted(table))}): "
                f"{' and '.join(SOCKET_IFNAME_VARS)} left unset, so Gloo/NCCL pick from the hostname; "
                "set them if ranks on other nodes cannot connect")
    key = (line,)
    if key not in _said:
        _said.add(key)
        say(line)
    return {var: env[var] for var in SOCKET_IFNAME_VARS if env.get(var)}


def pick_for_ray_worker() -> dict[str, str]:
    """On a Ray worker: the interface of its Ray node IP."""
    import ray.util

    return pick_socket_interfaces(ray.util.get_node_ip_address(), "this worker's Ray node IP")


def _one_node(env: MutableMapping[str, str]) -> bool:
    """Whether every rank of this job runs on this node (torchrun's LOCAL_WORLD_SIZE, Slurm's
    node count); unknown counts as several nodes."""
    world, local = env.get("WORLD_SIZE"), env.get("LOCAL_WORLD_SIZE")
    if world and local:
        return int(world) <= int(local)
    nodes = env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES")
    return nodes is not None and nodes.strip() == "1"


def pick_for_master(env: MutableMapping[str, str] | None = None,
                    say: Callable[[str], None] = print) -> dict[str, str]:
    """Under torchrun or Slurm (MASTER_ADDR set): the interface this node reaches MASTER_ADDR
    from. On rank 0's own node MASTER_ADDR may be its hostname, which resolves to loopback
    there (127.0.1.1 on Debian): for a job on several nodes that is the interface of the route
    out of this node instead (towards SLURM_LAUNCH_NODE_IPADDR, else the default route), the
    one the other nodes reach it on. Without MASTER_ADDR (one process) nothing is set."""
    env = os.environ if env is None else env
    master = env.get("MASTER_ADDR")
    if not master:
        return {}
    if all(env.get(var) for var in SOCKET_IFNAME_VARS):
        return pick_socket_interfaces("0.0.0.0", "", env=env, say=say)  # both set: only said
    port = int(env.get("MASTER_PORT") or 29500)
    try:
        address = source_address(master, port)
    except OSError as e:
        raise RuntimeError(f"MASTER_ADDR={master} does not resolve or has no route from this node "
                           f"({type(e).__name__}: {e}); expected the address of rank 0's node") from e
    why = f"this node's address towards MASTER_ADDR={master}"
    if ipaddress.ip_address(address).is_loopback and not _one_node(env):
        for target in (env.get("SLURM_LAUNCH_NODE_IPADDR"), "10.255.255.255"):
            try:
                out = source_address(target, port) if target else None
            except OSError:
                continue
            if out and not ipaddress.ip_address(out).is_loopback:
                address = out
                why = (f"this node's route out (MASTER_ADDR={master} is this node, on loopback here, "
                       "and the job spans several nodes)")
                break
    return pick_socket_interfaces(address, why, env=env, say=say)


def node_identity() -> dict:
    """Where this process runs, for its worker record: hostname, pid, and its node's address
    and id from the engine that placed it (Ray: node IP and node id; Slurm: node name)."""
    found = {"hostname": socket.gethostname(), "pid": os.getpid()}
    try:
        import ray

        if ray.is_initialized():
            found["ip"] = ray.util.get_node_ip_address()
            found["node_id"] = ray.get_runtime_context().get_node_id()
    except ImportError:
        pass
    if os.environ.get("SLURMD_NODENAME"):
        found["slurm_node"] = os.environ["SLURMD_NODENAME"]
    if "ip" not in found and _node_address:  # the address pick_for_master found (rank 0's is not MASTER_ADDR's)
        found["ip"] = _node_address[0]
    if "ip" not in found and os.environ.get("MASTER_ADDR"):
        try:
            found["ip"] = source_address(os.environ["MASTER_ADDR"], int(os.environ.get("MASTER_PORT") or 29500))
        except OSError:
            pass
    return found
