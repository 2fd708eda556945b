#!/usr/bin/env bash
# Multi-node launcher shared by the sbatch files (they exec it: this is the job's batch script). One
# `srun` task per node runs `torchrun` over that node's processes; the rendezvous is on the first node's
# address (its NodeAddr, resolved: node names need not resolve, and virtual nodes share one host).
# Extra arguments are Hydra overrides, passed unchanged after the launcher's own (later ones win, e.g.
# `platform=cpu`).
#   R1MEGA_NPROC_PER_NODE  processes (ranks) per node; default: the job's GPUs per node, else 8.
#   MASTER_PORT            rendezvous port (29500).
#   R1MEGA_LOG_DIR         per-node logs (<dir>/<node index>-<host>.log, appended on requeue); default logs/<job id>.
#   R1MEGA_CONTAINER       pyxis image (srun --container-image), optional.
#   R1MEGA_DRY_RUN=1       print the per-node commands instead of running them.
# Preemption: Slurm sends SIGTERM to every process of the job (scancel, scontrol requeue, preemption);
# the ranks stop at their next safe point with a checkpoint (r1mega.parallel.interrupt) while this
# script waits for them. SIGUSR1 (`#SBATCH --signal=B:USR1@N`, the warning N s before the time limit,
# sent to this script only) is forwarded as SIGTERM to the job steps (`scancel --signal`: srun itself
# turns a SIGTERM into SIGKILL for its tasks, so it must not get one); once they have stopped, the job
# requeues itself (`scontrol requeue`, needs `--requeue`), and the requeued job resumes from that
# checkpoint (same run_dir).
set -euo pipefail
: "${SLURM_JOB_NODELIST:?run inside a Slurm allocation (sbatch/salloc)}"
recipe=${R1MEGA_RECIPE:?set by the sbatch file}
nodes=${SLURM_JOB_NUM_NODES:-1}
nproc=${R1MEGA_NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
hosts=${R1MEGA_HOSTS:-$(scontrol show hostnames "$SLURM_JOB_NODELIST")}
first=$(echo "$hosts" | head -n1)
addr=$(scontrol show node "$first" 2>/dev/null | grep -o 'NodeAddr=[^ ]*' | cut -d= -f2 || true)
master=$(getent ahostsv4 "${addr:-$first}" 2>/dev/null | awk 'NR == 1 {print $1}' || true)
master=${master:-${addr:-$first}}
port=${MASTER_PORT:-29500}
logdir=${R1MEGA_LOG_DIR:-logs/${SLURM_JOB_ID:-local}}
mkdir -p "$logdir"

export NCCL_IB_DISABLE=${NCCL_IB_DISABLE:-0} NCCL_DEBUG=${NCCL_DEBUG:-WARN}
export CUDA_DEVICE_MAX_CONNECTIONS=1 TORCH_NCCL_ASYNC_ERROR_HANDLING=1

overrides=$(printf ' %q' "$@")
torchrun="torchrun --nnodes=$nodes --nproc-per-node=$nproc --rdzv-backend=c10d --rdzv-endpoint=$master:$port --rdzv-id=${SLURM_JOB_ID:-0}"
cmd="$torchrun -m r1mega recipe=$recipe platform=gpu parallel.world_size=$((nodes * nproc))$overrides"
srun_args=(--nodes="$nodes" --ntasks-per-node=1 --output="$logdir/%n-%N.log" --open-mode=append)
[ -n "${R1MEGA_CONTAINER:-}" ] && srun_args+=(--container-image="$R1MEGA_CONTAINER" --container-mounts="$PWD:$PWD" --container-workdir="$PWD")

if [ "${R1MEGA_DRY_RUN:-0}" = 1 ]; then
  i=0
  for h in $hosts; do echo "[$h] node_rank=$i $cmd"; i=$((i + 1)); done
  echo "srun ${srun_args[*]}"
  exit 0
fi

echo "r1mega: job ${SLURM_JOB_ID:-?} (restart ${SLURM_RESTART_COUNT:-0}) on $nodes node(s) x $nproc, rendezvous $master:$port, logs $logdir/"
warned=0
trap 'warned=1; echo "r1mega: SIGUSR1 (time limit near): stopping at the next checkpoint, then requeueing"; scancel --signal=TERM "$SLURM_JOB_ID" || true' USR1
trap 'echo "r1mega: SIGTERM: the ranks stop at their next checkpoint"' TERM  # Slurm signals them itself
srun "${srun_args[@]}" bash -c "$cmd" &
pid=$!
while kill -0 "$pid" 2>/dev/null; do wait "$pid" || true; done  # a trap interrupts `wait`
rc=0
wait "$pid" || rc=$?
if [ "$warned" = 1 ] && [ "$rc" != 0 ]; then
  echo "r1mega: ranks stopped (status $rc); requeueing job $SLURM_JOB_ID to resume from the checkpoint"
  scontrol requeue "$SLURM_JOB_ID"
fi
exit "$rc"
