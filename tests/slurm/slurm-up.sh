#!/usr/bin/env bash
# Start a throwaway single-node SLURM cluster (slurmctld + slurmd + munge) on localhost, for the CI test of the
# Snakemake SLURM executor (tests/test_slurm.py). Debian/Ubuntu, run as root; needs neither systemd nor slurmdbd.
# Idempotent: installs the Debian packages if missing, (re)writes the config, starts only what is not running,
# then waits until the node is idle. ~10-20 s cold (apt install included), <1 s when already up.
#
#   SLURM_CI_STATE  state dir: pid files, spool, logs, a copy of slurm.conf (default /tmp/esr-slurm-ci)
#   SLURM_CI_CPUS, SLURM_CI_MEM_MB, SLURM_CI_GPUS  fake node resources (default: unset = the real hardware from
#                   `slurmd -C`, no GPUs). When any is set, the node advertises that many CPUs, that much RealMemory
#                   (MB) and `Gres=gpu:N` (gres.conf: AutoDetect off, fake device nodes in the state dir), and slurmd
#                   runs with SlurmdParameters=config_overrides so it accepts a node larger than the machine. No
#                   cgroups (task/none): bookkeeping only, jobs oversubscribe the real cores. For the rehearsal of the
#                   paper plan (tests/test_rehearsal.py: the 70B's --gpus=4 --mem=400000 job).
#
# The config goes to /etc/slurm/slurm.conf: the nested `srun` that Snakemake's slurm-jobstep plugin runs inside
# each job drops every SLURM_* variable (SLURM_CONF included), so a private config path would not reach it.
# An /etc/slurm/slurm.conf that this script did not write (a real SLURM set-up) is never touched: exit 3.
# Without slurmdbd, `sacct` does not work: Snakemake must use `slurm-status-command: squeue` (tests/slurm/profile),
# or the plugin waits forever. Finished jobs stay visible to squeue for MinJobAge (SLURM_CI_MIN_JOB_AGE seconds,
# default 300; the rehearsal sets it above its run time so that every job's final state can be checked at the end).
# Exit codes: 0 up; 1 failed to start; 2 unsupported here (not root / no apt); 3 another SLURM set-up is here.
set -euo pipefail
STATE=${SLURM_CI_STATE:-/tmp/esr-slurm-ci}
CONF_FILE=/etc/slurm/slurm.conf
MARKER='# Written by tests/slurm/slurm-up.sh (esr CI)'

[ "$(id -u)" -eq 0 ] || { echo "slurm-up.sh: must run as root" >&2; exit 2; }

if [ -f "$CONF_FILE" ] && [ "$(head -n1 "$CONF_FILE")" != "$MARKER" ]; then
  echo "slurm-up.sh: $CONF_FILE exists and was not written by this script (a real SLURM set-up?); not touching it" >&2
  exit 3
fi

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null \
    || ! command -v munged >/dev/null; then
  command -v apt-get >/dev/null || { echo "slurm-up.sh: SLURM is not installed and there is no apt-get" >&2; exit 2; }
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
fi

mkdir -p "$STATE"/run "$STATE"/spool/ctld "$STATE"/spool/d "$STATE"/log

alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
# Refuse to start a second slurmctld/slurmd next to one we did not start.
for d in slurmctld slurmd; do
  if pgrep -x "$d" >/dev/null && ! alive "$STATE/run/$d.pid"; then
    echo "slurm-up.sh: a $d not started with this state dir ($STATE) is already running; not touching it" >&2
    exit 3
  fi
done

# The node line from the real hardware (CPUs, sockets, RealMemory), renamed to localhost so that it does not
# depend on the hostname (slurmd is started with -N localhost). A hand-written line with more CPUs or memory
# than the machine has makes the node INVAL/drained.
NODE_LINE=$(slurmd -C | head -n1 | sed -E 's/^NodeName=[^ ]+/NodeName=localhost NodeAddr=127.0.0.1/')
case "$NODE_LINE" in
  NodeName=localhost*CPUs=*) ;;
  *) echo "slurm-up.sh: unexpected 'slurmd -C' output: $NODE_LINE" >&2; exit 1 ;;
esac

# Fake resources (see the header): a hand-written node line, and the settings that let slurmd accept it.
FAKE_CPUS=${SLURM_CI_CPUS:-}
FAKE_MEM=${SLURM_CI_MEM_MB:-}
FAKE_GPUS=${SLURM_CI_GPUS:-}
EXTRA_CONF=""
GRES_CONF=""
if [ -n "$FAKE_CPUS$FAKE_MEM$FAKE_GPUS" ]; then
  for v in "$FAKE_CPUS" "$FAKE_MEM" "$FAKE_GPUS"; do
    [ -z "$v" ] || [[ "$v" =~ ^[0-9]+$ ]] || { echo "slurm-up.sh: SLURM_CI_CPUS/MEM_MB/GPUS must be integers, got '$v'" >&2; exit 1; }
  done
  real_cpus=$(sed -nE 's/.* CPUs=([0-9]+).*/\1/p' <<<"$NODE_LINE")
  real_mem=$(sed -nE 's/.* RealMemory=([0-9]+).*/\1/p' <<<"$NODE_LINE")
  cpus=${FAKE_CPUS:-$real_cpus}
  NODE_LINE="NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus Boards=1 SocketsPerBoard=1 CoresPerSocket=$cpus ThreadsPerCore=1 RealMemory=${FAKE_MEM:-$real_mem}"
  EXTRA_CONF="# Fake node resources (SLURM_CI_CPUS/MEM_MB/GPUS): slurmd takes the node line as given, not the hardware.
