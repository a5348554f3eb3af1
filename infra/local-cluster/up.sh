#!/usr/bin/env bash
# N nodes on this machine: network namespaces joined by a bridge, each with its own address,
# interface (eth0), hostname (a UTS namespace) and /etc/hosts. The filesystem is shared, like a
# cluster's shared storage. For the multi-node tests and for trying multi-node on a laptop.
#
#   infra/local-cluster/up.sh N [STATE_DIR] [--ray]   # default STATE_DIR: $LZN_CLUSTER_DIR, else /tmp/lzn-cluster
#   infra/local-cluster/exec.sh K CMD...              # run CMD on node K
#   infra/local-cluster/down.sh [STATE_DIR]
#
# Node k is namespace lzn-node<k>, address 10.213.0.(10+k)/24 on its eth0, hostname lzn-node<k>;
# the bridge lznbr0 holds 10.213.0.1 (this machine, reachable from every node). Each node's
# hosts file (/etc/netns/lzn-node<k>/hosts, which `ip netns exec` mounts over /etc/hosts) maps
# its own name to 127.0.1.1, as a default Debian host does, and every other node's name to its
# address. With --ray: a Ray head on node 1 (GCS port 6379, dashboard and Jobs API on
# 10.213.0.11:8265) and a Ray worker node on each other node, 1 CPU each (LZN_CLUSTER_CPUS).
#
# Idempotent: what exists and was recorded is kept, what is missing is made, so a second call
# changes nothing and, after kill-node.sh K, brings node K's Ray back. Everything made is
# recorded in STATE_DIR/created and STATE_DIR/pids; down.sh removes exactly that. Root needed.
set -euo pipefail

N="" RAY=0 ARG_STATE=""
for arg in "$@"; do
  case "$arg" in
    --ray) RAY=1 ;;
    -*) echo "[local-cluster] error: unknown option $arg; expected --ray" >&2; exit 2 ;;
    *) if [[ -z "$N" ]]; then N="$arg"; elif [[ -z "$ARG_STATE" ]]; then ARG_STATE="$arg"; else
         echo "[local-cluster] error: unexpected argument $arg; usage: up.sh N [STATE_DIR] [--ray]" >&2; exit 2; fi ;;
  esac
done
[[ "$N" =~ ^[1-9][0-9]?$ && "$N" -le 40 ]] \
  || { echo "[local-cluster] error: N=${N:-<missing>}: expected the number of nodes, 1 to 40; usage: up.sh N [STATE_DIR] [--ray]" >&2; exit 2; }
STATE="${ARG_STATE:-${LZN_CLUSTER_DIR:-/tmp/lzn-cluster}}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=common.sh
source "$HERE/common.sh"

[[ $(id -u) == 0 ]] || die "run as root (network namespaces, links and UTS namespaces need it)"
for tool in ip nsenter unshare; do command -v "$tool" >/dev/null || die "$tool is missing (packages iproute2, util-linux)"; done

mkdir -p "$(dirname "$STATE")"
mkdir -m 0755 "$STATE" 2>/dev/null || true
check_state
load_names
if [[ -f "$STATE/nodes" && "$(node_count)" != "$N" ]]; then
  die "the cluster in $STATE has $(node_count) nodes, not $N: run infra/local-cluster/down.sh $STATE first"
fi
mkdir -p "$STATE/uts" "$STATE/log"
touch "$CREATED" "$PIDS"
if [[ ! -f "$STATE/cluster.env" ]]; then
  printf 'NAME=%s\nSUBNET=%s\n' "$NAME" "$SUBNET" > "$STATE/cluster.env"
fi
echo "$N" > "$STATE/nodes"

# Something of this name that up.sh did not record is someone else's (or a crashed cluster
# whose state folder is gone): never adopted, never changed.
claim() {  # KIND NAME EXISTS-COMMAND...: 0 if to be made, 1 if ours and present
  local kind="$1" name="$2"; shift 2
  if "$@" >/dev/null 2>&1; then
    was_created "$kind $name" && return 1
    local hint="ip $kind del $name"
    [[ "$kind" == etc ]] && hint="rm -r $name"
    die "$kind $name exists but is not recorded in $CREATED: not ours, left alone (if it is a leftover of a cluster whose state folder is gone: $hint)"
  fi
  return 0
}

