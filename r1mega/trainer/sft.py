"""Supervised fine-tuning (and the embedded default's pretraining) on packed sequences.

A sample is prompt + response + EOS. Every position t predicts token t+1; the loss covers the
positions that predict response tokens (or every token with `loss_on_prompt`, i.e. plain LM
pretraining). Samples are packed into `max_tokens` microbatches with per-sequence attention
boundaries, so a packed batch gives each sequence the loss it would have alone.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

import torch

from r1mega.algorithms import vocab_parallel_logprobs
from r1mega.data.packing import pack


@dataclass
class SFTConfig:
    steps: int = 100  # optimizer steps (a run of `epochs` over the data stops early when they end)
    epochs: int = 1
    batch_size: int = 64  # samples per optimizer step
    max_tokens: int = 1024  # tokens per packed microbatch
    loss_on_prompt: bool = False
    seed: int = 0


def sft_sample(prompt_ids: Sequence[int], response_ids: Sequence[int], eos_id: int | None, loss_on_prompt: bool = False) -> dict:
    tokens = torch.tensor([*prompt_ids, *response_ids, *([eos_id] if eos_id is not None else [])], dtype=torch.long)
    target = torch.cat([tokens[1:], tokens.new_zeros(1)])
    loss_mask = torch.zeros(len(tokens), dtype=torch.float32)
    loss_mask[(0 if loss_on_prompt else max(len(prompt_ids) - 1, 0)): len(tokens) - 1] = 1.0
    return {"tokens": tokens, "target": target, "loss_mask": loss_mask}


def lm_loss(logits: torch.Tensor, batch: dict):
    """Summed NLL over masked positions; megatron divides by the token count over microbatches."""
    logp, _ = vocab_parallel_logprobs(logits, batch["target"])
    mask = batch["loss_mask"]
    nll = -(logp * mask).sum()
    tokens = mask.sum()
    # clones: megatron divides the returned loss in place
    return nll, tokens, {"nll_sum": nll.detach().clone(), "tokens": tokens.detach().clone()}


def step_batches(num_samples: int, cfg: SFTConfig, start_step: int = 0):
    """(step, sample indices) for every optimizer step: a seeded shuffle per epoch, so a resumed run
    sees the same order from `start_step` on."""
    per_epoch = max(num_samples // cfg.batch_size, 1)
    total = min(cfg.steps, per_epoch * cfg.epochs)
    for step in range(start_step, total):
        epoch, k = divmod(step, per_epoch)
        order = list(range(num_samples))
        random.Random(cfg.seed * 1000 + epoch).shuffle(order)
        yield step, order[k * cfg.batch_size:(k + 1) * cfg.batch_size]


def sft_step(engine, samples: list[dict], max_tokens: int, thd: bool = False) -> dict:
    """One optimizer step over `samples`; returns loss (mean NLL per token), grad norm, lr, packing."""
    par = engine.cfg.parallel
    packed = pack(samples, max_tokens, pad_to_multiple=par.tensor_model_parallel_size if par.sequence_parallel else 1,
                  thd=thd, min_microbatches=par.pipeline_model_parallel_size)
    out = engine.train_step(packed.microbatches, lm_loss)
    metrics = out["metrics"]
    loss = float("nan")
    if metrics:  # last pipeline stage
        nll = sum(m["nll_sum"] for m in metrics)
        loss = (nll / sum(m["tokens"] for m in metrics).clamp(min=1)).item()
    return {"loss": _from_last_stage(loss), "grad_norm": out["grad_norm"], "lr": out["lr"],
            "packing_efficiency": packed.efficiency, "tokens": packed.real_tokens}


def _from_last_stage(value: float) -> float:
    """Scalars the last pipeline stage computed, on every rank (NaN elsewhere before this)."""
    import math

    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    t = torch.tensor([0.0 if math.isnan(value) else value, 0.0 if math.isnan(value) else 1.0], dtype=torch.float64)
    dist.all_reduce(t)
    return (t[0] / t[1].clamp(min=1)).item()