SlurmdParameters=config_overrides"
  if [ -n "$FAKE_GPUS" ] && [ "$FAKE_GPUS" -gt 0 ]; then
    NODE_LINE="$NODE_LINE Gres=gpu:$FAKE_GPUS"
    EXTRA_CONF="$EXTRA_CONF
GresTypes=gpu"
    # SLURM 22.05 drops a GPU without File= ("Removing file-less GPU"), so each fake GPU is a character device
    # node with /dev/null's numbers in the state dir: SLURM books it (and sets CUDA_VISIBLE_DEVICES), nothing opens it.
    mkdir -p "$STATE/fakedev"
    for i in $(seq 0 $((FAKE_GPUS - 1))); do
      [ -c "$STATE/fakedev/gpu$i" ] || mknod "$STATE/fakedev/gpu$i" c 1 3
    done
    GRES_CONF="$MARKER
# Fake GPUs (SLURM_CI_GPUS): device nodes with /dev/null's numbers; SLURM books them, nothing binds them.
AutoDetect=off
NodeName=localhost Name=gpu File=$STATE/fakedev/gpu[0-$((FAKE_GPUS - 1))]"
  fi
fi

CONF=$(cat <<CONF_EOF
$MARKER
# One node, no accounting; state in $STATE. Removed by tests/slurm/slurm-down.sh.
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
# Jobs without --mem would otherwise take the whole node's memory and run one at a time.
DefMemPerCPU=512
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc=$STATE/log/jobcomp.txt
# squeue must still list finished jobs when the plugin polls (>= 3 x slurm-init-seconds-before-status-checks,
# else the plugin switches back to sacct, which fails without slurmdbd).
MinJobAge=${SLURM_CI_MIN_JOB_AGE:-300}
InactiveLimit=0
KillWait=5
Waittime=0
$EXTRA_CONF
$NODE_LINE State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
CONF_EOF
)
conf_changed=0
mkdir -p /etc/slurm
if [ ! -f "$CONF_FILE" ] || [ "$(cat "$CONF_FILE")" != "$CONF" ]; then
  printf '%s\n' "$CONF" > "$CONF_FILE"
  conf_changed=1
fi
cp "$CONF_FILE" "$STATE/slurm.conf"
GRES_FILE=/etc/slurm/gres.conf
if [ -f "$GRES_FILE" ] && [ "$(head -n1 "$GRES_FILE")" != "$MARKER" ]; then
  echo "slurm-up.sh: $GRES_FILE exists and was not written by this script; not touching it" >&2
  exit 3
fi
if [ -n "$GRES_CONF" ]; then
  if [ ! -f "$GRES_FILE" ] || [ "$(cat "$GRES_FILE")" != "$GRES_CONF" ]; then
    printf '%s\n' "$GRES_CONF" > "$GRES_FILE"
    conf_changed=1
  fi
  cp "$GRES_FILE" "$STATE/gres.conf"
elif [ -f "$GRES_FILE" ]; then
  rm -f "$GRES_FILE"
  conf_changed=1
fi

# munge: Debian's postinst creates the key; without systemd /run/munge must be made by hand.
if [ ! -s /etc/munge/munge.key ]; then
  mkdir -p /etc/munge
  mungekey --create --force
  chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
fi
mkdir -p /run/munge && chown munge:munge /run/munge
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  runuser -u munge -- /usr/sbin/munged
  touch "$STATE/run/munged.ours"   # slurm-down.sh stops munged only if this script started it
  for _ in $(seq 1 20); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.25; done
fi

if [ "$conf_changed" -eq 1 ] && { alive "$STATE/run/slurmctld.pid" || alive "$STATE/run/slurmd.pid"; }; then
  # Node definitions (CPUs, memory, GRES) change only with a restart of both daemons, not `scontrol reconfigure`.
  timeout 10 scontrol shutdown >/dev/null 2>&1 || true
  for f in "$STATE/run/slurmctld.pid" "$STATE/run/slurmd.pid"; do
    for _ in $(seq 1 40); do alive "$f" || break; sleep 0.25; done
    alive "$f" && kill -9 "$(cat "$f")" 2>/dev/null || true
  done
fi
alive "$STATE/run/slurmctld.pid" || slurmctld
alive "$STATE/run/slurmd.pid" || slurmd -N localhost

state=""
for _ in $(seq 1 120); do
  state=$(sinfo -h -n localhost -o '%T' 2>/dev/null || true)
  case "$state" in
    idle|mixed|allocated) break ;;
    # a drain saved in the state dir by an earlier start with another node definition: this cluster is throwaway
    drained|draining) scontrol update NodeName=localhost State=RESUME 2>/dev/null || true ;;
  esac
  sleep 0.5
done
case "$state" in
  idle|mixed|allocated) ;;
  *) echo "slurm-up.sh: node not ready (state '$state')" >&2; tail -n 30 "$STATE"/log/*.log >&2 || true; exit 1 ;;
esac
sinfo
echo "SLURM is up (config $CONF_FILE, state $STATE)"