# --- the bridge: this machine's side, SUBNET.1 ---------------------------------------------
if claim link "$BRIDGE" ip link show "$BRIDGE"; then
  other="$(ip -o -4 addr show | awk -v s="$SUBNET." 'index($4, s) == 1 {print $2}' | head -n 1)"
  [[ -z "$other" ]] || die "the subnet $SUBNET.0/24 is already on interface $other: pick another with LZN_CLUSTER_SUBNET"
  ip link add "$BRIDGE" type bridge
  record_created "link $BRIDGE"
  ip addr add "$(gateway)/24" dev "$BRIDGE"
  ip link set "$BRIDGE" up
fi

hosts_file() {  # K: node K's /etc/hosts
  local k="$1" j
  echo "# Written by infra/local-cluster/up.sh for node $k of $N"
  echo "127.0.0.1 localhost"
  echo "127.0.1.1 $(host_of "$k")"  # its own name on loopback, as on a default Debian host
  echo "::1 localhost ip6-localhost ip6-loopback"
  for j in $(seq "$N"); do
    [[ "$j" == "$k" ]] || echo "$(ip_of "$j") $(host_of "$j")"
  done
}

for k in $(seq "$N"); do
  ns="$(netns "$k")" veth="${NAME}v$k"
  if claim netns "$ns" test -e "/run/netns/$ns"; then
    ip netns add "$ns"
    record_created "netns $ns"
    ip link add "$veth" type veth peer name eth0 netns "$ns"
    record_created "link $veth"
    ip link set "$veth" master "$BRIDGE" up
    ip -n "$ns" link set lo up
    ip -n "$ns" addr add "$(ip_of "$k")/24" dev eth0
    ip -n "$ns" link set eth0 up
    ip -n "$ns" route add default via "$(gateway)"  # as a real host has one (Ray's own IP guess uses it)
  fi
  if [[ ! -d /etc/netns ]]; then mkdir /etc/netns; record_created "etc /etc/netns"; fi
  etc="/etc/netns/$ns"
  if claim etc "$etc" test -e "$etc"; then
    mkdir -p "$etc"
    record_created "etc $etc"
    hosts_file "$k" > "$etc/hosts"
    host_of "$k" > "$etc/hostname"
  fi
  uts="$(uts_of "$k")"
  if ! was_created "uts $uts" || [[ "$(nsenter --uts="$uts" hostname 2>/dev/null)" != "$(host_of "$k")" ]]; then
    [[ -L "$uts" ]] && die "$uts is a symlink: refusing to mount over it"
    touch "$uts"
    unshare --uts="$uts" hostname "$(host_of "$k")"  # the namespace lives on as a bind mount of $uts
    record_created "uts $uts"
  fi
done
say "up: $N nodes $(netns 1)..$(netns "$N") on $BRIDGE, $(ip_of 1)..$(ip_of "$N"), this machine $(gateway); state in $STATE"

[[ "$RAY" == 1 ]] || exit 0

# --- Ray: head on node 1, a worker node on each other node ---------------------------------
ROOT="$(cd "$HERE/../.." && pwd)"
RAY_BIN="${LZN_CLUSTER_RAY:-}"
if [[ -z "$RAY_BIN" ]]; then
  if [[ -x "$ROOT/.venv/bin/ray" ]]; then RAY_BIN="$ROOT/.venv/bin/ray"; else RAY_BIN="$(command -v ray || true)"; fi
