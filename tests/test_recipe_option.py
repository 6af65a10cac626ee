"""`minitron <stage> recipe=NAME` gives a stage the config the recipe's pipeline would give it."""

from __future__ import annotations

import pytest
from hydra import compose

from nemo_minitron.cli.compose import config_class, hydra_conf, recipe_names, stage_config_name, typed

# stage command -> its block in a recipe
RECIPE_BLOCKS = {"teacher-correct": "teacher_correct", "prune": "prune", "search": "search", "distill": "distill",
                 "align": "align", "eval": "eval"}


@pytest.mark.parametrize("name", recipe_names())
@pytest.mark.parametrize("stage", sorted(RECIPE_BLOCKS))
def test_recipe_option_composes_what_the_pipeline_gives_the_stage(stage, name):
    from nemo_minitron.pipeline import PipelineConfig

    config_name, overrides = stage_config_name(stage, [f"recipe={name}", "seed=7"])
    assert overrides == ["seed=7"]
    with hydra_conf():
        with_option = typed(config_class(stage), compose(config_name=config_name, overrides=overrides))
        pipeline = typed(PipelineConfig, compose(config_name=f"recipes/{name}", overrides=overrides))
    assert with_option == getattr(pipeline, RECIPE_BLOCKS[stage])


def test_without_recipe_the_stage_config_is_unchanged():
    assert stage_config_name("distill", ["train.steps=5"]) == ("distill", ["train.steps=5"])


@pytest.mark.parametrize(("stage", "args", "message"), [
    ("distill", ["recipe=nope"], r"recipe=nope is not one of \['llama31_minitron_4b_depth', "),
    ("import", ["recipe=mn_minitron_8b"], r"recipe= applies to the stages \[.*'distill'.*\], not import; a whole "
                                          r"recipe runs as `minitron pipeline --config-name recipes/mn_minitron_8b`"),
])
def test_bad_recipe_option_is_a_user_error(stage, args, message):
    with pytest.raises(ValueError, match=message):
        stage_config_name(stage, args)
