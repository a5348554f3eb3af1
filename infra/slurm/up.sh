#!/usr/bin/env bash
# A Slurm on this machine: munged, slurmctld and slurmd from the Debian packages, with a
# generated slurm.conf, every file in one state folder. For the tests and for trying
# `make slurm` on a laptop; a real site has its own Slurm and never runs this.
#
#   infra/slurm/up.sh [STATE_DIR]     # default: $LZN_SLURM_DIR, else /tmp/lzn-slurm
#   eval "$(infra/slurm/up.sh | tail -n 1)"   # then sinfo, sbatch, make slurm ... use it
#   infra/slurm/up.sh [STATE_DIR] --nodes N   # N nodes on the local cluster (infra/local-cluster/)
#
# One node (no --nodes): this machine is the node. --nodes N: the first N nodes of the local
# cluster in $LZN_CLUSTER_DIR (else /tmp/lzn-cluster; infra/local-cluster/up.sh N first):
# slurmctld on node 1, one slurmd on each node, each in its namespace (NodeName=<name>-node<k>,
# NodeAddr=<subnet>.(10+k)), LZN_SLURM_NODE_CPUS CPUs each (default 1, as the cluster's Ray
# nodes), one munged for all (its socket is a file: the namespaces share the filesystem).
#
# Root is needed (packages, SlurmUser=root, jobs run as the submitting user). Idempotent: with
# the cluster up a second call changes nothing. The PIDs it starts are written to
# STATE_DIR/pids, which infra/slurm/down.sh stops, and nothing else.
#
# Root trusts what is in STATE_DIR (the munge key, the PIDs it stops), and the default is a
# predictable name in a shared /tmp: a folder that is a symlink, not owned by root, or writable
# by group or others is refused, never repaired. A new one is made 0755 (other users' sbatch
# reaches munge's socket in it) with the munge key 0600, and no file in it is written through
# a symlink.
#
# Our own munged on its own socket and key, and our own ports (LZN_SLURMCTLD_PORT,
# LZN_SLURMD_PORT, default 6817/6818), so a system munge or Slurm is left alone. No cgroups
# (proctrack/linuxproc, task/none): that works in a container.
set -euo pipefail

NODES="" NODES_GIVEN=0 ARG_STATE=""
usage="usage: up.sh [STATE_DIR] [--nodes N]"
while (($#)); do
  case "$1" in
    --nodes) NODES_GIVEN=1 NODES="${2:-}"; shift; if (($#)); then shift; fi ;;
    --nodes=*) NODES_GIVEN=1 NODES="${1#--nodes=}"; shift ;;
    -*) echo "[slurm-up] error: unknown option $1; $usage" >&2; exit 2 ;;
    *) [[ -z "$ARG_STATE" ]] || { echo "[slurm-up] error: unexpected argument $1; $usage" >&2; exit 2; }
       ARG_STATE="$1"; shift ;;
  esac
done
if ((NODES_GIVEN)) && ! [[ "$NODES" =~ ^[1-9][0-9]?$ ]]; then
  echo "[slurm-up] error: --nodes ${NODES:-<missing>}: expected a number of nodes of the local cluster, 1 to 99" >&2; exit 2
fi
STATE="${ARG_STATE:-${LZN_SLURM_DIR:-/tmp/lzn-slurm}}"
while [[ "$STATE" == */ && "$STATE" != / ]]; do STATE="${STATE%/}"; done  # -L sees the link itself
CTLD_PORT="${LZN_SLURMCTLD_PORT:-6817}"
SLURMD_PORT="${LZN_SLURMD_PORT:-6818}"
PARTITION="${LZN_SLURM_PARTITION:-debug}"
CONF="$STATE/slurm.conf"
PIDS="$STATE/pids"

say() { echo "[slurm-up] $*" >&2; }
die() { echo "[slurm-up] error: $*" >&2; exit 1; }
# shellcheck source=../lib/state.sh
source "$(dirname "${BASH_SOURCE[0]}")/../lib/state.sh"

