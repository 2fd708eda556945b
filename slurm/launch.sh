#!/usr/bin/env bash
# Multi-node launcher shared by the sbatch files: one `srun` task per node runs `torchrun` over that
# node's GPUs; rendezvous on the first host of the allocation. Extra arguments are Hydra overrides.
#   R1MEGA_DRY_RUN=1  print the per-node commands instead of running them (tested on CPU).
#   R1MEGA_CONTAINER  pyxis image (srun --container-image), optional.
set -euo pipefail
: "${SLURM_JOB_NODELIST:?run inside a Slurm allocation (sbatch/salloc)}"
recipe=${R1MEGA_RECIPE:?set by the sbatch file}
nodes=${SLURM_JOB_NUM_NODES:-1}
gpus=${R1MEGA_GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
hosts=${R1MEGA_HOSTS:-$(scontrol show hostnames "$SLURM_JOB_NODELIST")}
master=$(echo "$hosts" | head -n1)
port=${MASTER_PORT:-29500}
logdir=${R1MEGA_LOG_DIR:-logs/${SLURM_JOB_ID:-local}}
mkdir -p "$logdir"

export NCCL_IB_DISABLE=${NCCL_IB_DISABLE:-0} NCCL_DEBUG=${NCCL_DEBUG:-WARN}
export CUDA_DEVICE_MAX_CONNECTIONS=1 TORCH_NCCL_ASYNC_ERROR_HANDLING=1

overrides=$(printf ' %q' "$@")
torchrun="torchrun --nnodes=$nodes --nproc-per-node=$gpus --rdzv-backend=c10d --rdzv-endpoint=$master:$port --rdzv-id=${SLURM_JOB_ID:-0}"
cmd="$torchrun -m r1mega recipe=$recipe platform=gpu parallel.world_size=$((nodes * gpus))$overrides"
srun_args=(--nodes="$nodes" --ntasks-per-node=1 --output="$logdir/%N.log")
[ -n "${R1MEGA_CONTAINER:-}" ] && srun_args+=(--container-image="$R1MEGA_CONTAINER" --container-mounts="$PWD:$PWD" --container-workdir="$PWD")

if [ "${R1MEGA_DRY_RUN:-0}" = 1 ]; then
  i=0
  for h in $hosts; do echo "[$h] node_rank=$i $cmd"; i=$((i + 1)); done
  echo "srun ${srun_args[*]}"
  exit 0
fi
exec srun "${srun_args[@]}" bash -c "$cmd"
