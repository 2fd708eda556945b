#!/usr/bin/env bash
# Start a real single-host Slurm cluster of N virtual nodes (for tests; needs root and the Debian
# packages slurmctld slurmd slurm-client munge, see tools/install.sh). Everything lives in STATE_DIR:
# munged with its own key and socket, slurm.conf, spool, logs, pid files; tools/slurm/down.sh STATE_DIR
# stops exactly these daemons.
#   tools/slurm/up.sh STATE_DIR [NODES=2]
# Then: export SLURM_CONF=STATE_DIR/slurm.conf  (what this script prints last).
# Nodes n1..nN all run on this host (`slurmd -N nI`, one port each) with 8 fake GPUs (GRES on plain
# files), so the sbatch files' `--gpus-per-node=8` is accepted. Requeue is fast: a requeued job
# starts again after cred_expire (10 s) + sched_interval (2 s).
set -euo pipefail
state=${1:?usage: up.sh STATE_DIR [NODES]}
nodes=${2:-2}
[ "$(id -u)" = 0 ] || { echo "up.sh: needs root (slurmd runs jobs as their user)" >&2; exit 1; }
for b in munged slurmctld slurmd scontrol; do
  command -v "$b" >/dev/null || PATH=$PATH:/usr/sbin
  command -v "$b" >/dev/null || { echo "up.sh: $b not found (apt-get install slurmctld slurmd slurm-client munge)" >&2; exit 1; }
done
mkdir -p "$state"
state=$(cd "$state" && pwd)
[ -e "$state/slurm.conf" ] && { echo "up.sh: $state already holds a cluster (tools/slurm/down.sh $state first)" >&2; exit 1; }
mkdir -p "$state"/{munge,spool,log,run}
chmod 700 "$state/munge"

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])'; }

# munge: own key, socket, pid and log (--force: the state dir may sit under a world-writable /tmp).
dd if=/dev/urandom of="$state/munge/munge.key" bs=1024 count=1 status=none
chmod 400 "$state/munge/munge.key"
munged --force --key-file="$state/munge/munge.key" --socket="$state/munge/munge.socket" \
  --pid-file="$state/munge/munged.pid" --log-file="$state/munge/munged.log" --seed-file="$state/munge/munged.seed"

host=$(hostname -s)
ctld_port=$(free_port)
cat > "$state/slurm.conf" <<CONF
ClusterName=r1mega-test
SlurmctldHost=$host
SlurmctldPort=$ctld_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$state/munge/munge.socket,cred_expire=10
StateSaveLocation=$state/spool/ctld
SlurmdSpoolDir=$state/spool/%n
SlurmctldPidFile=$state/run/slurmctld.pid
SlurmdPidFile=$state/run/slurmd-%n.pid
SlurmctldLogFile=$state/log/slurmctld.log
SlurmdLogFile=$state/log/slurmd-%n.log
# no cgroups here (freezer not mounted: proctrack/cgroup reports jobs COMPLETED that never ran)
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2
MessageTimeout=30
KillWait=120  # s from SIGTERM to SIGKILL: time for the step in progress and its checkpoint
InactiveLimit=0
MinJobAge=300
ReturnToService=2
MpiDefault=none
GresTypes=gpu
CONF
for i in $(seq 1 "$nodes"); do
  echo "NodeName=n$i NodeHostname=$host NodeAddr=127.0.0.1 Port=$(free_port) CPUs=2 Gres=gpu:8 State=UNKNOWN" >> "$state/slurm.conf"
done
echo "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO" >> "$state/slurm.conf"
# Slurm drops GPUs without device files: 8 plain files stand in for /dev/nvidia0-7.
mkdir -p "$state/dev" && touch "$state"/dev/gpu{0..7}
echo "Name=gpu File=$state/dev/gpu[0-7]" > "$state/gres.conf"

export SLURM_CONF=$state/slurm.conf
slurmctld -f "$SLURM_CONF"
for i in $(seq 1 "$nodes"); do slurmd -f "$SLURM_CONF" -N "n$i"; done
for _ in $(seq 1 150); do
  idle=$(sinfo -h -N -t idle -o %N 2>/dev/null | sort -u | wc -l)
  [ "$idle" -ge "$nodes" ] && { echo "export SLURM_CONF=$SLURM_CONF"; exit 0; }
  sleep 0.2
done
echo "up.sh: the $nodes nodes are not idle after 30 s; logs in $state/log" >&2
sinfo -N >&2 || true
exit 1
