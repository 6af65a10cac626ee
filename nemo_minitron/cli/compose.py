"""Config composition: the config classes' defaults + YAML + overrides -> the typed config a stage
function takes.

- The config classes are the one source of every key, its type and its default
  (`nemo_minitron.stage_config`). `store_defaults(stage)` puts a stage's (`defaults_of` its class) into
  Hydra's config store as `<stage>_defaults`; conf/<stage>.yaml lists it in its `defaults`, so Hydra
  refuses an unknown key and a YAML recipe or a command line overrides any key, nested ones
  included, without a leading `+`.
- `typed(cls, cfg)`: a composed config -> its dataclass, with OmegaConf's type checks
  (`train.steps=abc` fails here, before any work) and unknown keys refused. A deprecated spelling
  the types cannot hold (align's `data=PATH`, now `data.train`) is rewritten first, with a warning
  (`stage_config.upgrade_old_spellings`).
- The pipeline's optional stages are switched by an `enabled` key in their block
  (`teacher_correct.enabled=true`), which is `PipelineConfig.enabled.<block>` in the class.
- `recipe=NAME` on a stage command: the recipe's block for that stage as a stored config.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from omegaconf import DictConfig, OmegaConf

from nemo_minitron.cli.commands import STAGES, block_name
from nemo_minitron.errors import UserError

SWITCHES = "enabled"  # the field of optional-stage switches, each written as its block's `enabled` key


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


def config_class(stage: str) -> type:
    """The typed config class of `stage` (the command table's; imports its module)."""
    entry = STAGES[stage]
    return getattr(importlib.import_module(entry.module), entry.config)


def defaults_name(stage: str) -> str:
    """The name of `stage`'s defaults in Hydra's config store (listed in conf/<stage>.yaml)."""
    return f"{stage}_defaults"


def user_tree(cls: type) -> dict[str, Any]:
    """The defaults of `cls` as a user writes them: each optional-stage switch as its block's
    `enabled` key."""
    from nemo_minitron.stage_config import defaults_of

    tree = defaults_of(cls)
    for block, on in tree.pop(SWITCHES, {}).items():
        tree[block] = {SWITCHES: on, **tree[block]}
    return tree


def store_defaults(*stages: str) -> None:
    """Put the defaults of `stages` into Hydra's config store (see the module docstring)."""
    from hydra.core.config_store import ConfigStore

    for stage in stages:
        ConfigStore.instance().store(name=defaults_name(stage), node=user_tree(config_class(stage)))


@contextmanager
def hydra_conf(conf: Path | None = None) -> Iterator[None]:
    """Inside the block, Hydra's `compose(config_name=...)` composes any stage or recipe of `conf`
    (default the package's conf/), as `minitron` does."""
    from hydra import initialize_config_dir

    store_defaults(*STAGES)
    with initialize_config_dir(config_dir=str((conf or conf_dir()).resolve()), version_base="1.3"):
        yield


def typed(cls, cfg: DictConfig):
    """The dataclass `cls` from a composed config (type-checked; an unknown key refused)."""
    from omegaconf.errors import OmegaConfBaseException

    from nemo_minitron.stage_config import upgrade_old_spellings

    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise UserError(f"missing required key: set {missing[0]}=...")
    plain = OmegaConf.to_container(cfg, resolve=True)
    if any(f.name == SWITCHES for f in dataclasses.fields(cls)):
        switches = {key: bool(block.pop(SWITCHES)) for key, block in plain.items()
                    if isinstance(block, dict) and SWITCHES in block}
        plain.setdefault(SWITCHES, {}).update(switches)
    upgrade_old_spellings(cls, plain)  # e.g. align's old `data=PATH`, now data.train (with a warning)
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cls), plain))
    except OmegaConfBaseException as err:
        raise UserError(_config_error(err)) from None


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
    store_defaults("pipeline")  # a recipe composes over conf/pipeline.yaml
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
    settings = OmegaConf.to_container(recipe[block])
    settings.pop(SWITCHES, None)
    ConfigStore.instance().store(name=config_name, node={"defaults": [stage, "_self_"], **settings, **dtype})
    return config_name
