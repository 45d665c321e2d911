#!/usr/bin/env bash
# Start a throwaway single-node SLURM cluster (slurmctld + slurmd + munge) on localhost, for the CI test of the
# Snakemake SLURM executor (tests/test_slurm.py). Debian 12, run as root; no systemd and no slurmdbd needed.
# Idempotent: installs the Debian packages if missing, (re)writes /etc/slurm/slurm.conf, starts only what is not
# running, and waits until the node is idle. ~10 s cold (install included), <1 s warm.
#   SLURM_CI_STATE  state dir (pid files, spool, logs); default /tmp/esr-slurm-ci
# Without slurmdbd, `sacct` does not work: Snakemake must use `slurm-status-command: squeue` (tests/slurm/profile),
# otherwise the plugin treats every job as running forever. Finished jobs stay visible to squeue for MinJobAge.
set -euo pipefail
STATE=${SLURM_CI_STATE:-/tmp/esr-slurm-ci}

[ "$(id -u)" -eq 0 ] || { echo "slurm-up.sh: must run as root" >&2; exit 2; }

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null \
    || ! command -v munged >/dev/null; then
  command -v apt-get >/dev/null || { echo "slurm-up.sh: no apt-get (needs Debian/Ubuntu)" >&2; exit 2; }
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
fi

mkdir -p "$STATE"/run "$STATE"/spool/ctld "$STATE"/spool/d "$STATE"/log

# The node line from the real hardware (CPUs, sockets, RealMemory), renamed to localhost so that it does not
# depend on the hostname; slurmd is started with -N localhost.
NODE_LINE=$(slurmd -C | head -n1 | sed -E 's/^NodeName=[^ ]+/NodeName=localhost NodeAddr=127.0.0.1/')
case "$NODE_LINE" in NodeName=localhost*CPUs=*) ;; *) echo "slurm-up.sh: bad slurmd -C output: $NODE_LINE" >&2; exit 1;; esac

mkdir -p /etc/slurm
CONF=$(cat <<CONF_EOF
# Written by tests/slurm/slurm-up.sh (esr CI): single node, no accounting.
ClusterName=esrci
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
ReturnToService=2
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmdPidFile=$STATE/run/slurmd.pid
StateSaveLocation=$STATE/spool/ctld
SlurmdSpoolDir=$STATE/spool/d
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# jobs without --mem would otherwise take the whole node's memory and run one at a time
DefMemPerCPU=512
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc=$STATE/log/jobcomp.txt
# squeue must still list finished jobs when the plugin polls (>= 3 x slurm-init-seconds-before-status-checks)
MinJobAge=300
InactiveLimit=0
KillWait=5
Waittime=0
$NODE_LINE State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
CONF_EOF
)
conf_changed=0
if [ ! -f /etc/slurm/slurm.conf ] || [ "$(cat /etc/slurm/slurm.conf)" != "$CONF" ]; then
  printf '%s\n' "$CONF" > /etc/slurm/slurm.conf
  conf_changed=1
fi

# munge: Debian's postinst creates the key; /run/munge must be made by hand without systemd.
if [ ! -s /etc/munge/munge.key ]; then
  mkdir -p /etc/munge
  mungekey --create --force
  chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
fi
mkdir -p /run/munge && chown munge:munge /run/munge
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  runuser -u munge -- /usr/sbin/munged
  for _ in $(seq 1 20); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.25; done
fi

alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
if alive "$STATE/run/slurmctld.pid"; then
  [ "$conf_changed" -eq 0 ] || scontrol reconfigure
else
  slurmctld
fi
alive "$STATE/run/slurmd.pid" || slurmd -N localhost

state=""
for _ in $(seq 1 120); do
  state=$(sinfo -h -n localhost -o '%T' 2>/dev/null || true)
  case "$state" in idle|mixed|allocated) break;; esac
  sleep 0.5
done
case "$state" in
  idle|mixed|allocated) sinfo ;;
  *) echo "slurm-up.sh: node not ready (state '$state')" >&2; tail -n 30 "$STATE"/log/*.log >&2 || true; exit 1 ;;
esac
