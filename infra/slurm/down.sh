#!/usr/bin/env bash
# Stop the Slurm that infra/slurm/up.sh started (one node, or one slurmd per node of the local
# cluster): exactly the PIDs it recorded in STATE_DIR/pids (slurmd, slurmctld, munged), never by
# name. The local cluster's namespaces stay (infra/local-cluster/down.sh removes them). Every job still queued on this
# cluster, whoever submitted it, is cancelled first so none is left orphaned. The state folder stays (logs, job state);
# delete it for a clean slate.
#
#   infra/slurm/down.sh [STATE_DIR]   # default: $LZN_SLURM_DIR, else /tmp/lzn-slurm
set -euo pipefail

STATE="${1:-${LZN_SLURM_DIR:-/tmp/lzn-slurm}}"
while [[ "$STATE" == */ && "$STATE" != / ]]; do STATE="${STATE%/}"; done
PIDS="$STATE/pids"
export PATH="$PATH:/usr/sbin:/sbin"

# The PIDs to stop are only as trustworthy as the folder they are read from (see up.sh).
if [[ -e "$STATE" || -L "$STATE" ]]; then
  if [[ -L "$STATE" || "$(stat -c %u "$STATE")" != "$(id -u)" ]]; then
    echo "[slurm-down] error: state folder $STATE is a symlink or not owned by uid $(id -u): not the one up.sh made" >&2
    exit 1
  fi
fi

if [[ ! -f "$PIDS" ]]; then
  echo "[slurm-down] nothing to stop: no $PIDS" >&2
  exit 0
fi
# A recorded PID is ours only while it still runs the program it was recorded for (PIDs get reused).
alive() { [[ -n "${1:-}" && "$(cat "/proc/$1/comm" 2>/dev/null)" == "$2" ]]; }
pid_of() { awk -v n="$1" '$1 == n {print $2}' "$PIDS"; }

# Jobs first, and wait for them to end: slurmstepd outlives a stopped slurmd by design, so a
# job still running when the daemons go would be left behind with nothing to end it.
if [[ -f "$STATE/slurm.conf" ]] && alive "$(pid_of slurmctld)" slurmctld; then
  export SLURM_CONF="$STATE/slurm.conf"
  # Every job, not only ours (`scancel --user` as root would leave other users' jobs running):
  # this is a private cluster, and it is going away.
  squeue -h -o %i 2>/dev/null | xargs -r scancel --quiet || true
  for _ in $(seq 120); do
    [[ -z "$(squeue -h -o %i 2>/dev/null)" ]] && break
    sleep 0.5
  done
  if [[ -n "$(squeue -h -o %i 2>/dev/null)" ]]; then
    echo "[slurm-down] warning: jobs $(squeue -h -o %i | paste -sd,) did not end in 60 s; stopping anyway" >&2
  fi
fi
for name in slurmd slurmctld munged; do  # the reverse of the start order (a slurmd per node)
  for pid in $(pid_of "$name"); do
    alive "$pid" "$name" || continue
    kill -TERM "$pid"
    for _ in $(seq 100); do alive "$pid" "$name" || break; sleep 0.1; done
    if alive "$pid" "$name"; then
      kill -KILL "$pid"
    fi
    echo "[slurm-down] stopped $name ($pid)" >&2
  done
done
rm -f "$PIDS"
