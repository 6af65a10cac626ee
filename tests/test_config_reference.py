"""docs/configuration.md is generated from nemo_minitron/conf/ and stays so: it matches a fresh generation, every key
has a description, and a key or typed-config field that slips through undocumented is reported."""

from __future__ import annotations

import shutil
import textwrap
from pathlib import Path

import pytest

import config_reference  # scripts/, on sys.path by conftest
from config_reference import REGENERATE, ConfigTree, read_conf_file, render
from nemo_minitron.cli.stages import STAGES

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "nemo_minitron" / "conf"
DOC = ROOT / "docs" / "configuration.md"


@pytest.fixture(scope="module")
def tree() -> ConfigTree:
    return ConfigTree(CONF)


@pytest.fixture
def conf_copy(tmp_path) -> Path:
    return Path(shutil.copytree(CONF, tmp_path / "conf"))


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
    assert "| `train.steps` | **required** |" in markdown      # ??? reads "required"
    assert "| `tp` | `1` | tensor-parallel size" in markdown    # _base keys are composed in
    for recipe in tree.recipes:
        assert f"### {recipe}\n" in markdown
    assert "| `prune.target.num_layers` | `16` | `24` |" in markdown  # a recipe override and its default


def test_uncommented_key_is_reported_and_check_fails(conf_copy, tmp_path, capsys):
    doc = tmp_path / "configuration.md"
    assert config_reference.main(["--conf-dir", str(conf_copy), "--output", str(doc)]) == 0
    assert config_reference.main(["--check", "--conf-dir", str(conf_copy), "--output", str(doc)]) == 0

    with (conf_copy / "eval.yaml").open("a") as f:
        f.write("window_stride: 3\n")
    assert config_reference.main(["--check", "--conf-dir", str(conf_copy), "--output", str(doc)]) == 1
    err = capsys.readouterr().err
    assert "conf/eval.yaml: `window_stride` has no description" in err
    assert f"is stale: regenerate it with `{REGENERATE}`" in err
    assert "+| `window_stride` | `3` |" in err  # the diff shows the new row


def test_dataclass_field_missing_from_yaml_is_reported(conf_copy):
    distill = conf_copy / "distill.yaml"
    lines = distill.read_text().splitlines(keepends=True)
    distill.write_text("".join(line for line in lines if not line.startswith("  adam_eps:")))
    problems = ConfigTree(conf_copy).problems()
    assert "conf/distill.yaml: `optim.adam_eps` is a field of OptimConfig but missing from the YAML" in problems


def test_comment_attribution(tmp_path):
    path = tmp_path / "stage.yaml"
    path.write_text(textwrap.dedent("""\
        # @package _global_
        # The stage's introduction.
        #   minitron stage key=1
        defaults:
          - _base
          - _self_

        # a comment block above
        # spanning two lines
        above: 1
        trailing: "a # inside a string"  # the real comment
        wrapped: 2         # a long comment
                           # that wraps
        group:             # the group
          # the nested key
          nested: null
          flow: {a: 1, b: 2}   # the flow mapping

        # a section comment, then a blank line

        bare: 3
        """))
    conf = read_conf_file(path, "recipes/stage")
    assert conf.header == ["The stage's introduction.", "  minitron stage key=1"]
    assert conf.defaults == ["recipes/_base"]
    assert conf.descriptions == {
        "defaults": "",
        "above": "a comment block above spanning two lines",
        "trailing": "the real comment",
        "wrapped": "a long comment that wraps",
        "group": "the group",
        "group.nested": "the nested key",
        "group.flow": "the flow mapping",
        "group.flow.a": "",
        "group.flow.b": "",
        "bare": "",
    }
