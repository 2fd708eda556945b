"""Process group and megatron-core parallel state, from torchrun or Slurm environment variables."""
from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

from r1mega.config.validate import ConfigError


@dataclass(frozen=True)
class Launch:
    rank: int
    local_rank: int
    world_size: int
    master_addr: str
    master_port: int


def _first_slurm_host(nodelist: str) -> str:
    out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
    return out.stdout.split()[0]


def launch_from_env(env: dict[str, str] | None = None) -> Launch:
    """Rank layout from torchrun (RANK/WORLD_SIZE/LOCAL_RANK) or Slurm (SLURM_PROCID/NTASKS/LOCALID)."""
    env = os.environ if env is None else env
    if "RANK" in env:
        rank, world, local = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    elif "SLURM_PROCID" in env:
        rank, world, local = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env["SLURM_LOCALID"])
    else:
        rank, world, local = 0, 1, 0
    addr = env.get("MASTER_ADDR")
    if addr is None:
        addr = _first_slurm_host(env["SLURM_JOB_NODELIST"]) if "SLURM_JOB_NODELIST" in env and world > 1 else "127.0.0.1"
    port = env.get("MASTER_PORT")
    if port is None:
        # A lone process picks a free port, so two single-process jobs on one machine do not collide.
        port = free_port() if world == 1 else 29500
    return Launch(rank, local, world, addr, int(port))


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(par, plat, launch: Launch | None = None) -> Launch:
    """Start the process group and megatron-core's TP/PP/CP/EP/DP groups; seed every RNG."""
    launch = launch or launch_from_env()
    if par.world_size is not None and par.world_size != launch.world_size:
        raise ConfigError(
            [f"parallel.world_size={par.world_size} but the launcher started {launch.world_size} processes."]
        )
    if plat.device == "cpu":
        from r1mega.platform import cpu

        cpu.apply()
    else:
        torch.cuda.set_device(launch.local_rank)
    if not dist.is_initialized():
        dist.init_process_group(
            backend=plat.backend,
            init_method=f"tcp://{launch.master_addr}:{launch.master_port}",
            rank=launch.rank,
            world_size=launch.world_size,
        )
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=par.tensor_model_parallel_size,
        pipeline_model_parallel_size=par.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=par.virtual_pipeline_model_parallel_size,
        context_parallel_size=par.context_parallel_size,
        expert_model_parallel_size=par.expert_model_parallel_size,
        expert_tensor_parallel_size=par.expert_tensor_parallel_size,
    )
    seed_everything(plat.seed, on_cpu=plat.device == "cpu")
    return launch


def seed_everything(seed: int, on_cpu: bool) -> None:
    torch.manual_seed(seed)
    # On CPU megatron's CUDA RNG tracker cannot hold states; the inference tracker's no-op forks let
    # dropout-free CPU runs draw from torch's default generator instead.
    model_parallel_cuda_manual_seed(seed, inference_rng_tracker=on_cpu, force_reset_rng=True)


def destroy_distributed() -> None:
    """Tear down cleanly: without destroy_process_group ~30% of gloo runs abort with rc 134 at exit."""
    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def broadcast_object(obj, src: int = 0):
    """`obj` from rank `src` on every rank (a no-op in a single process)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj) -> list:
    """`[obj of rank 0, obj of rank 1, ...]` on every rank (`[obj]` in a single process)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def gather_object(obj) -> list:
    """`[obj of rank 0, obj of rank 1, ...]` on rank 0, `[]` on the others (`[obj]` in a single process)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out or []


def data_parallel() -> tuple[int, int, object]:
    """(this rank's data-parallel rank, DP size, megatron's DP group or None) — (0, 1, None) without
    megatron's parallel state or in a DP group of one."""
    if not dist.is_initialized() or not parallel_state.model_parallel_is_initialized():
        return 0, 1, None
    size = parallel_state.get_data_parallel_world_size()
    group = parallel_state.get_data_parallel_group() if size > 1 else None
    return parallel_state.get_data_parallel_rank(), size, group


def is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier() -> None:
    """A barrier over every rank (a no-op in a single process)."""
    if dist.is_initialized():
        dist.barrier()
