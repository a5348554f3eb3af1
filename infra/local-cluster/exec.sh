#!/usr/bin/env bash
# Run CMD on node K of the local cluster: in its network namespace (its eth0 and address), its
# UTS namespace (its hostname) and with its /etc/hosts; the working directory, environment and
# user are this shell's. The state folder is $LZN_CLUSTER_DIR, else /tmp/lzn-cluster.
#
#   infra/local-cluster/exec.sh K CMD...
#   infra/local-cluster/exec.sh 2 hostname               # lzn-node2
#   infra/local-cluster/exec.sh 2 getent hosts lzn-node1 # 10.213.0.11
set -euo pipefail

K="${1:-}"
[[ $# -ge 2 ]] || { echo "[local-cluster] error: usage: exec.sh K CMD..." >&2; exit 2; }
shift
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=common.sh
source "$HERE/common.sh"
check_state
load_names
n="$(node_count)"
[[ "$K" =~ ^[0-9]+$ ]] && (( K >= 1 && K <= n )) \
  || die "node K=$K: expected 1 to $n (the nodes of the cluster in $STATE${n/#0/, which is not up})"
[[ -e "/run/netns/$(netns "$K")" ]] || die "node $K's namespace $(netns "$K") is gone: run infra/local-cluster/up.sh $n $STATE"
exec nsenter --uts="$(uts_of "$K")" -- ip netns exec "$(netns "$K")" "$@"
