"""`recipe=r1_zero`: GRPO from the base model with rule rewards (DeepSeek-R1, 2.2).

Held-out eval before RL → `recipe.rollouts` GRPO iterations (each `num_mini_batches x ppo_epochs`
optimizer steps; a checkpoint every `save_every` rollouts, resumable after kill -9) → held-out eval
after RL; metrics go to W&B / JSONL / console, and `curves.png` plots reward, accuracy and response
length per rollout. Everything lives in `run_dir`. The step arithmetic (r1mega.config.steps) is
printed at start-up.
"""
from __future__ import annotations

import json
import sys
from functools import partial
from pathlib import Path

from omegaconf import OmegaConf

from r1mega.checkpoint.manager import CheckpointManager
from r1mega.config.steps import step_plan
from r1mega.data.prompts import PromptSource, load_rows
from r1mega.eval.report import pooled
from r1mega.parallel import interrupt
from r1mega.parallel.state import destroy_distributed, init_distributed, is_rank0, seed_everything
from r1mega.recipes.base import Base, prepare_base
from r1mega.rollout.sampler import rollout_engine
from r1mega.trainer.metrics import MetricsLogger, plot_curves

CURVES = ["reward/mean", "accuracy", "format_rate", "response_length/mean"]
SUMMARY = ("pass@1", "format", "mean_tokens")  # the held-out numbers the summary shows (r1mega.eval.report.columns)


def run(cfg) -> dict:
    launch = init_distributed(cfg.parallel, cfg.platform)
    seed_everything(cfg.platform.seed, on_cpu=cfg.platform.device == "cpu")
    try:
        return rl_stage(cfg, prepare_base(cfg), Path(cfg.run_dir), launch)
    finally:
        destroy_distributed()


