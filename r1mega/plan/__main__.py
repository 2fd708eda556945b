"""`python -m r1mega.plan [hydra overrides]`: will it fit, and how long is an RL step?

Without `parallel=` (or `rollout=`) on the command line the breakdown shows the best layout the
search finds; with it, the layout given. The first line is the verdict (FITS / DOES NOT FIT, the
worst stage's GB per GPU or the first limit hit). Exit status: 0 fits, 1 the layout planned for
(the one given, or the best found) does not fit, 2 bad overrides (one line naming the field).
"""
from __future__ import annotations

import sys

from r1mega.config import CONF_DIR

# "Does not fit" is the planner's answer, not an error: 2 stays "bad input" (as grep's 1 vs 2).
# `python -m r1mega` exits 2 over memory because there it refuses to start the run.
EXIT_DOES_NOT_FIT = 1

USAGE = """usage: python -m r1mega.plan [override ...]

Pre-flight planner: will this model fit this cluster with this training layout and vLLM engine,
and how long is one RL step? Arithmetic on the config (no model is built); prints the verdict
first, then memory per GPU, time per RL step and the fastest layouts that fit.

main overrides (Hydra; planner fields in r1mega/plan/schema.py, groups under conf/):
  model=NAME           {model}
  cluster=NAME         {cluster}
  num_gpus=N           GPUs planned for (default: parallel.world_size, else one node)
  parallel=NAME        training layout to judge ({parallel}); without it: the best one found
  rollout=NAME         vLLM engine layout ({rollout}); without it: the best one found
  seq_length=N prompt_length=N global_batch_size=N   the RL step's workload
  recompute=none|selective|full   rl=false (pretraining: no rollout)   top_k=N
  output=table|json|wandb

example:
  python -m r1mega.plan model=deepseek_v3_671b cluster=h100_80gb num_gpus=256 seq_length=67584

exit status: 0 fits, 1 does not fit (the layout given, or the best found), 2 bad overrides."""


def _usage() -> str:
    names = {g: ", ".join(sorted(f.stem for f in (CONF_DIR / g).glob("*.yaml")))
             for g in ("model", "cluster", "parallel", "rollout")}
    return USAGE.format(**names)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if {"-h", "--help"} & set(args):
        print(_usage())
        return 0
    from r1mega.config import one_line
    from r1mega.config import ConfigError

    named = {a.split("=", 1)[0].lstrip("+~").split(".")[0] for a in args}
    if "parallel" not in named and "layout" not in named:
        args.append("layout=best")
    if "rollout" not in named and "rollout_layout" not in named:
        args.append("rollout_layout=best")
    from r1mega.plan import compose_plan, plan
    from r1mega.plan.report import headline, render, to_json, to_wandb

    try:
        cfg = compose_plan(args)
    except ConfigError as e:
        more = f" ({len(e.problems) - 1} more problem(s) after fixing this)" if len(e.problems) > 1 else ""
        print(f"r1mega.plan: invalid config: {e.problems[0]}{more}", file=sys.stderr)
        return 2
    except Exception as e:  # hydra/omegaconf composition errors (bad type, unknown key or option)
        print(f"r1mega.plan: invalid config: {one_line(e)}", file=sys.stderr)
        return 2
    result = plan(cfg)
    if cfg.output in ("json", "wandb"):
        print(to_json(result) if cfg.output == "json" else to_wandb(result))
        print(headline(result, cfg.cluster.gpu_memory_gb), file=sys.stderr)  # stdout stays machine-readable
    else:
        render(result, cfg.cluster.gpu_memory_gb)
    return 0 if result["verdict"]["fits"] else EXIT_DOES_NOT_FIT


if __name__ == "__main__":
    sys.exit(main())