fi
[[ -x "$RAY_BIN" ]] || die "no ray executable: set LZN_CLUSTER_RAY or make the project's .venv"
CPUS="${LZN_CLUSTER_CPUS:-1}"
GCS_PORT="${LZN_CLUSTER_RAY_PORT:-6379}"
DASHBOARD_PORT="${LZN_CLUSTER_DASHBOARD_PORT:-8265}"
STORE_MB="${LZN_CLUSTER_OBJECT_STORE_MB:-512}"
# Ray's socket paths live under the temp dir and are limited to 107 characters.
(( ${#STATE} <= 48 )) || die "state folder $STATE is ${#STATE} characters: Ray's socket paths under it would pass their limit; use one of at most 48"
mkdir -p "$STATE/ray"

# Token authentication with the cluster's own token, as a shared cluster has it: a client needs
# RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH (both in STATE/ray.env).
TOKEN="$STATE/ray/auth_token"
[[ -L "$TOKEN" ]] && die "$TOKEN is a symlink: refusing to use it"
if [[ ! -s "$TOKEN" ]]; then (umask 077 && od -An -N32 -tx1 /dev/urandom | tr -d ' \n' > "$TOKEN"); fi
chmod 600 "$TOKEN"
export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$TOKEN"
unset RAY_AUTH_TOKEN RAY_ADDRESS

start_ray() {  # K NAME ARGS...: `ray start --block` on node K in a session of its own
  local k="$1" name="$2"; shift 2
  local rec; rec="$(recorded "$k" "$name")"
  # shellcheck disable=SC2086
  if [[ -n "$rec" ]] && alive $rec; then return 0; fi
  mkdir -p "$STATE/ray/n$k"
  local log="$STATE/log/$name-node$k.log"
  [[ -f "$log" ]] && mv -f "$log" "$log.prev"
  # setsid: a session of its own; nsenter and `ip netns exec` exec, so $! is ray itself.
  # RAY_ADDRESS in every Ray process's environment: Ray's state API, which Ray Train's
  # controller actors call without an address, would otherwise look for a cluster by scanning
  # this machine's processes, and here it sees every node's GCS (and any other Ray).
  # No Ray memory monitor: every node sees the whole machine's memory, not its own, so a node
  # would kill its workers for what other nodes (and anything else here) use; the kernel's
  # OOM killer still acts on a real shortage. RAY_memory_monitor_refresh_ms set here wins.
  RAY_memory_monitor_refresh_ms="${RAY_memory_monitor_refresh_ms:-0}" \
  RAY_ADDRESS="$(ip_of 1):$GCS_PORT" setsid nsenter --uts="$(uts_of "$k")" -- ip netns exec "$(netns "$k")" \
    "$RAY_BIN" start --block --node-ip-address="$(ip_of "$k")" --num-cpus="$CPUS" \
    --object-store-memory=$((STORE_MB * 1024 * 1024)) --temp-dir="$STATE/ray/n$k" --disable-usage-stats "$@" \
    > "$log" 2>&1 < /dev/null &
  local pid=$! comm="" want; want="$(basename "$RAY_BIN" | cut -c1-15)"
  for _ in $(seq 200); do  # setsid, nsenter and ip exec in turn until it is ray (slow on a busy machine)
    comm="$(cat "/proc/$pid/comm" 2>/dev/null || true)"
    [[ -n "$comm" && "$comm" == "$want" ]] && break
    [[ -n "$comm" ]] || die "$name on node $k exited at once: $(tail -n 20 "$log")"
    sleep 0.1
  done
  [[ "$comm" == "$want" ]] || die "$name on node $k (pid $pid) is still '$comm' after 20 s, not $want"
  echo "$k $name $pid $comm" >> "$PIDS"
}

# `ray start` says "Ray runtime started" once its node is registered with the GCS.
wait_ray() {  # K NAME
  local deadline=$((SECONDS + 120)) log="$STATE/log/$2-node$1.log"
  until grep -q "Ray runtime started" "$log" 2>/dev/null; do
    local rec; rec="$(recorded "$1" "$2")"
    # shellcheck disable=SC2086
    alive $rec || die "$2 on node $1 stopped: $(tail -n 20 "$log")"
    ((SECONDS < deadline)) || die "$2 on node $1 did not start in 120 s; log $log"
    sleep 0.5
  done
}

start_ray 1 ray-head --head --port="$GCS_PORT" --include-dashboard=true --dashboard-host="$(ip_of 1)" \
  --dashboard-port="$DASHBOARD_PORT"
wait_ray 1 ray-head
for k in $(seq 2 "$N"); do
  start_ray "$k" ray-worker --address="$(ip_of 1):$GCS_PORT"
done
for k in $(seq 2 "$N"); do wait_ray "$k" ray-worker; done
cat > "$STATE/ray.env" <<ENV
RAY_ADDRESS=$(ip_of 1):$GCS_PORT
RAY_API_SERVER_ADDRESS=http://$(ip_of 1):$DASHBOARD_PORT
RAY_AUTH_MODE=token
RAY_AUTH_TOKEN_PATH=$TOKEN
ENV
say "ray: head $(ip_of 1):$GCS_PORT, Jobs API http://$(ip_of 1):$DASHBOARD_PORT, $N nodes of $CPUS CPU"
sed "s/^/export /" "$STATE/ray.env" | paste -sd";"