def rl_stage(cfg, base: Base, run_dir: Path, launch, reward_model=None) -> dict:
    """GRPO from `base` with `cfg.recipe`'s settings, everything under `run_dir`; returns the
    before/after eval. Restarting with the same `run_dir` resumes from its last checkpoint.
    `reward_model`: an optional `RewardModelScorer` whose score joins the rule rewards."""
    from r1mega.trainer.grpo import GRPOTrainer

    r = cfg.recipe
    interrupt.stop_point()  # e.g. a Ctrl-C during start-up or an earlier stage's last step
    tok = base.tokenizer()
    prompts = PromptSource(load_rows(cfg.data, "train"), tok, r.template, r.max_prompt_tokens, seed=cfg.platform.seed)
    eval_rows = load_rows(cfg.data, "eval")

    ckpt = CheckpointManager(run_dir / "ckpt", keep_last=r.keep_last)
    ref_ckpt = CheckpointManager(run_dir / "ref", keep_last=1)
    policy, ref, start, ref_step = load_models(cfg, base, run_dir)
    if start:
        interrupt.checkpointed(f"rollout {start}", ckpt.root)
        if is_rank0():
            print(f"r1mega: resuming from checkpoint at rollout {start} ({ckpt.root})", file=sys.stderr, flush=True)

    engine = rollout_engine(cfg, tok, run_dir, launch)
    log = None
    try:
        records = _records(cfg, run_dir, tok)
        trainer = GRPOTrainer(cfg, policy, ref, engine, tok, prompts, reward_model=reward_model, records=records)
        trainer.load_state_dict({"ref_step": ref_step})
        trainer.colocation.weight_sync.sync(policy.model, engine)  # the engine starts from dummy weights
        interrupt.stop_point()

        log = MetricsLogger(run_dir, r.name, r.rollouts, config=OmegaConf.to_container(cfg, resolve=True), start_step=start,
                            headline=("reward/mean", "accuracy", "response_length/mean"), use_wandb=r.wandb, unit="rollout",
                            samples_every=records.cfg.wandb_every)
        log.print(f"{r.name}: {step_plan(r, cfg.algorithm, num_prompts=len(prompts)).line()}")
        if prompts.skipped:
            log.print(f"[yellow]{prompts.skipped} prompts longer than recipe.max_prompt_tokens={r.max_prompt_tokens} were skipped")
        # A resumed run's policy has moved: its eval before RL can only be the saved one.
        before = _evaluate(trainer, cfg, eval_rows, run_dir / "eval_before", remeasure=not start)
        interrupt.stop_point()  # the eval before RL is saved; nothing else to keep
        for step in range(start, r.rollouts):  # `step` counts rollouts (GRPO iterations)
            metrics = trainer.step(step)
            if r.eval.every and (step + 1) % r.eval.every == 0 and step + 1 < r.rollouts:
                held_out = pooled(_evaluate(trainer, cfg, eval_rows), r.eval.k)
                metrics.update({f"eval/{k}": v for k, v in held_out.items() if v is not None})
            log.log(step + 1, metrics)
            stop = interrupt.should_stop()  # every rank agrees: a stop signal on any rank ends the run here
            if stop or (step + 1) % r.save_every == 0 or step + 1 == r.rollouts:
                state = trainer.state_dict()
                if state["ref_step"] > ref_step:
                    ref_step = state["ref_step"]
                    ref_ckpt.save(ref_step, ref.model)
                ckpt.save(step + 1, policy.model, policy.optimizer,
                          state={**state, "scheduler": policy.scheduler.state_dict()})
                interrupt.checkpointed(f"rollout {step + 1}", ckpt.root)
            if stop:
                raise interrupt.Interrupted(stop)
        after = _evaluate(trainer, cfg, eval_rows, run_dir / "eval_after")
        log.close()
        summary = {"before": pooled(before, r.eval.k), "after": pooled(after, r.eval.k),
                   "benchmarks": {"before": before, "after": after}}
        if is_rank0():
            png = plot_curves(log.rows(), CURVES, run_dir / "curves.png", f"{r.name}: {cfg.model.name} on {cfg.data.name}")
            _print_summary(summary["before"], summary["after"], png, cfg)
            (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary
    finally:
        if log is not None:
            log.close()  # idempotent; flushes W&B when the loop stopped early
        if engine is not None:
            engine.shutdown()  # before the process groups go: vLLM destroys its own at shutdown


def load_models(cfg, base: Base, run_dir: Path, step: int | None = None):
    """(policy, reference or None, rollout, reference step): the policy (weights, optimizer,
    scheduler) from the checkpoint of `run_dir` at rollout `step` (None: the latest; none yet, or
    `step=0`: `base`) and the reference it had then. Raises FileNotFoundError for a missing one."""
    from r1mega.models.build import build_model
    from r1mega.models.router_replay import router_replay_mode
    from r1mega.trainer.engine import MegatronEngine

    # Routing replay needs megatron's RouterReplay in the policy's routers; the reference routes itself.
    policy = MegatronEngine(cfg, build_fn=partial(build_model, routing_replay=router_replay_mode(cfg) != "none"))
    ref = MegatronEngine(cfg, trainable=False) if cfg.algorithm.kl_coef else None
    ckpt, ref_ckpt, ref_step = CheckpointManager(run_dir / "ckpt"), CheckpointManager(run_dir / "ref"), 0
    step = ckpt.latest_step() if step is None else step
    if step:
        state = _checkpoint(ckpt, step).load(policy.model, policy.optimizer, step=step)
        ref_step = state["ref_step"]
        policy.scheduler.load_state_dict(state["scheduler"])
    else:
        base.load_into(policy.model)
    if ref is not None:
        _checkpoint(ref_ckpt, ref_step).load(ref.model, step=ref_step) if ref_step else base.load_into(ref.model)
    return policy, ref, step or 0, ref_step


def _checkpoint(ckpt: CheckpointManager, step: int) -> CheckpointManager:
    if not ckpt.path(step).is_dir():
        kept = sorted(int(p.name[5:]) for p in ckpt.root.glob("step_*") if p.name[5:].isdigit())
        raise FileNotFoundError(f"{ckpt.path(step)}: no checkpoint at rollout {step} (kept: {kept or 'none'}; "
                                f"recipe.save_every and recipe.keep_last choose them)")
    return ckpt


def _records(cfg, run_dir: Path, tok):
    """Rollout records under `run_dir/rollouts` (`recipe.records`)."""
    from r1mega.trainer.records import RolloutRecords

    return RolloutRecords(run_dir / "rollouts", OmegaConf.to_object(cfg.recipe.records), tok, cfg.algorithm.group_size,
                          trainer_logp=cfg.algorithm.old_logp_source == "trainer")


def _evaluate(trainer, cfg, rows, out_dir: Path | None = None, remeasure: bool = True) -> dict:
    """Held-out metrics per benchmark (`r1mega.eval.report.columns`) of the policy the engine serves
    now; with `out_dir`, saved there and reused on a restart with the same eval settings (other
    settings: measured again, or with `remeasure=False` a ValueError, `evaluate_served`)."""
    from r1mega.eval.models import evaluate_served

    return evaluate_served(trainer.engine, trainer.tok, rows, cfg.recipe.template, cfg.recipe.eval, cfg.platform.seed,
                           cfg.rollout.max_model_len, out_dir, remeasure=remeasure)


def _print_summary(before: dict, after: dict, png: Path, cfg) -> None:
    """The pooled held-out numbers (`r1mega.eval.report.pooled`) before and after RL."""
    e = cfg.recipe.eval
    print(f"\nheld-out eval ({before['problems']} problems x {e.k} samples, temperature {e.temperature}, "
          f"top-p {e.top_p}; seed {cfg.platform.seed}):")
    for key in SUMMARY:
        b, a = before[key], after[key]
        if b is None or a is None:  # no problem evaluated
            continue
        scale, unit = (100, " pts") if key != "mean_tokens" else (1, "")
        print(f"  {key:12s} before RL {b * scale:6.1f}   after RL {a * scale:6.1f}   change {(a - b) * scale:+6.1f}{unit}")
    print(f"curves: {png}")