[[ $(id -u) == 0 ]] || die "run as root (the local cluster's SlurmUser is root and it may install packages)"

# --- packages -------------------------------------------------------------------------------
missing=()
for pair in slurmctld:slurmctld slurmd:slurmd sbatch:slurm-client munged:munge; do
  command -v "${pair%%:*}" >/dev/null 2>&1 || [[ -x /usr/sbin/${pair%%:*} ]] || missing+=("${pair#*:}")
done
if ((${#missing[@]})); then
  say "installing ${missing[*]} with apt-get"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
fi
export PATH="$PATH:/usr/sbin:/sbin"

# --- where the nodes are: this machine, or the local cluster's namespaces --------------------
CLUSTER_SCRIPTS="$(cd "$(dirname "${BASH_SOURCE[0]}")/../local-cluster" && pwd)"
if [[ -n "$NODES" ]]; then
  CLUSTER="${LZN_CLUSTER_DIR:-/tmp/lzn-cluster}"
  have="$(cat "$CLUSTER/nodes" 2>/dev/null || echo 0)"
  (( have >= NODES )) \
    || die "--nodes $NODES needs a local cluster of at least $NODES nodes in $CLUSTER (it has $have): run infra/local-cluster/up.sh $NODES $CLUSTER first (or set LZN_CLUSTER_DIR)"
  # its names and subnet, as its own scripts read them (and its state folder checked as they do)
  names="$(STATE="$CLUSTER" bash -c 'source "$1/common.sh"; check_state; load_names; echo "$NAME $SUBNET"' _ "$CLUSTER_SCRIPTS")" \
    || die "cannot read the local cluster's names from $CLUSTER"
  read -r CNAME CSUBNET <<< "$names"
  LAYOUT="cluster $CLUSTER $NODES"
else
  LAYOUT="host"
fi
# A daemon on node K (this machine when not on the local cluster): the node's network and UTS
# namespaces and its /etc files (hosts), as exec.sh gives, but the machine's /sys, which
# `ip netns exec` would replace by one without /sys/fs/cgroup, and slurmd needs the cgroup
# plugin to start. The mount namespace is the daemon's own: nothing is mounted on the machine.
on_node() {  # K CMD...
  local k="$1"; shift
  if [[ -z "$NODES" ]]; then "$@"; return; fi
  local ns="$CNAME-node$k"
  [[ -e "/run/netns/$ns" ]] || die "node $k's namespace $ns is gone: run infra/local-cluster/up.sh in $CLUSTER again"
  unshare --mount --propagation slave -- bash -c 'etc="$1" net="$2" uts="$3"; shift 3
    for f in "$etc"/*; do [[ -f "$f" ]] && mount --bind "$f" "/etc/${f##*/}"; done
    exec nsenter --net="$net" --uts="$uts" -- "$@"' _ "/etc/netns/$ns" "/run/netns/$ns" "$CLUSTER/uts/node$k" "$@"
}

# A recorded PID is ours only while it still runs the program it was recorded for (PIDs get reused).
alive() { [[ "${1:-}" =~ ^[0-9]+$ && "$(cat "/proc/$1/comm" 2>/dev/null)" == "$2" ]]; }
recorded() { [[ -f "$PIDS" ]] && awk -v n="$1" '$1 == n {print $2}' "$PIDS"; }
all_alive() {  # NAME COUNT: exactly COUNT processes NAME recorded, each alive
  local pids pid
  pids="$(recorded "$1" || true)"
  [[ "$(grep -c . <<< "$pids" || true)" == "$2" ]] || return 1
  for pid in $pids; do alive "$pid" "$1" || return 1; done
}

# --- the state folder: ours alone to write ------------------------------------------------
mkdir -p "$(dirname "$STATE")"
mkdir -m 0755 "$STATE" 2>/dev/null || true  # fails when it exists: then it is checked like any other
# Every path written below: never through a symlink, which would write wherever it points.
check_state_folder "$STATE" spool ctld log pids layout slurm.conf munge.key munged.pid slurmctld.pid munged.seed

# --- already up? ----------------------------------------------------------------------------
N_NODES="${NODES:-1}"
UP_AS="$(cat "$STATE/layout" 2>/dev/null || echo host)"
if [[ "$UP_AS" != "$LAYOUT" ]] && all_alive slurmctld 1; then
  die "the Slurm in $STATE is up as \"$UP_AS\", not \"$LAYOUT\": run infra/slurm/down.sh $STATE first"
fi
if [[ -f "$CONF" && "$UP_AS" == "$LAYOUT" ]] && all_alive munged 1 && all_alive slurmctld 1 && all_alive slurmd "$N_NODES" \
    && [[ "$(SLURM_CONF="$CONF" sinfo -h -N -o %T 2>/dev/null | grep -cE '^(idle|mixed|allocated|completing)')" == "$N_NODES" ]]; then
  say "already up (state in $STATE)"
  echo "export SLURM_CONF=$CONF"
  exit 0
fi
for name in munged slurmctld slurmd; do  # half up (a crash, a reboot): start over
  for pid in $(recorded "$name" || true); do
    if alive "$pid" "$name"; then
      die "$name (pid $pid) from an earlier up.sh is running but the cluster is not healthy: run infra/slurm/down.sh $STATE first"
    fi
  done
done

mkdir -p "$STATE"/{spool,ctld,log}
chmod 755 "$STATE"
rm -f "$PIDS"
: > "$PIDS"
echo "$LAYOUT" > "$STATE/layout"

# Start NAME and wait for its PID file to name a live NAME (in $started); a PID file left by a
# crashed run is removed first, or the wait would end at once with a dead or reused PID.
started=""
wait_started() {  # NAME PIDFILE SECONDS LOG
  local pid=""
  for _ in $(seq $(($3 * 10))); do
    pid="$( { tr -d '[:space:]' < "$2"; } 2>/dev/null || true)"
    if alive "$pid" "$1"; then started="$pid"; return 0; fi
    sleep 0.1
  done
  die "$1 did not start: ${pid:+pid $pid in }$2 ${pid:+is not a running $1}${pid:-was not written} after $3 s: $(tail -n 20 "$4" 2>/dev/null)"
}

# --- munge: our key, our socket --------------------------------------------------------------
if [[ -e "$STATE/munge.key" && "$(stat -c %u "$STATE/munge.key")" != "$(id -u)" ]]; then
  die "$STATE/munge.key is owned by uid $(stat -c %u "$STATE/munge.key"), expected $(id -u): remove it (a new key is made)"
fi
if [[ ! -s "$STATE/munge.key" ]]; then
  if command -v mungekey >/dev/null 2>&1; then
    mungekey --create --keyfile="$STATE/munge.key" --force >&2
  else
    (umask 077 && dd if=/dev/urandom of="$STATE/munge.key" bs=1 count=1024 status=none)
  fi
fi
chmod 600 "$STATE/munge.key"
SOCKET="$STATE/munge.sock"
rm -f "$SOCKET" "$SOCKET.lock" "$STATE/munged.pid"
munged --force --socket="$SOCKET" --key-file="$STATE/munge.key" --pid-file="$STATE/munged.pid" \
  --log-file="$STATE/log/munged.log" --seed-file="$STATE/munged.seed" 2>>"$STATE/log/munged.log" \
  || die "munged did not start: $(tail -n 5 "$STATE/log/munged.log")"
wait_started munged "$STATE/munged.pid" 5 "$STATE/log/munged.log"
echo "munged $started" >> "$PIDS"

# --- slurm.conf: the nodes as slurmd sees them ----------------------------------------------
MEM_MB=$(( $(awk '/^MemTotal:/ {print $2}' /proc/meminfo) / 1024 * 9 / 10 / N_NODES ))  # leave the OS a tenth
if [[ -n "$NODES" ]]; then
  node_name() { echo "$CNAME-node$1"; }
  NODE="$(node_name 1)"
  CPUS="${LZN_SLURM_NODE_CPUS:-1}"
  CTLD_HOST="$NODE($CSUBNET.11)"
  NODE_LINES="$(for k in $(seq "$NODES"); do
    echo "NodeName=$(node_name "$k") NodeAddr=$CSUBNET.$((10 + k)) NodeHostname=$(node_name "$k") CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN"
  done)"
  NODE_SET="$CNAME-node[1-$NODES]"
  ABOUT="a $NODES-node cluster on the namespaces of the local cluster in $CLUSTER"
else
  node_name() { hostname -s; }
  NODE="$(node_name 1)"
  CPUS="$(nproc)"
  CTLD_HOST="$NODE"
  NODE_LINES="NodeName=$NODE CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN"
  NODE_SET="$NODE"
  ABOUT="a one-node cluster on $NODE"
fi
rm -f "$CONF"
# %n in the slurmd paths: each slurmd (one per node, one filesystem) its own spool, PID and log.
cat > "$CONF" <<EOF
# Generated by infra/slurm/up.sh: $ABOUT. Regenerated on every fresh start.
ClusterName=lzn-local
SlurmctldHost=$CTLD_HOST
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$SOCKET
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool/%n
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.%n.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
# config_overrides: the node is what this file says, whatever the topology slurmd detects
SlurmdParameters=config_overrides
ReturnToService=2
JobRequeue=1
# A requeued or preempted job is killed quickly and may start again at once
KillWait=5
MinJobAge=3600
MpiDefault=none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerParameters=sched_interval=2
$NODE_LINES
PartitionName=$PARTITION Nodes=$NODE_SET Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF

export SLURM_CONF="$CONF"
rm -f "$STATE/slurmctld.pid"
on_node 1 slurmctld -f "$CONF" || die "slurmctld did not start: $(tail -n 20 "$STATE/log/slurmctld.log")"
wait_started slurmctld "$STATE/slurmctld.pid" 10 "$STATE/log/slurmctld.log"
echo "slurmctld $started" >> "$PIDS"
for k in $(seq "$N_NODES"); do
  name="$(node_name "$k")"
  for path in "$STATE/spool/$name" "$STATE/slurmd.$name.pid" "$STATE/log/slurmd.$name.log"; do
    [[ -L "$path" ]] && die "$path is a symlink (to $(readlink "$path")): refusing to write through it; remove it"
  done
  mkdir -p "$STATE/spool/$name"
  rm -f "$STATE/slurmd.$name.pid"
  on_node "$k" slurmd -f "$CONF" -N "$name" || die "slurmd of $name did not start: $(tail -n 20 "$STATE/log/slurmd.$name.log")"
  wait_started slurmd "$STATE/slurmd.$name.pid" 10 "$STATE/log/slurmd.$name.log"
  echo "slurmd $started${NODES:+ $name}" >> "$PIDS"
done

# --- ready: every node idle -----------------------------------------------------------------
deadline=$((SECONDS + 60))
for k in $(seq "$N_NODES"); do
  name="$(node_name "$k")"
  until sinfo -h -n "$name" -o %T 2>/dev/null | grep -qE '^(idle|mixed|allocated)$'; do
    if ((SECONDS > deadline)); then
      die "node $name is not idle after 60 s: $(sinfo -N -l 2>&1 | tail -n 3); logs in $STATE/log"
    fi
    state="$(sinfo -h -n "$name" -o %T 2>/dev/null || true)"
    if [[ "$state" == drain* || "$state" == down* ]]; then
      scontrol update NodeName="$name" State=RESUME >/dev/null 2>&1 || true
    fi
    sleep 0.5
  done
done
say "up: partition $PARTITION, $N_NODES node(s) $NODE_SET ($CPUS CPUs, $MEM_MB MB each); state and logs in $STATE"
echo "export SLURM_CONF=$CONF"
