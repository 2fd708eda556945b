"""Recipes picked by `recipe=`; each is a function of the composed config."""
from __future__ import annotations

from omegaconf import DictConfig


def run_recipe(cfg: DictConfig) -> None:
    if cfg.recipe.name == "none":
        print(f"config is valid (model={cfg.model.name}, parallel={cfg.parallel.name}, platform={cfg.platform.name})")
        return
    if cfg.recipe.name == "r1_zero":
        from r1mega.recipes import r1_zero

        r1_zero.run(cfg)
        return
    if cfg.recipe.name == "r1":
        from r1mega.recipes import r1

        r1.run(cfg)
        return
    if cfg.recipe.name == "distill":
        from r1mega.recipes import distill

        distill.run(cfg)
        return
    raise NotImplementedError(f"recipe={cfg.recipe.name} is not implemented yet")
