"""Supervised fine-tuning (and the embedded default's pretraining) on packed sequences.

A sample is prompt + response + EOS. Every position t predicts token t+1; the loss covers the
positions that predict response tokens (or every token with `loss_on_prompt`, i.e. plain LM
pretraining). Samples are packed into `max_tokens` microbatches with per-sequence attention
boundaries, so a packed batch gives each sequence the loss it would have alone.

The loss of a step is the mean NLL over all its loss tokens, however they are packed and divided:
each microbatch's NLL sum is divided by the step's global loss-token count (all samples, every DP
rank), and megatron sums those shares over microbatches and DP ranks (`MegatronEngine`'s loss
contract). Each DP rank trains on its token-balanced share of the step's samples.

`train_sft` runs a stage: epochs over rows rendered by `r1mega.data.chat` (`rows_to_samples`),
logging loss, grad norm, lr, packing efficiency and tokens/s like the RL loop.
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist

from r1mega.algorithms import vocab_parallel_logprobs


@dataclass
class SFTConfig:
    steps: int = 100  # optimizer steps (a run of `epochs` over the data stops early when they end)
    epochs: int = 1
    batch_size: int = 64  # samples per optimizer step
    max_tokens: int = 1024  # tokens per packed microbatch; rows_to_samples drops (and counts) longer samples
    loss_on_prompt: bool = False
    seed: int = 0
    # lr schedule over the stage (`with_schedule`); lr=None keeps the run's `optim` settings.
    lr: Optional[float] = None
    min_lr: float = 0.0
    warmup_steps: int = 0
    lr_decay_style: str = "cosine"


def sft_sample(prompt_ids: Sequence[int], response_ids: Sequence[int], eos_id: int | None, loss_on_prompt: bool = False) -> dict:
    tokens = torch.tensor([*prompt_ids, *response_ids, *([eos_id] if eos_id is not None else [])], dtype=torch.long)
    target = torch.cat([tokens[1:], tokens.new_zeros(1)])
    loss_mask = torch.zeros(len(tokens), dtype=torch.float32)
    loss_mask[(0 if loss_on_prompt else max(len(prompt_ids) - 1, 0)): len(tokens) - 1] = 1.0
    return {"tokens": tokens, "target": target, "loss_mask": loss_mask}


def rows_to_samples(rows: list[dict], tokenizer, template: str = "r1", max_tokens: int | None = None,
                    loss_on_prompt: bool = False) -> tuple[list[dict], int]:
    """(samples, number dropped) from SFT rows (`r1mega.data.chat.sft_text`): a sample of more than
    `max_tokens` tokens (prompt + response + EOS) is dropped and counted, never cut; the caller reports
    the count (`r1mega.recipes.stages.sft_stage` prints it and keeps it as `dropped` in the stage summary).
    Prompt and response are tokenized separately: the model generates the response after the prompt's tokens."""
    from r1mega.data.chat import sft_text

    texts = [sft_text(r, template) for r in rows]
    prompts = tokenizer([p for p, _ in texts], add_special_tokens=False)["input_ids"] if texts else []
    responses = tokenizer([r for _, r in texts], add_special_tokens=False)["input_ids"] if texts else []
    samples = [sft_sample(p, r, tokenizer.eos_token_id, loss_on_prompt) for p, r in zip(prompts, responses)]
    kept = [s for s in samples if max_tokens is None or len(s["tokens"]) <= max_tokens]
    return kept, len(samples) - len(kept)


def lm_loss(logits: torch.Tensor, batch: dict):
    """This microbatch's share of the step's mean NLL over masked positions: its NLL sum divided by
    `batch["normalizer"]`, the step's global loss-token count (`sft_step` sets it)."""
    logp, _ = vocab_parallel_logprobs(logits, batch["target"])
    mask = batch["loss_mask"]
    nll = -(logp * mask).sum()
    metrics = {"nll_sum": nll.detach().clone(), "tokens": mask.sum().detach().clone()}
    return nll / batch["normalizer"], torch.tensor(0), metrics


