#!/usr/bin/env bash
# Lose node K: SIGKILL every process running on it (everything inside its network namespace,
# as `ip netns pids` lists it), as a machine that dies would. The node's namespace, address
# and hostname stay, so `up.sh N --ray` brings its Ray back. Node 1 holds the Ray head.
#
#   infra/local-cluster/kill-node.sh K [STATE_DIR]
set -euo pipefail

K="${1:-}"
[[ $# -ge 1 && $# -le 2 ]] || { echo "[local-cluster] error: usage: kill-node.sh K [STATE_DIR]" >&2; exit 2; }
STATE="${2:-${LZN_CLUSTER_DIR:-/tmp/lzn-cluster}}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=common.sh
source "$HERE/common.sh"
check_state
load_names
n="$(node_count)"
[[ "$K" =~ ^[0-9]+$ ]] && (( K >= 1 && K <= n )) || die "node K=$K: expected 1 to $n"
ns="$(netns "$K")"
was_created "netns $ns" || die "$ns is not recorded in $CREATED"
killed=0
for _ in $(seq 20); do  # until none is left: a dying parent may have just forked
  pids="$(ip netns pids "$ns" | tr '\n' ' ')"
  [[ -n "${pids// }" ]] || break
  # shellcheck disable=SC2086
  kill -KILL $pids 2>/dev/null || true
  killed=$((killed + $(wc -w <<< "$pids")))
  sleep 0.1
done
[[ -z "$(ip netns pids "$ns")" ]] || die "processes still run on $ns after SIGKILL: $(ip netns pids "$ns" | tr '\n' ' ')"
say "node $K ($ns): killed $killed processes"
