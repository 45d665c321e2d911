#!/usr/bin/env bash
# Stop the cluster started by tests/slurm/slurm-up.sh (slurmctld, slurmd, munged). Idempotent; leaves the packages
# and the state dir (logs) in place; pass --purge-state to delete $SLURM_CI_STATE as well.
STATE=${SLURM_CI_STATE:-/tmp/esr-slurm-ci}

stop_pidfile() {  # stop_pidfile FILE: SIGTERM the process in FILE, wait up to 5 s, then SIGKILL
  local f=$1 pid
  [ -s "$f" ] || return 0
  pid=$(cat "$f")
  if kill -0 "$pid" 2>/dev/null; then
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
    kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$f"
}

if command -v scontrol >/dev/null && [ -f /etc/slurm/slurm.conf ]; then
  timeout 10 scontrol shutdown >/dev/null 2>&1 || true   # stops slurmctld and slurmd
fi
stop_pidfile "$STATE/run/slurmd.pid"
stop_pidfile "$STATE/run/slurmctld.pid"
stop_pidfile /run/munge/munged.pid
[ "${1:-}" = "--purge-state" ] && rm -rf "$STATE"
exit 0
