#!/usr/bin/env bash
# Stop the cluster started by tests/slurm/slurm-up.sh: cancel its jobs, stop slurmctld, slurmd and (if it started
# it) munged, and remove the /etc/slurm/slurm.conf it wrote. Idempotent. Leaves the packages and the state dir
# (logs, a copy of the config) in place; `--purge-state` deletes $SLURM_CI_STATE too.
STATE=${SLURM_CI_STATE:-/tmp/esr-slurm-ci}
CONF_FILE=/etc/slurm/slurm.conf
MARKER='# Written by tests/slurm/slurm-up.sh (esr CI)'
ours=0
[ -f "$CONF_FILE" ] && [ "$(head -n1 "$CONF_FILE")" = "$MARKER" ] && ours=1

alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
stop_pidfile() {  # SIGTERM the process named in the pid file, wait up to 5 s, then SIGKILL
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

if [ "$ours" -eq 1 ] && alive "$STATE/run/slurmctld.pid"; then
  # Left-over jobs (e.g. after a timed-out test) would otherwise keep running without their daemons.
  jobs=$(timeout 10 squeue -h -t PENDING,RUNNING,CONFIGURING,COMPLETING -o %i 2>/dev/null || true)
  if [ -n "$jobs" ]; then
    # shellcheck disable=SC2086
    timeout 10 scancel $jobs 2>/dev/null || true
    for _ in $(seq 1 20); do
      [ -z "$(timeout 5 squeue -h -t RUNNING,COMPLETING -o %i 2>/dev/null)" ] && break
      sleep 0.5
    done
  fi
  timeout 10 scontrol shutdown >/dev/null 2>&1 || true   # stops slurmctld and slurmd
fi
stop_pidfile "$STATE/run/slurmd.pid"
stop_pidfile "$STATE/run/slurmctld.pid"
# munged only if slurm-up.sh started it (a munged that was already running belongs to someone else).
if [ -f "$STATE/run/munged.ours" ]; then
  stop_pidfile /run/munge/munged.pid
  rm -f "$STATE/run/munged.ours"
fi
# Only once nothing of ours runs any more (a cluster of another state dir may still use it).
if [ "$ours" -eq 1 ] && ! pgrep -x slurmctld >/dev/null && ! pgrep -x slurmd >/dev/null; then
  rm -f "$CONF_FILE"
  [ -f /etc/slurm/gres.conf ] && [ "$(head -n1 /etc/slurm/gres.conf)" = "$MARKER" ] && rm -f /etc/slurm/gres.conf
fi
if [ "${1:-}" = "--purge-state" ]; then rm -rf "$STATE"; fi
exit 0
