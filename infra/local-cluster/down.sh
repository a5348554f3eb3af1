#!/usr/bin/env bash
# Remove the cluster that infra/local-cluster/up.sh made, and only that: the processes it
# recorded in STATE_DIR/pids (by PID, each checked to still run the program recorded), then any
# process still inside its namespaces (every process there was started on its nodes, through
# exec.sh or by Ray), then the namespaces, links, UTS namespaces and /etc/netns folders listed
# in STATE_DIR/created, by name. The state folder stays (logs); delete it for a clean slate.
#
#   infra/local-cluster/down.sh [STATE_DIR]   # default: $LZN_CLUSTER_DIR, else /tmp/lzn-cluster
set -euo pipefail

[[ $# -le 1 ]] || { echo "[local-cluster] error: usage: down.sh [STATE_DIR]" >&2; exit 2; }
STATE="${1:-${LZN_CLUSTER_DIR:-/tmp/lzn-cluster}}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=common.sh
source "$HERE/common.sh"

if [[ ! -e "$STATE" && ! -L "$STATE" ]]; then say "nothing to remove: no $STATE"; exit 0; fi
check_state
if [[ ! -f "$CREATED" && ! -f "$PIDS" ]]; then say "nothing to remove: no records in $STATE"; exit 0; fi
load_names
[[ $(id -u) == 0 ]] || die "run as root"

# 1. Recorded processes: TERM their session, wait, then KILL.
stop_pid() {  # PID COMM WHAT
  alive "$1" "$2" || return 0
  kill -TERM -- "-$1" 2>/dev/null || kill -TERM "$1" 2>/dev/null || true
  for _ in $(seq 50); do alive "$1" "$2" || break; sleep 0.1; done
  if alive "$1" "$2"; then kill -KILL -- "-$1" 2>/dev/null || kill -KILL "$1" 2>/dev/null || true; fi
  say "stopped $3 ($1)"
}
if [[ -f "$PIDS" ]]; then
  # Workers before the head, so none waits on a head that is gone.
  while read -r k name pid comm; do
    [[ -n "${pid:-}" ]] && stop_pid "$pid" "$comm" "$name on node $k"
  done < <(sort -k1,1nr "$PIDS")
fi

# 2. Whatever still runs inside our namespaces (Ray's workers, a test's servers).
namespaces=()
[[ -f "$CREATED" ]] && mapfile -t namespaces < <(awk '$1 == "netns" {print $2}' "$CREATED")
for ns in "${namespaces[@]}"; do
  [[ -e "/run/netns/$ns" ]] || continue
  for sig in TERM KILL; do
    pids="$(ip netns pids "$ns" 2>/dev/null | tr '\n' ' ')"
    [[ -n "${pids// }" ]] || break
    say "$sig to what still runs on $ns: $pids"
    # shellcheck disable=SC2086
    kill -"$sig" $pids 2>/dev/null || true
    for _ in $(seq 30); do [[ -z "$(ip netns pids "$ns" 2>/dev/null)" ]] && break; sleep 0.1; done
  done
done

# 3. What up.sh made, in reverse order of making.
if [[ -f "$CREATED" ]]; then
  while read -r kind what; do
    case "$kind" in
      uts) if mountpoint -q "$what" 2>/dev/null || findmnt -rn "$what" >/dev/null 2>&1; then umount "$what"; fi
           rm -f "$what" ;;
      etc) if [[ "$what" == /etc/netns ]]; then rmdir /etc/netns 2>/dev/null || true  # only if empty: another cluster's
           elif [[ "$what" == /etc/netns/"$NAME"-node* ]]; then rm -rf -- "$what"; fi ;;
      netns) [[ -e "/run/netns/$what" ]] && ip netns del "$what" ;;
      link) ip link show "$what" >/dev/null 2>&1 && ip link del "$what" ;;
      *) say "warning: unknown record '$kind $what' in $CREATED, left alone" ;;
    esac
  done < <(tac "$CREATED")
fi
rm -f "$CREATED" "$PIDS" "$STATE/nodes" "$STATE/cluster.env"
say "down: $STATE"
