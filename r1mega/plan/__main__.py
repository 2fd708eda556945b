"""`python -m r1mega.plan [hydra overrides]`: will it fit, and how long is an RL step?

Without `parallel=` (or `rollout=`) on the command line the breakdown shows the best layout the
search finds; with it, the layout given. Bad overrides exit 2 with one line naming the field.
"""
from __future__ import annotations

import sys

from r1mega.__main__ import _one_line
from r1mega.config import ConfigError


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    named = {a.split("=", 1)[0].lstrip("+~").split(".")[0] for a in args}
    if "parallel" not in named and "layout" not in named:
        args.append("layout=best")
    if "rollout" not in named and "rollout_layout" not in named:
        args.append("rollout_layout=best")
    from r1mega.plan import compose_plan, plan
    from r1mega.plan.report import render, to_json, to_wandb

    try:
        cfg = compose_plan(args)
    except ConfigError as e:
        more = f" ({len(e.problems) - 1} more problem(s) after fixing this)" if len(e.problems) > 1 else ""
        print(f"r1mega.plan: invalid config: {e.problems[0]}{more}", file=sys.stderr)
        return 2
    except Exception as e:  # hydra/omegaconf composition errors (bad type, unknown key or option)
        print(f"r1mega.plan: invalid config: {_one_line(e)}", file=sys.stderr)
        return 2
    result = plan(cfg)
    if cfg.output == "json":
        print(to_json(result))
    elif cfg.output == "wandb":
        print(to_wandb(result))
    else:
        render(result, cfg.cluster.gpu_memory_gb)
    return 0


if __name__ == "__main__":
    sys.exit(main())
