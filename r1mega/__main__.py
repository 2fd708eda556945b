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

from r1mega.config import CONF_DIR, ConfigError, compose, one_line
from r1mega.models.params import count_parameters


def preflight(argv: list[str]) -> DictConfig:
    """Compose and validate the job config exactly as the run will see it; exit 2 on any problem.
    With `-m` (multirun) every job of the sweep is checked so, before any of them runs; the last
    job's config is returned."""
    args = get_args_parser().parse_args(argv)
    overrides = [o for o in args.overrides if not o.lstrip("+~").startswith("hydra")]
    if not args.multirun:
        return _check(overrides, args)
    jobs = sweep_jobs(overrides)
    for i, job in enumerate(jobs, 1):
        cfg = _check(job, args, f"sweep job {i}/{len(jobs)} ({' '.join(job)})")
    return cfg


def sweep_jobs(overrides: list[str]) -> list[list[str]]:
    """The override list of each job `-m` launches, as Hydra's basic sweeper expands them (the
    cartesian product of comma lists, `range(...)`, `glob(...)`); exit 2 on a malformed sweep."""
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra._internal.utils import create_config_search_path
    from hydra.core.override_parser.overrides_parser import OverridesParser

    loader = ConfigLoaderImpl(config_search_path=create_config_search_path(str(CONF_DIR)))
    try:
        parsed = OverridesParser.create(config_loader=loader).parse_overrides(overrides)
        return BasicSweeper.split_arguments(parsed, max_batch_size=None)[0]
    except Exception as e:  # hydra's parse and sweep errors
        print(f"r1mega: invalid sweep: {one_line(e)}", file=sys.stderr)
        sys.exit(2)


def _check(overrides: list[str], args, job: str | None = None) -> DictConfig:
    """`preflight` of one job (`job`: how errors name it in a sweep)."""
    job_ = f"{job}: " if job else ""
    try:
        cfg = compose(overrides)
    except ConfigError as e:
        more = f" ({len(e.problems) - 1} more problem(s) after fixing this)" if len(e.problems) > 1 else ""
        print(f"r1mega: invalid config: {job_}{e.problems[0]}{more}", file=sys.stderr)
        sys.exit(2)
    except Exception as e:  # hydra/omegaconf composition errors (bad type, unknown key or option)
        print(f"r1mega: invalid config: {job_}{one_line(e)}", file=sys.stderr)
        sys.exit(2)
    if not (args.cfg or args.help or args.hydra_help or args.info or args.shell_completion):
        problem = dir_problem("run_dir", cfg.run_dir)  # Hydra creates run_dir (hydra.run.dir) first thing
        if problem:
            print(f"r1mega: invalid config: {job_}{problem}", file=sys.stderr)
            sys.exit(2)
    print(count_parameters(cfg.model).summary(cfg.model.name), file=sys.stderr)
    if "rollouts" in cfg.recipe:  # an RL recipe: its step arithmetic before anything runs
        from r1mega.config.steps import step_plan

        print(f"{cfg.recipe.name}: {step_plan(cfg.recipe, cfg.algorithm).line()}", file=sys.stderr)
    memory_check(cfg, job)
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


def memory_check(cfg: DictConfig, job: str | None = None) -> None:
    """Refuse (exit 2) before anything is built when the planner's per-device estimate exceeds the
    device (r1mega.plan.preflight); `platform.memory_check=false` skips it."""
    import os

    from r1mega.plan.preflight import check

    result = check(cfg)
    if not result.fits:
        if os.environ.get("RANK", "0") == "0":
            print("\n".join(([job] if job else []) + result.lines()), file=sys.stderr)
        sys.exit(2)


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def _run(cfg: DictConfig) -> None:
    from r1mega.recipes import run_recipe

    if cfg.recipe.name != "none":
        from r1mega.parallel import interrupt

        interrupt.shield_helpers()
        interrupt.stop_point()  # a signal during composition and checks
    from r1mega.console import session

    with session(cfg):  # r1mega's lines on the terminal, the rest in <run_dir>/run.log (verbose=true: all)
        run_recipe(cfg)


def main() -> None:
    # Ctrl-C / SIGTERM: the loops stop at their next safe point with a checkpoint (all ranks agree),
    # then one line and exit 130 / 143 (r1mega.parallel.interrupt); no traceback.
    from r1mega.console import hold_harmless_warnings
    from r1mega.parallel import interrupt

    hold_harmless_warnings()  # known-harmless library warnings go to the run's log (r1mega.console)
    interrupt.install()
    from r1mega.config.hf import with_hf_default

    sys.argv[1:] = with_hf_default(sys.argv[1:])  # recipe.base=<HF dir> without model=: model=hf, for Hydra too
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