def num_steps(num_samples: int, cfg: SFTConfig) -> int:
    return min(cfg.steps, max(num_samples // cfg.batch_size, 1) * cfg.epochs)


def step_batches(num_samples: int, cfg: SFTConfig, start_step: int = 0):
    """(step, sample indices) for every optimizer step: a seeded shuffle per epoch, so a resumed run
    sees the same order from `start_step` on."""
    per_epoch = max(num_samples // cfg.batch_size, 1)
    for step in range(start_step, num_steps(num_samples, cfg)):
        epoch, k = divmod(step, per_epoch)
        order = list(range(num_samples))
        random.Random(cfg.seed * 1000 + epoch).shuffle(order)
        yield step, order[k * cfg.batch_size:(k + 1) * cfg.batch_size]


def with_schedule(run_cfg, cfg: SFTConfig, num_samples: int):
    """`run_cfg` with `optim` set to the stage's lr schedule (warmup, then decay over its steps); build
    the stage's MegatronEngine from it."""
    from omegaconf import OmegaConf

    if cfg.lr is None:
        return run_cfg
    return OmegaConf.merge(run_cfg, {"optim": {"lr": cfg.lr, "min_lr": cfg.min_lr, "lr_warmup_steps": cfg.warmup_steps,
                                               "lr_decay_steps": num_steps(num_samples, cfg),
                                               "lr_decay_style": cfg.lr_decay_style}})


def sft_step(engine, samples: list[dict], max_tokens: int) -> dict:
    """One optimizer step over `samples`, this DP rank's share packed into microbatches of at most
    `max_tokens` tokens (`MegatronEngine.pack`); returns loss (mean NLL per token over the step), grad
    norm, lr, packing efficiency and this rank's real tokens. A sample longer than `max_tokens` raises
    ValueError (`r1mega.data.packing.pack`)."""
    packed = engine.pack(samples, max_tokens)
    normalizer = max(sum(float(s["loss_mask"].sum()) for s in samples), 1.0)  # every rank holds all samples
    for mb in packed.microbatches:
        mb["normalizer"] = normalizer
    # With MTP layers, DeepSeek-V3's MTP loss over the same loss tokens, weighted by lambda.
    mtp_coef = engine.cfg.model.mtp_loss_scaling_factor if engine.cfg.model.mtp_num_layers else 0.0
    out = engine.train_step(packed.microbatches, lm_loss, mtp_loss_coef=mtp_coef, mtp_mask_key="loss_mask")
    sums = torch.zeros(2, dtype=torch.float64)  # (NLL, tokens) of the last stage's microbatches
    for m in out["metrics"]:
        sums += torch.stack([m["nll_sum"].double(), m["tokens"].double()])
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(sums)  # TP copies count in both sums alike; non-last stages add zeros
    loss = (sums[0] / sums[1]).item() if sums[1] > 0 else float("nan")
    return {"loss": loss, "grad_norm": out["grad_norm"], "lr": out["lr"],
            "packing_efficiency": packed.efficiency, "tokens": packed.real_tokens,
            **({"mtp_loss": mtp_loss(out["metrics"])} if mtp_coef > 0 else {})}


def mtp_loss(metrics: list[dict]) -> float:
    """Mean MTP NLL per loss token (over depths) of a step, from the engine's per-microbatch
    `mtp_nll_sum` / `mtp_tokens` (last pipeline stage; collective over the world like the loss)."""
    sums = torch.zeros(2, dtype=torch.float64)
    for m in metrics or []:
        sums += torch.stack([m["mtp_nll_sum"].double(), m["mtp_tokens"].double()])
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(sums)  # TP copies count in both sums alike; non-last stages add zeros
    return (sums[0] / sums[1]).item() if sums[1] > 0 else float("nan")


def train_sft(engine, samples: list[dict], cfg: SFTConfig, logger=None, start_step: int = 0,
              on_step: Callable[[int, dict], None] | None = None,
              on_stop: Callable[[int], None] | None = None) -> dict:
    """Steps `start_step`..`num_steps` over `samples` (epochs of seeded shuffles, resumable by step).
    Each step's metrics go to `logger.log(step, metrics)` (a MetricsLogger) and `on_step(step, metrics)`
    (e.g. a checkpoint every N steps; `step` counts completed steps). Returns a summary.
    After each step every rank asks whether a stop signal (Ctrl-C, SIGTERM) reached any rank
    (`r1mega.parallel.interrupt`); if so `on_stop(step)` (e.g. a checkpoint there) and `Interrupted`."""
    from r1mega.parallel import interrupt

    if not samples:
        raise ValueError("train_sft: no samples")
    per_epoch = max(len(samples) // cfg.batch_size, 1)
    first = last = None
    tokens = 0
    start = time.perf_counter()
    for step, idx in step_batches(len(samples), cfg, start_step):
        t0 = time.perf_counter()
        m = sft_step(engine, [samples[i] for i in idx], cfg.max_tokens)
        dt = time.perf_counter() - t0
        m.update({"epoch": step / per_epoch, "time/step": dt, "throughput/train_tokens_per_s": m["tokens"] / max(dt, 1e-9)})
        first = m["loss"] if first is None else first
        last, tokens = m["loss"], tokens + m["tokens"]
        if logger is not None:
            logger.log(step + 1, m)
        if on_step is not None:
            on_step(step + 1, m)
        stop = interrupt.should_stop()
        if stop:
            if on_stop is not None:
                on_stop(step + 1)
            raise interrupt.Interrupted(stop)
    seconds = time.perf_counter() - start
    return {"steps": num_steps(len(samples), cfg), "start_step": start_step, "samples": len(samples),
            "epochs": num_steps(len(samples), cfg) / per_epoch, "first_loss": first, "last_loss": last,
            "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / max(seconds, 1e-9)}

