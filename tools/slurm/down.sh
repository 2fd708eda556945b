#!/usr/bin/env bash
# Stop the cluster tools/slurm/up.sh started in STATE_DIR: its jobs, then its slurmd, slurmctld and
# munged, by the pids in their pid files (nothing else). Keeps STATE_DIR (logs) unless --rm.
#   tools/slurm/down.sh STATE_DIR [--rm]
set -uo pipefail
state=${1:?usage: down.sh STATE_DIR [--rm]}
[ -d "$state" ] || exit 0
export SLURM_CONF=$state/slurm.conf
[ -f "$SLURM_CONF" ] && timeout 10 scancel --full --quiet --user=root 2>/dev/null
# SIGTERM to each daemon of its pid file, then SIGKILL to those still there after 10 s.
pids=()
for f in "$state"/run/slurmd-*.pid "$state/run/slurmctld.pid" "$state/munge/munged.pid"; do
  pid=$(cat "$f" 2>/dev/null) || continue
  [ -n "$pid" ] && kill "$pid" 2>/dev/null && pids+=("$pid")
done
for _ in $(seq 1 50); do
  alive=0
  for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
  [ "$alive" = 0 ] && break
  sleep 0.2
done
for pid in "${pids[@]}"; do kill -9 "$pid" 2>/dev/null; done
[ "${2:-}" = --rm ] && rm -rf "$state"
exit 0
