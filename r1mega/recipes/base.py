"""The base model an RL recipe starts from, and the tokenizer that goes with it.

`recipe.base=embedded` (the CPU default): no weights can be downloaded, so the base is made here:
a byte-level BPE tokenizer and `model` pretrained for a few minutes on the synthetic addition corpus
(`r1mega.data.arithmetic`). Both are cached under `recipe.cache_dir` by a hash of everything that
determines them and reused by the next run; the directory appears under its final name only when
complete. Otherwise `recipe.base` is a Hugging Face directory, imported through the checkpoint mapping.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf

from r1mega.checkpoint.manager import CheckpointManager
from r1mega.data import arithmetic
from r1mega.data.tokenizer import load_tokenizer, train_tokenizer
from r1mega.parallel import interrupt
from r1mega.parallel.state import barrier, is_rank0
from r1mega.trainer.metrics import MetricsLogger, plot_curves
from r1mega.trainer.sft import SFTConfig, sft_sample, sft_step, step_batches


@dataclass
class Base:
    model_cfg: object
    tokenizer_dir: Path
    checkpoint: Path | None = None  # a megatron checkpoint root (embedded base) ...
    hf_dir: Path | None = None  # ... or a Hugging Face directory

    def tokenizer(self):
        return load_tokenizer(self.tokenizer_dir)

    def load_into(self, chunks) -> None:
        if self.checkpoint is not None:
            CheckpointManager(self.checkpoint).load(chunks)
            return
        from r1mega.checkpoint.hf_io import HFReader
        from r1mega.checkpoint.hf_mapping import load_hf_tensors

        with HFReader(self.hf_dir) as read:
            load_hf_tensors(chunks, self.model_cfg, read)


def prepare_base(cfg) -> Base:
    if cfg.recipe.base != "embedded":
        hf_dir = Path(cfg.recipe.base)
        return Base(cfg.model, tokenizer_dir=hf_dir, hf_dir=hf_dir)
    return embedded_base(cfg)


def cache_root(cfg) -> Path:
    """Where the embedded base of `cfg` is cached: named by a hash of all that determines it."""
    key_src = json.dumps([OmegaConf.to_container(x, resolve=True) for x in (cfg.model, cfg.data.arithmetic,
                                                                          cfg.recipe.pretrain)]
                         + [cfg.platform.seed, arithmetic.VERSION], sort_keys=True)
    return Path(cfg.recipe.cache_dir) / f"base-{cfg.model.name}-{hashlib.sha256(key_src.encode()).hexdigest()[:12]}"


def embedded_base(cfg) -> Base:
    root = cache_root(cfg)
    base = Base(cfg.model, tokenizer_dir=root / "tokenizer", checkpoint=root / "ckpt")
    if (root / "DONE").exists():
        return base
    work = Path(cfg.recipe.cache_dir) / f"{root.name}.partial"  # a killed pretraining starts over
    if is_rank0():
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
    barrier()
    _pretrain(cfg, work)
    if is_rank0():
        (work / "DONE").write_text("complete\n")
        os.rename(work, root)
    barrier()
    return base


def _pretrain(cfg, work: Path) -> None:
    from r1mega.trainer.engine import MegatronEngine

    p = cfg.recipe.pretrain
    docs = arithmetic.pretraining_corpus(cfg.data.arithmetic, p.num_docs, seed=cfg.platform.seed)
    if is_rank0():
        tok = train_tokenizer((a + b for a, b in docs[: p.tokenizer_docs]), cfg.model.vocab_size)
        tok.save_pretrained(work / "tokenizer")
    barrier()
    tok = load_tokenizer(work / "tokenizer")
    prompts = tok([a for a, _ in docs], add_special_tokens=False)["input_ids"]
    responses = tok([b for _, b in docs], add_special_tokens=False)["input_ids"]
    samples = [sft_sample(a, b, tok.eos_token_id, loss_on_prompt=True) for a, b in zip(prompts, responses)]

    run_cfg = OmegaConf.merge(cfg, {"optim": {"lr": p.lr, "min_lr": p.min_lr, "lr_warmup_steps": p.warmup_steps,
                                              "lr_decay_steps": p.steps, "lr_decay_style": "cosine"}})
    engine = MegatronEngine(run_cfg)
    sft = SFTConfig(steps=p.steps, epochs=10**6, batch_size=p.batch_size, max_tokens=p.max_tokens,
                    loss_on_prompt=True, seed=cfg.platform.seed)
    log = MetricsLogger(work, "pretrain", p.steps, headline=("loss",), use_wandb=False, plain_every_s=10.0)
    log.print(f"pretraining the embedded base: {cfg.model.name} on {p.num_docs} synthetic addition documents, "
              f"{p.steps} steps (cached for the next run)")
    try:
        for step, idx in step_batches(len(samples), sft):
            log.log(step + 1, sft_step(engine, [samples[i] for i in idx], p.max_tokens))
            # Minutes of work at most, so no checkpoint: an interrupted pretraining starts over (a
            # finished one is saved; the recipe stops at its own first safe point).
            if step + 1 < p.steps:
                interrupt.stop_point(f"the embedded base's pretraining stopped at step {step + 1}/{p.steps} (it is "
                                     "not checkpointed: the next run pretrains it again); run the same command to restart")
    finally:
        log.close()
    if is_rank0():
        plot_curves(log.rows(), ["loss", "lr"], work / "pretrain.png", f"pretraining {cfg.model.name}")
    CheckpointManager(work / "ckpt", keep_last=1).save(p.steps, engine.model)
