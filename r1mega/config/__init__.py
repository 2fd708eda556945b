"""Config: typed schemas (`schema`; the `algorithm` group's in `algorithm`, the `reward` group's in `reward`,
the multi-stage recipes' in `recipes`), cross-field rules (`validate`), and composition from `conf/`.
Imports only Hydra/OmegaConf: no torch, megatron, vLLM or reward graders (tests/test_architecture.py)."""
from __future__ import annotations

from pathlib import Path

from r1mega.config.hf import register_resolver, with_hf_default
from r1mega.config.schema import register_configs
from r1mega.config.validate import ConfigError, one_line, validate, world_size_of

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"

register_configs()
register_resolver()  # ${hf:<field>} of conf/model/hf.yaml
import r1mega.config.recipes  # noqa: E402,F401  (registers recipe/r1_recipe_schema, recipe/distill_recipe_schema)


def compose(overrides: list[str] | None = None, config_name: str = "config"):
    """Compose `conf/<config_name>.yaml` with Hydra overrides and validate it (for tools and tests).
    `recipe.base=<HF directory>` without a `model=` override takes `model=hf` (`r1mega.config.hf`)."""
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = hydra_compose(config_name=config_name, overrides=with_hf_default(list(overrides or [])))
    validate(cfg)
    return cfg


__all__ = ["CONF_DIR", "ConfigError", "compose", "one_line", "validate", "world_size_of"]
