#!/usr/bin/env bash
# A single-node Slurm on this machine: munged, slurmctld and slurmd from the Debian packages,
# with a generated slurm.conf, every file in one state folder. For the tests and for trying
# `make slurm` on a laptop; a real site has its own Slurm and never runs this.
#
#   infra/slurm/up.sh [STATE_DIR]     # default: $LZN_SLURM_DIR, else /tmp/lzn-slurm
#   eval "$(infra/slurm/up.sh | tail -n 1)"   # then sinfo, sbatch, make slurm ... use it
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

STATE="${1:-${LZN_SLURM_DIR:-/tmp/lzn-slurm}}"
while [[ "$STATE" == */ && "$STATE" != / ]]; do STATE="${STATE%/}"; done  # -L sees the link itself
CTLD_PORT="${LZN_SLURMCTLD_PORT:-6817}"
SLURMD_PORT="${LZN_SLURMD_PORT:-6818}"
PARTITION="${LZN_SLURM_PARTITION:-debug}"
CONF="$STATE/slurm.conf"
PIDS="$STATE/pids"

say() { echo "[slurm-up] $*" >&2; }
die() { echo "[slurm-up] error: $*" >&2; exit 1; }

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

# A recorded PID is ours only while it still runs the program it was recorded for (PIDs get reused).
alive() { [[ "${1:-}" =~ ^[0-9]+$ && "$(cat "/proc/$1/comm" 2>/dev/null)" == "$2" ]]; }
recorded() { [[ -f "$PIDS" ]] && awk -v n="$1" '$1 == n {print $2}' "$PIDS"; }

# --- the state folder: ours alone to write ------------------------------------------------
mkdir -p "$(dirname "$STATE")"
mkdir -m 0755 "$STATE" 2>/dev/null || true  # fails when it exists: then it is checked like any other
[[ -L "$STATE" ]] && die "state folder $STATE is a symlink (to $(readlink "$STATE")): refusing to trust it; pass a real folder"
[[ -d "$STATE" ]] || die "state folder $STATE is not a folder"
owner="$(stat -c %u "$STATE")"
[[ "$owner" == "$(id -u)" ]] \
  || die "state folder $STATE is owned by uid $owner, expected $(id -u) ($(id -un)): someone else may have planted it; remove it or pass another folder"
mode="$(stat -c %a "$STATE")"
(( (8#$mode & 8#022) == 0 )) \
  || die "state folder $STATE has mode $mode, writable by group or others; expected 0755 or tighter (chmod go-w $STATE, if its contents are yours)"
# Every path written below: never through a symlink, which would write wherever it points.
for path in "$STATE"/{spool,ctld,log,pids,slurm.conf,munge.key,munged.pid,slurmctld.pid,slurmd.pid,munged.seed}; do
  [[ -L "$path" ]] && die "$path is a symlink (to $(readlink "$path")): refusing to write through it; remove it"
done

# --- already up? ----------------------------------------------------------------------------
if [[ -f "$CONF" ]] && alive "$(recorded munged)" munged && alive "$(recorded slurmctld)" slurmctld && alive "$(recorded slurmd)" slurmd \
    && SLURM_CONF="$CONF" sinfo -h -o %T 2>/dev/null | grep -qE '^(idle|mixed|allocated|completing)'; then
  say "already up (state in $STATE)"
  echo "export SLURM_CONF=$CONF"
  exit 0
fi
for name in munged slurmctld slurmd; do  # half up (a crash, a reboot): start over
  if alive "$(recorded "$name")" "$name"; then
    die "$name (pid $(recorded "$name")) from an earlier up.sh is running but the cluster is not healthy: run infra/slurm/down.sh $STATE first"
  fi
done

mkdir -p "$STATE"/{spool,ctld,log}
chmod 755 "$STATE"
rm -f "$PIDS"
: > "$PIDS"

# Start NAME and wait for its PID file to name a live NAME (in $started); a PID file left by a
# crashed run is removed first, or the wait would end at once with a dead or reused PID.
started=""
wait_started() {  # NAME PIDFILE SECONDS LOG
  local pid=""
  for _ in $(seq $(($3 * 10))); do
    pid="$(tr -d '[:space:]' < "$2" 2>/dev/null || true)"
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

# --- slurm.conf: this node as slurmd sees it ------------------------------------------------
NODE="$(hostname -s)"
CPUS="$(nproc)"
MEM_MB=$(( $(awk '/^MemTotal:/ {print $2}' /proc/meminfo) / 1024 * 9 / 10 ))  # leave the OS a tenth
rm -f "$CONF"
cat > "$CONF" <<EOF
# Generated by infra/slurm/up.sh: a one-node cluster on $NODE. Regenerated on every fresh start.
ClusterName=lzn-local
SlurmctldHost=$NODE
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$SOCKET
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
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
NodeName=$NODE CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF

export SLURM_CONF="$CONF"
rm -f "$STATE/slurmctld.pid"
slurmctld -f "$CONF" || die "slurmctld did not start: $(tail -n 20 "$STATE/log/slurmctld.log")"
wait_started slurmctld "$STATE/slurmctld.pid" 10 "$STATE/log/slurmctld.log"
echo "slurmctld $started" >> "$PIDS"
rm -f "$STATE/slurmd.pid"
slurmd -f "$CONF" -N "$NODE" || die "slurmd did not start: $(tail -n 20 "$STATE/log/slurmd.log")"
wait_started slurmd "$STATE/slurmd.pid" 10 "$STATE/log/slurmd.log"
echo "slurmd $started" >> "$PIDS"

# --- ready: the node idle -------------------------------------------------------------------
deadline=$((SECONDS + 60))
until sinfo -h -n "$NODE" -o %T 2>/dev/null | grep -qE '^(idle|mixed|allocated)$'; do
  if ((SECONDS > deadline)); then
    die "node $NODE is not idle after 60 s: $(sinfo -N -l 2>&1 | tail -n 3); logs in $STATE/log"
  fi
  state="$(sinfo -h -n "$NODE" -o %T 2>/dev/null || true)"
  if [[ "$state" == drain* || "$state" == down* ]]; then
    scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1 || true
  fi
  sleep 0.5
done
say "up: partition $PARTITION, node $NODE ($CPUS CPUs, $MEM_MB MB); state and logs in $STATE"
echo "export SLURM_CONF=$CONF"
