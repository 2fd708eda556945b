"""The rollout engine a run builds from its config, and `PolicySampler`: a frozen megatron copy of a
model with an engine serving it, for the recipes' stages that sample from a checkpoint (rejection
sampling, distillation, evaluation of every stage's model)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional

import torch
from omegaconf import DictConfig, OmegaConf

from r1mega.config.recipes import RejectionConfig
from r1mega.parallel.state import barrier, broadcast_object


def rollout_engine(cfg, tok, run_dir: Path, launch):
    """vLLM serving `model` from a directory with its config and tokenizer (weights come by sync).
    CPU: one engine on rank 0; GPU: every rank holds its shard (SPMD, external_launcher)."""
    from r1mega.checkpoint.hf_mapping import hf_config
    from r1mega.models.router_replay import router_replay_mode
    from r1mega.rollout.vllm_engine import VLLMEngine

    on_cpu = cfg.platform.device == "cpu"
    if on_cpu and launch.rank != 0:
        return None
    engine_dir = run_dir / "engine"
    if launch.local_rank == 0:
        engine_dir.mkdir(parents=True, exist_ok=True)
        config = dict(hf_config(cfg.model), bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
        (engine_dir / "config.json").write_text(json.dumps(config, indent=2))
        tok.save_pretrained(engine_dir)
    if not on_cpu:
        torch.distributed.barrier()
    return VLLMEngine(engine_dir, cfg.rollout, device=cfg.platform.device, seed=cfg.platform.seed, load_format="dummy",
                      return_routes=router_replay_mode(cfg) == "r3")


class PolicySampler:
    """A frozen megatron model of `cfg.model` (this rank's shard) and a vLLM engine (`rollout_engine`:
    CPU on rank 0, GPU every rank's shard). `load(init)` loads weights into the model and syncs them
    into the engine; `rejection_sample` runs on the engine rank and returns its counts on every rank."""

    def __init__(self, cfg: DictConfig, tok, work_dir: Path, launch):
        from r1mega.rollout.sync import WeightSync
        from r1mega.trainer.engine import MegatronEngine

        self.cfg, self.tok = cfg, tok
        self.model = MegatronEngine(cfg, trainable=False)
        self.engine = rollout_engine(cfg, tok, work_dir, launch)
        self.sync = WeightSync(cfg.model, cfg.parallel, cfg.rollout)
        self.loaded = None

    def load(self, init: Callable, label: str) -> None:
        init(self.model.model)
        self.sync.sync(self.model.model, self.engine)
        self.loaded = label

    def rejection_sample(self, rows: list[dict], template: str, rej, reward_cfg, out_path: Path, source: str,
                         step: Optional[int]) -> dict:
        """`r1mega.data.rejection.rejection_sample` with this engine, on the engine rank (rows too long
        for the engine are skipped and counted); writes `out_path` (+ `rejected.jsonl` beside it);
        its counts shared with all ranks."""
        from r1mega.data.rejection import rejection_sample

        counts = None
        if self.engine is not None:
            rcfg = OmegaConf.to_object(rej) if OmegaConf.is_config(rej) else rej
            assert isinstance(rcfg, RejectionConfig)
            counts = rejection_sample(self.engine, self.tok, rows, template, reward_cfg, rcfg, out_path, source=source,
                                      step=step, rejected_path=out_path.with_name("rejected.jsonl"),
                                      max_model_len=self.cfg.rollout.max_model_len)
        barrier()
        return broadcast_object(counts)

    def close(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()
            self.engine = None
