"""Config composition: YAML files + overrides -> the typed config a stage function takes.

- `conf_dir()`: the YAML configs shipped inside the package (`nemo_minitron/conf/`).
- `stage_config(name, block, **fixed)`: conf/<name>.yaml, then a pipeline or recipe block for that
  stage, then fixed values (the pipeline's paths).
- `typed(cls, cfg, nested=...)`: a composed config -> its dataclass, with OmegaConf's type checks
  (`train.steps=abc` fails here, before any work) and unknown keys refused. Blocks that configure
  another stage (the search's `prune` / `distill`, the pipeline's stage blocks) are composed over
  that stage's own YAML first, so a block only states what differs.
- `recipe=NAME` on a stage command: the recipe's block for that stage as a stored config.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from nemo_minitron.cli.stages import STAGES, block_name
from nemo_minitron.errors import UserError

# Blocks of a config that are themselves stage configs: key -> the stage whose YAML they override.
NESTED_STAGES: dict[str, dict[str, str]] = {
    "search": {"prune": "prune", "distill": "distill"},
    "pipeline": {"teacher_correct": "teacher-correct", "search": "search", "prune": "prune", "distill": "distill",
                 "align": "align", "eval": "eval"},
}
_COMMON_KEYS = ("tp", "pp", "seed", "dtype")


def conf_dir() -> Path:
    """nemo_minitron/conf (installed with the package); MINITRON_CONF_DIR overrides it."""
    override = os.environ.get("MINITRON_CONF_DIR")
    path = Path(override) if override else Path(__file__).resolve().parents[1] / "conf"
    if not path.is_dir():
        raise UserError(f"config directory {path} not found: reinstall nemo-minitron or set MINITRON_CONF_DIR")
    return path


def recipe_names(conf: Path | None = None) -> list[str]:
    """The published recipes: conf/recipes/*.yaml without the suffix (of `conf`, default the package's)."""
    return sorted(path.stem for path in ((conf or conf_dir()) / "recipes").glob("*.yaml"))


def block_overrides(block: Any) -> dict:
    """A pipeline block as overrides of its stage's config: the block without its `enabled` switch."""
    settings = OmegaConf.to_container(block) if OmegaConf.is_config(block) else dict(block or {})
    return {k: v for k, v in settings.items() if k != "enabled"}


def stage_config(name: str, block: Any = None, **fixed: Any) -> DictConfig:
    """conf/<name>.yaml, then a block for it, then `fixed` (inside an initialised Hydra)."""
    from hydra import compose

    return OmegaConf.merge(compose(config_name=name), block_overrides(block), fixed)


def _drop_missing(cfg: DictConfig) -> DictConfig:
    """A copy of `cfg` without its '???' values (a nested stage's paths, set by the caller)."""
    cfg = cfg.copy()
    OmegaConf.set_struct(cfg, False)
    for key in sorted(OmegaConf.missing_keys(cfg), key=lambda k: -k.count(".")):
        parent, _, leaf = key.rpartition(".")
        node = OmegaConf.select(cfg, parent) if parent else cfg
        del node[leaf]
    return cfg


def typed(cls, cfg: DictConfig, stage: str | None = None, nested: bool = False):
    """The dataclass `cls` from a composed config. `stage` names the config's own stage so that its
    blocks that configure other stages are composed over their YAML; `nested` leaves unset
    (`???`) keys to the dataclass defaults instead of failing (the caller fills them in)."""
    from omegaconf.errors import OmegaConfBaseException

    cfg = _drop_missing(cfg) if nested else cfg
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise UserError(f"missing required key: set {missing[0]}=...")
    plain = OmegaConf.to_container(cfg, resolve=True)
    nested_configs = {}
    common = {k: cfg[k] for k in _COMMON_KEYS if cfg.get(k) is not None}  # the pipeline's dtype=null: each stage its own
    for key, sub_stage in NESTED_STAGES.get(stage, {}).items():
        block = plain.pop(key, None)
        composed = stage_config(sub_stage, block, **common)
        nested_configs[key] = typed(_field_type(cls, key), composed, sub_stage, nested=True)
        if isinstance(block, dict) and "enabled" in block:  # the pipeline's optional stages
            plain.setdefault("enabled", {})[key] = bool(block["enabled"])
    try:
        merged = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cls), plain))
    except OmegaConfBaseException as err:
        raise UserError(_config_error(err)) from None
    for key, value in nested_configs.items():
        setattr(merged, key, value)
    return merged


def _field_type(cls, key: str) -> type:
    field = next(f for f in dataclasses.fields(cls) if f.name == key)
    return field.default_factory().__class__


def _config_error(err) -> str:
    """OmegaConf's multi-line message as one line naming the key."""
    first = str(err).splitlines()[0]
    key = getattr(err, "full_key", None)
    if "not in" in first and key:
        return f"unknown key {key}: check the spelling (`--help` lists the keys)"
    return f"{key}: {first}" if key else first


def stage_config_name(stage: str, overrides: list[str]) -> tuple[str, list[str]]:
    """The Hydra config to compose for `stage` and the overrides to apply on it: conf/<stage>.yaml
    and `overrides` as given, or, with recipe=NAME among them (the last one counts), a config that
    layers the recipe over conf/<stage>.yaml and the other overrides."""
    names = [arg.split("=", 1)[1] for arg in overrides if arg.startswith("recipe=")]
    if not names:
        return stage, overrides
    return _store_recipe_stage(stage, names[-1]), [arg for arg in overrides if not arg.startswith("recipe=")]


def _store_recipe_stage(stage: str, name: str) -> str:
    """Put conf/<stage>.yaml + the recipe's block for it into Hydra's config store; its name there."""
    from hydra import compose, initialize_config_dir
    from hydra.core.config_store import ConfigStore

    names = recipe_names()
    if name not in names:
        raise UserError(f"recipe={name} is not one of {names} (conf/recipes/)")
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        recipe = compose(config_name=f"recipes/{name}")
    block = block_name(stage)
    if block not in recipe:
        with_blocks = [s for s in STAGES if block_name(s) in recipe]
        raise UserError(f"recipe= applies to the stages {with_blocks}, not {stage}; "
                        f"a whole recipe runs as `minitron pipeline --config-name recipes/{name}`")
    config_name = f"{stage}_recipe_{name}"
    # the recipe's dtype, when set, wins over its block's, as the pipeline gives it to every stage
    dtype = {} if recipe.dtype is None else {"dtype": recipe.dtype}
    ConfigStore.instance().store(
        name=config_name, node={"defaults": [stage, "_self_"], **block_overrides(recipe[block]), **dtype})
    return config_name
