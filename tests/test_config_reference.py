"""Settings are defined once, in the stages' config classes: every stage composed by Hydra with no
overrides equals its class's defaults field by field, and docs/configuration.md, generated from the
classes, matches a fresh generation with a description for every key."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import pytest
from hydra import compose

import config_reference  # scripts/, on sys.path by conftest
from config_reference import REGENERATE, ConfigTree, field_descriptions, render
from nemo_minitron.cli.compose import config_class, hydra_conf, typed
from nemo_minitron.cli.commands import STAGES
from nemo_minitron.stage_config import StageConfig, defaults_of, nested

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "nemo_minitron" / "conf"
DOC = ROOT / "docs" / "configuration.md"


@pytest.fixture(scope="module")
def tree() -> ConfigTree:
    return ConfigTree(CONF)


def differences(ours, reference, prefix: str = "") -> list[str]:
    """Dotted keys where two configs of one class differ, with both values."""
    if not dataclasses.is_dataclass(reference):
        return [] if ours == reference else [f"{prefix[:-1]}: {ours!r} != {reference!r}"]
    return [diff for f in dataclasses.fields(reference)
            for diff in differences(getattr(ours, f.name), getattr(reference, f.name), f"{prefix}{f.name}.")]


@pytest.mark.parametrize("stage", list(STAGES))
def test_the_command_line_and_the_python_api_share_every_default(stage):
    """`minitron STAGE` with no overrides runs the config `mt.<Stage>Config()` makes."""
    cls = config_class(stage)
    with hydra_conf():
        composed = typed(cls, compose(config_name=stage))
    assert differences(composed, cls()) == []


def test_the_pipeline_defaults_are_the_main_job_and_reach_every_block():
    from nemo_minitron.pipeline import PipelineConfig

    cfg = PipelineConfig(tp=2, seed=7, dtype="float16", overwrite=True)
    assert (cfg.prune.target.ffn_hidden_size, cfg.prune.target.num_layers, cfg.distill.train.steps) == (768, 24, 64)
    corrected = cfg.teacher_correct.with_schedule()
    assert (cfg.enabled.teacher_correct, cfg.prune_from, corrected.train.steps, corrected.optim.lr,
            corrected.optim.min_lr) == (True, "imported", 12, 2.0e-4, pytest.approx(2.0e-5))
    for block in PipelineConfig.STAGE_BLOCKS:
        assert {k: getattr(getattr(cfg, block), k) for k in ("tp", "seed", "dtype", "overwrite")} == {
            "tp": 2, "seed": 7, "dtype": "float16", "overwrite": True}, block
    assert cfg.search.distill.tp == 2  # and the search hands them on to its own blocks


def test_a_nested_config_is_its_class_defaults_with_the_changes():
    @dataclass
    class Inner:
        a: int = 1
        b: int = 2

    @dataclass
    class Outer:
        inner: Inner = nested(Inner, b=5)

    assert Outer().inner == Inner(a=1, b=5)
    assert defaults_of(Outer) == {"inner": {"a": 1, "b": 5}}
    assert Outer().inner is not Outer().inner  # a fresh copy per config


def test_defaults_are_read_without_resolving_auto():
    from nemo_minitron.distill.stage import DistillConfig

    assert defaults_of(DistillConfig)["dtype"] == "auto" and DistillConfig().dtype in ("bfloat16", "float32")


def test_committed_reference_is_current(tree):
    assert DOC.read_text() == render(tree), f"docs/configuration.md is stale: regenerate it with `{REGENERATE}`"


def test_every_key_of_every_stage_has_a_description(tree):
    undescribed = [f"{stage}: {row.key}" for stage in STAGES for row in tree.rows(stage)
                   if not row.is_group and not row.description]
    assert undescribed == []
    assert tree.problems() == []


def test_reference_covers_stages_keys_and_recipes(tree):
    markdown = render(tree)
    for stage in STAGES:
        assert f"## minitron {stage}\n" in markdown
    assert "| `train.steps` | `0` | optimizer steps (required: at least 1) |" in markdown
    assert "| `tp` | `1` | tensor-parallel size" in markdown    # StageConfig's keys in every stage
    assert ("| `teacher_correct.enabled` | `true` | fine-tune the teacher on the training split first, to distil "
            "from it |") in markdown
    for recipe in tree.recipes:
        assert f"### {recipe}\n" in markdown
    assert "| `prune.target.num_layers` | `16` | `24` |" in markdown  # a recipe override and its default


@dataclass
class _Described(StageConfig):
    # a comment block above
    # spanning two lines
    above: int = 1
    trailing: str = "a # inside a string"  # the real comment
    bare: int = 3
    tp: int = 1   # redeclared: this class's own words


def test_descriptions_are_the_comments_on_and_above_each_field():
    found = {name: text for name, (text, _) in field_descriptions(_Described).items()}
    assert found["above"] == "a comment block above spanning two lines"
    assert found["trailing"] == "the real comment"
    assert found["bare"] == ""
    assert found["tp"] == "redeclared: this class's own words"
    assert found["seed"].startswith("seeds the model-parallel RNGs")  # inherited from StageConfig


def test_an_undescribed_field_is_reported():
    (problem,) = config_reference.undescribed_fields(_Described)
    assert problem.startswith("tests/test_config_reference.py:") and "`_Described.bare` has no description" in problem


def test_check_fails_on_a_stale_reference(tmp_path, capsys):
    doc = tmp_path / "configuration.md"
    assert config_reference.main(["--output", str(doc)]) == 0
    assert config_reference.main(["--check", "--output", str(doc)]) == 0
    doc.write_text(doc.read_text().replace("tensor-parallel size", "tensor parallel size", 1))
    assert config_reference.main(["--check", "--output", str(doc)]) == 1
    err = capsys.readouterr().err
    assert f"is stale: regenerate it with `{REGENERATE}`" in err and "+| `tp` | `1` | tensor-parallel size" in err
