"""`minitron <stage> recipe=NAME`: one stage of a published recipe (conf/recipes/NAME.yaml) as its own
command, e.g. its own Slurm job (launchers/distill_mn8b.sh).

A recipe is a pipeline config; the stage gets what `minitron pipeline --config-name recipes/NAME`
would give it: conf/<stage>.yaml, then the recipe's block for the stage (`teacher_correct` for
teacher-correct, `prune`, `search`, `distill`, `align`, `eval`) and its dtype, then the command
line's overrides, which win over the recipe. `--cfg job` shows the result.
"""

from __future__ import annotations

from pathlib import Path

from nemo_minitron.cli.main import STAGES, conf_dir


def recipe_names(conf: Path | None = None) -> list[str]:
    """The published recipes: conf/recipes/*.yaml without the suffix (of `conf`, default the package's)."""
    return sorted(path.stem for path in ((conf or conf_dir()) / "recipes").glob("*.yaml"))


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

    from nemo_minitron.cli.pipeline import block_overrides

    names = recipe_names()
    if name not in names:
        raise ValueError(f"recipe={name} is not one of {names} (conf/recipes/)")
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        recipe = compose(config_name=f"recipes/{name}")
    block = stage.replace("-", "_")
    if block not in recipe:
        with_blocks = [s for s in STAGES if s.replace("-", "_") in recipe]
        raise ValueError(f"recipe= applies to the stages {with_blocks}, not {stage}; "
                         f"a whole recipe runs as `minitron pipeline --config-name recipes/{name}`")
    config_name = f"{stage}_recipe_{name}"
    ConfigStore.instance().store(
        name=config_name, node={"defaults": [stage, "_self_"], "dtype": recipe.dtype, **block_overrides(recipe[block])})
    return config_name
