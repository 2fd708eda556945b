"""`python -m r1mega.replay <run_dir> step=K [hydra overrides]`: re-run the update of rollout K of a
finished or running R1-Zero run without generating anything, and compare it with the original.

The samples come from the rollout record (`<run_dir>/rollouts/step_<K>.parquet`, r1mega.trainer.records),
the policy, optimizer and scheduler from the checkpoint at rollout K - 1 (`<run_dir>/ckpt`, the base
for K = 1), the config from the run (`<run_dir>/.hydra/overrides.yaml`) with the given overrides on
top. The step then runs as in training from its advantages on (`GRPOTrainer.step`, the rollout
replaced by the record): advantages from the recorded rewards, packing, reference and old-policy
log-probs, the updates. Unchanged, it reproduces the original step's metrics (on CPU with one torch
thread exactly: loss and grad norm equal); with e.g. `algorithm.clip_eps_high=0.28` or `algorithm.std_normalize=false`
it shows what that setting would have done to the step. It prints original, replay and difference
per metric and writes them to `<run_dir>/replay/step_<KKKKKK>.json` (six digits); nothing else in the run changes.
Exit status 2 (one line) for a missing record, checkpoint or run directory, or a changed group size.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

SHOWN = ("loss/total", "grad_norm", "loss/pg", "loss/ref_kl", "loss/entropy", "loss/clip_frac_low",
         "loss/clip_frac_high", "loss/ratio_max", "loss/adv_mean", "loss/adv_std", "logprob_gap/mean")


def samples_of(table, group_size: int):
    """The `Sample`s of a rollout record (pyarrow Table), in rollout order, as the trainer held them
    before advantages (`advantage` is recomputed by the step)."""
    import torch

    from r1mega.trainer.grpo import Sample

    cols = table.to_pydict()
    terms = [c[len("reward/"):] for c in cols if c.startswith("reward/")]
    if len(cols["sample"]) % group_size:
        raise ValueError(f"{len(cols['sample'])} samples are not whole groups of algorithm.group_size={group_size}")
    out = []
    for i in range(len(cols["sample"])):
        routes = cols["routes"][i]
        out.append(Sample(cols["prompt_index"][i], cols["prompt_ids"][i], cols["response_ids"][i],
                          cols["engine_logp"][i], cols["truncated"][i], {t: cols[f"reward/{t}"][i] for t in terms},
                          routes=None if routes is None else torch.tensor(routes).view(*cols["routes_shape"][i])))
    return out


def replay(run_dir: Path, step: int, overrides: list[str]) -> dict:
    """Replays rollout `step` (1-based) of the run in `run_dir`; returns {metric: [original, replay]}."""
    from omegaconf import OmegaConf

    from r1mega.checkpoint.atomic import write_text
    from r1mega.config import compose
    from r1mega.parallel.state import destroy_distributed, init_distributed, is_rank0, seed_everything
    from r1mega.recipes.base import prepare_base
    from r1mega.recipes.r1_zero import load_models
    from r1mega.trainer import records
    from r1mega.trainer.grpo import GRPOTrainer

    run_overrides = OmegaConf.load(run_dir / ".hydra" / "overrides.yaml")
    cfg = compose([*run_overrides, *overrides, f"run_dir={run_dir}"])
    original = {r["step"]: r for r in map(json.loads, (run_dir / f"{cfg.recipe.name}_metrics.jsonl").open())}
    if step not in original:
        raise FileNotFoundError(f"{run_dir}/{cfg.recipe.name}_metrics.jsonl has no row for rollout {step}")
    samples = samples_of(records.read(run_dir, step), cfg.algorithm.group_size)

    class Replay(GRPOTrainer):
        def _collect(self, rollout):  # the record instead of generation and rewards
            self._hold_routes(samples, 0, 0)
            return samples

    init_distributed(cfg.parallel, cfg.platform)
    seed_everything(cfg.platform.seed, on_cpu=cfg.platform.device == "cpu")
    try:
        policy, ref, _, ref_step = load_models(cfg, prepare_base(cfg), run_dir, step=step - 1)
        trainer = Replay(cfg, policy, ref, None, None, None)
        trainer.load_state_dict({"ref_step": ref_step})
        got = trainer.step(step - 1)
    finally:
        destroy_distributed()
    keys = [k for k in original[step] if k in got and not k.startswith(("time/", "throughput/"))]
    result = {k: [original[step][k], got[k]] for k in keys}
    if is_rank0():
        out = run_dir / "replay" / f"step_{step:06d}.json"
        out.parent.mkdir(exist_ok=True)
        write_text(out, json.dumps({"step": step, "overrides": overrides, "metrics": result}, indent=1))
        _print(step, run_dir, overrides, result, out)
    return result


def _print(step: int, run_dir: Path, overrides: list[str], result: dict, out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"rollout {step} of {run_dir}, replayed{' with ' + ' '.join(overrides) if overrides else ''}")
    for col in ("metric", "original", "replay", "difference"):
        table.add_column(col, justify="left" if col == "metric" else "right")
    for k in [k for k in SHOWN if k in result] + [k for k in result if k not in SHOWN]:
        a, b = result[k]
        table.add_row(k, f"{a:.6g}", f"{b:.6g}", "same" if a == b else f"{b - a:+.3g}")
    Console(soft_wrap=True).print(table)
    print(f"written: {out}")


USAGE = """usage: python -m r1mega.replay <run_dir> step=K [hydra overrides]

Re-runs the update of rollout K (1-based) of an R1-Zero run from its rollout record and the
checkpoint at rollout K-1, without generating; prints original, replay and difference per metric
and writes them to <run_dir>/replay/step_<KKKKKK>.json. Overrides change the step (e.g. algorithm.*).

example: python -m r1mega.replay runs/r1_zero/tiny_moe step=12 algorithm.clip_eps_high=0.28
exit status: 0 done; 2 bad arguments, or no record / checkpoint / metrics row for K"""


def main(argv: list[str] | None = None) -> None:
    from r1mega.console import hold_harmless_warnings

    hold_harmless_warnings()  # the known-harmless library warnings (r1mega.console.HARMLESS) are not shown
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["-h"], ["--help"]):
        print(USAGE)
        sys.exit(0)
    steps = [a for a in argv[1:] if a.startswith("step=")]
    if not argv or len(steps) != 1 or not steps[0][5:].isdigit() or int(steps[0][5:]) < 1:
        print(USAGE.splitlines()[0], file=sys.stderr)
        sys.exit(2)
    run_dir = Path(argv[0])
    overrides = [a for a in argv[1:] if a != steps[0]]
    if any(o.split("=", 1)[0].lstrip("+~") == "algorithm.group_size" for o in overrides):
        print("r1mega.replay: algorithm.group_size cannot change: the record's groups are fixed", file=sys.stderr)
        sys.exit(2)
    if not (run_dir / ".hydra" / "overrides.yaml").is_file():
        print(f"r1mega.replay: {run_dir} is not a run directory (no .hydra/overrides.yaml)", file=sys.stderr)
        sys.exit(2)
    try:
        replay(run_dir, int(steps[0][5:]), overrides)
    except FileNotFoundError as e:
        print(f"r1mega.replay: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
