"""`python -m r1mega [hydra overrides]`: compose, validate, then run the chosen recipe.

Composition errors and rule violations are reported as one line per problem naming the field,
and exit with status 2 before anything is built; so does a run whose per-device memory estimate
(r1mega.plan.preflight) exceeds the device, with the planner's breakdown (platform.memory_check=false
skips that check).
"""
from __future__ import annotations

import sys

import hydra
from hydra._internal.utils import get_args_parser
from omegaconf import DictConfig

from r1mega.config import CONF_DIR, ConfigError, compose
from r1mega.models.params import count_parameters


def _one_line(exc: BaseException) -> str:
    """Hydra/OmegaConf errors span several lines; keep the message and the full key."""
    cause = exc
    while cause.__cause__ is not None and not getattr(cause, "full_key", None):
        cause = cause.__cause__
    msg = str(getattr(cause, "msg", None) or cause).strip().splitlines()[0]
    key = getattr(cause, "full_key", None)
    return f"{key}: {msg}" if key and key not in msg else msg


def preflight(argv: list[str]) -> DictConfig:
    """Compose and validate the job config exactly as the run will see it; exit 2 on any problem."""
    args = get_args_parser().parse_args(argv)
    overrides = [o for o in args.overrides if not o.lstrip("+~").startswith("hydra")]
    try:
        cfg = compose(overrides)
    except ConfigError as e:
        more = f" ({len(e.problems) - 1} more problem(s) after fixing this)" if len(e.problems) > 1 else ""
        print(f"r1mega: invalid config: {e.problems[0]}{more}", file=sys.stderr)
        sys.exit(2)
    except Exception as e:  # hydra/omegaconf composition errors (bad type, unknown key or option)
        print(f"r1mega: invalid config: {_one_line(e)}", file=sys.stderr)
        sys.exit(2)
    if not (args.cfg or args.help or args.hydra_help or args.info or args.shell_completion):
        problem = dir_problem("run_dir", cfg.run_dir)  # Hydra creates run_dir (hydra.run.dir) first thing
        if problem:
            print(f"r1mega: invalid config: {problem}", file=sys.stderr)
            sys.exit(2)
    print(count_parameters(cfg.model).summary(cfg.model.name), file=sys.stderr)
    if "rollouts" in cfg.recipe:  # an RL recipe: its step arithmetic before anything runs
        from r1mega.config.steps import step_plan

        print(f"{cfg.recipe.name}: {step_plan(cfg.recipe, cfg.algorithm).line()}", file=sys.stderr)
    memory_check(cfg)
    return cfg


def dir_problem(key: str, path) -> str | None:
    """Why directory `path` (the value of option `key`) cannot be created or written to, in one
    sentence, or None. Leaves nothing behind: it probes the nearest existing ancestor by making a
    temporary directory there and removing it at once (root passes `os.access` checks that
    `mkdir` then fails, e.g. under /proc or on a read-only mount)."""
    import os
    import tempfile
    from pathlib import Path

    probe = Path(os.path.expanduser(str(path))).absolute()
    while not probe.exists() and not probe.is_symlink() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        what = "a file" if probe.is_file() else "not a directory"
        return f"{key}={path} cannot be created: {probe} is {what}."
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".r1mega-probe-", dir=probe))
    except OSError as e:
        return f"{key}={path} cannot be written: no directory can be made in {probe} ({e.strerror})."
    return None


def memory_check(cfg: DictConfig) -> None:
    """Refuse (exit 2) before anything is built when the planner's per-device estimate exceeds the
    device (r1mega.plan.preflight); `platform.memory_check=false` skips it."""
    import os

    from r1mega.plan.preflight import check

    result = check(cfg)
    if not result.fits:
        if os.environ.get("RANK", "0") == "0":
            print("\n".join(result.lines()), file=sys.stderr)
        sys.exit(2)


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def _run(cfg: DictConfig) -> None:
    from r1mega.recipes import run_recipe

    if cfg.recipe.name != "none":
        from r1mega.parallel import interrupt

        interrupt.shield_helpers()
        interrupt.stop_point()  # a signal during composition and checks
    run_recipe(cfg)


def main() -> None:
    # Ctrl-C / SIGTERM: the loops stop at their next safe point with a checkpoint (all ranks agree),
    # then one line and exit 130 / 143 (r1mega.parallel.interrupt); no traceback.
    from r1mega.parallel import interrupt

    interrupt.install()
    try:
        preflight(sys.argv[1:])
        _run()
    except interrupt.Interrupted as e:
        interrupt.exit_for(e)
    except KeyboardInterrupt:  # only if something restored Python's own SIGINT handler
        print("r1mega: interrupted (SIGINT); run the same command to resume", file=sys.stderr, flush=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
