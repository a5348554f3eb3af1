# Shared by up.sh, down.sh, exec.sh and kill-node.sh (sourced, never run): the state folder,
# the cluster's names and addresses, and the records of what up.sh made.
#
# The names come from the environment on the first up.sh and are then read from
# STATE/cluster.env, so every later script of that state folder agrees with up.sh:
#   LZN_CLUSTER_NAME    prefix of namespaces, links and hostnames (default lzn: lzn-node1, lznbr0)
#   LZN_CLUSTER_SUBNET  the first three octets of the /24 (default 10.213.0: node k is .(10+k))
# Two clusters on one machine (two engineers' tests at once) need a different name and subnet each.

STATE="${STATE:-${LZN_CLUSTER_DIR:-/tmp/lzn-cluster}}"
while [[ "$STATE" == */ && "$STATE" != / ]]; do STATE="${STATE%/}"; done  # -L sees the link itself
export PATH="$PATH:/usr/sbin:/sbin"
CREATED="$STATE/created"  # one line per thing made: "netns NAME", "link NAME", "uts PATH", "etc DIR"
PIDS="$STATE/pids"        # one line per process started: "NODE NAME PID COMM"

say() { echo "[local-cluster] $*" >&2; }
die() { echo "[local-cluster] error: $*" >&2; exit 1; }

# STATE is refused when root should not trust it (infra/lib/state.sh).
# shellcheck source=../lib/state.sh
source "$(dirname "${BASH_SOURCE[0]}")/../lib/state.sh"
check_state() { check_state_folder "$STATE" created pids cluster.env nodes uts ray log; }

# Names and addresses: from STATE/cluster.env once up.sh has written it, else the environment.
load_names() {
  if [[ -f "$STATE/cluster.env" ]]; then
    # shellcheck disable=SC1091
    source "$STATE/cluster.env"
  else
    NAME="${LZN_CLUSTER_NAME:-lzn}"
    SUBNET="${LZN_CLUSTER_SUBNET:-10.213.0}"
  fi
  [[ "$NAME" =~ ^[a-z][a-z0-9]{0,7}$ ]] \
    || die "LZN_CLUSTER_NAME=$NAME: expected 1 to 8 lower-case letters or digits, starting with a letter (link names are at most 15 characters)"
  [[ "$SUBNET" =~ ^(10|172|192)\.[0-9]{1,3}\.[0-9]{1,3}$ ]] \
    || die "LZN_CLUSTER_SUBNET=$SUBNET: expected the first three octets of a private /24, like 10.213.0"
  BRIDGE="${NAME}br0"
}
netns() { echo "$NAME-node$1"; }      # node k's network namespace
host_of() { echo "$NAME-node$1"; }    # node k's hostname
ip_of() { echo "$SUBNET.$((10 + $1))"; }
gateway() { echo "$SUBNET.1"; }       # the bridge's own address: this machine, seen from the nodes
uts_of() { echo "$STATE/uts/node$1"; }
node_count() { cat "$STATE/nodes" 2>/dev/null || echo 0; }

was_created() { [[ -f "$CREATED" ]] && grep -qxF "$1" "$CREATED"; }
record_created() { was_created "$1" || echo "$1" >> "$CREATED"; }

# A recorded PID is ours only while it still runs the program it was recorded for (PIDs get reused).
alive() { [[ "${1:-}" =~ ^[0-9]+$ && "$(cat "/proc/$1/comm" 2>/dev/null)" == "$2" ]]; }
# "PID COMM" of process NAME on node K, if recorded
recorded() { [[ -f "$PIDS" ]] && awk -v k="$1" -v n="$2" '$1 == k && $2 == n {print $3, $4}' "$PIDS" | tail -n 1; }

# Run on node K: its UTS namespace (hostname), its network namespace and /etc/netns files.
on_node() {
  local k="$1"; shift
  nsenter --uts="$(uts_of "$k")" -- ip netns exec "$(netns "$k")" "$@"
}
