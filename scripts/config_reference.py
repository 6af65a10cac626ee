"""`python scripts/config_reference.py [--check]`: write docs/configuration.md from the stages' config classes.

Every key, its type and its default come from a stage's config class (the command table's,
`nemo_minitron/cli/commands.py`); its description is the comment on the field's line, or the comment
lines directly above it, in the class's source. A config nested in another (`nested(...)`) shows the
nested class's descriptions under its key, with the values that hold in that place. Each stage's
config is composed through Hydra as `minitron <stage>` composes it, so the tables show the values a
user really gets; a stage's introduction is the header comment of conf/<stage>.yaml. A key without
a description, a stage without an introduction, or (with --check) a stale docs/configuration.md makes
the command exit 1, so the reference cannot silently rot.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import functools
import inspect
import io
import itertools
import json
import sys
import textwrap
import tokenize
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from nemo_minitron.cli.compose import SWITCHES, config_class, conf_dir, hydra_conf, recipe_names
from nemo_minitron.cli.commands import STAGES
from nemo_minitron.stage_config import NESTED

DEFAULT_OUTPUT = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"
REGENERATE = "python scripts/config_reference.py"


@dataclass(frozen=True)
class Row:
    key: str          # dotted path
    value: Any        # the composed default
    is_group: bool    # a nested config rather than a value
    description: str


@dataclass(frozen=True)
class Reference:
    markdown: str
    problems: list[str]


def header_of(path: Path) -> list[str]:
    """The leading comment block of a YAML file, "# " stripped, Hydra's `@package` directive dropped."""
    leading = itertools.takewhile(lambda line: line.lstrip().startswith("#"), path.read_text().splitlines())
    return [text[1:] if text.startswith(" ") else text
            for text in (line.lstrip()[1:] for line in leading) if not text.strip().startswith("@package")]


@functools.cache
def _comments(path: str) -> dict[int, str]:
    """1-based line -> the text of the comment on it (tokenized, so a '#' inside a string is not one)."""
    source = Path(path).read_text()
    return {token.start[0]: token.string[1:].strip()
            for token in tokenize.generate_tokens(io.StringIO(source).readline) if token.type == tokenize.COMMENT}


@functools.cache
def field_descriptions(cls: type) -> dict[str, tuple[str, str]]:
    """field -> (description, where it is declared) for the dataclass `cls`: the comment lines
    directly above the field's declaration and the comment on its first line; an inherited field is
    described by the most derived class that declares it."""
    found: dict[str, tuple[str, str]] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass) or klass is object:
            continue
        path = inspect.getsourcefile(klass)
        lines, first = inspect.getsourcelines(klass)
        comments = _comments(path)
        node = ast.parse(textwrap.dedent("".join(lines))).body[0]
        for statement in node.body:
            if not isinstance(statement, ast.AnnAssign) or not isinstance(statement.target, ast.Name):
                continue
            line = first + statement.lineno - 1
            above = []
            previous = line - 1
            while previous in comments and lines[previous - first].lstrip().startswith("#"):
                above.insert(0, comments[previous])
                previous -= 1
            text = " ".join([*above, *([comments[line]] if line in comments else [])])
            where = f"{Path(path).relative_to(Path(__file__).resolve().parents[1])}:{line}"
            found[statement.target.id] = (text, where)
    return found


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """dotted key -> value of every leaf of a plain tree."""
    items: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            items.update(_flatten(value, f"{prefix}{key}."))
        items[f"{prefix}{key}"] = value
    return items


def _class_rows(cls: type, values: dict[str, Any], prefix: str = "", switch: str | None = None) -> list[Row]:
    """The rows of config class `cls` under `prefix`, in field order: a nested config as a group row
    and its own rows; the optional-stage switches as their blocks' `enabled` keys."""
    descriptions = field_descriptions(cls)
    switch_class = next((f.metadata[NESTED][0] for f in dataclasses.fields(cls) if f.name == SWITCHES), None)
    switches = field_descriptions(switch_class) if switch_class else {}
    rows = []
    if switch is not None:
        rows.append(Row(f"{prefix}{SWITCHES}", values[f"{prefix}{SWITCHES}"], False, switch))
    for f in dataclasses.fields(cls):
        if switch_class and f.name == SWITCHES:
            continue
        key = f"{prefix}{f.name}"
        description = descriptions[f.name][0]
        if NESTED in f.metadata:
            rows.append(Row(key, None, True, description))
            rows += _class_rows(f.metadata[NESTED][0], values, f"{key}.",
                                switches[f.name][0] if f.name in switches else None)
        else:
            rows.append(Row(key, values[key], False, description))
    return rows


def undescribed_fields(cls: type, seen: set[type] | None = None) -> list[str]:
    """Each value field without a description, in `cls` and the classes nested in it (each class
    once: `seen` collects them)."""
    seen = set() if seen is None else seen
    if cls in seen:
        return []
    seen.add(cls)
    found = []
    for f in dataclasses.fields(cls):
        text, where = field_descriptions(cls)[f.name]
        if NESTED in f.metadata:
            found += undescribed_fields(f.metadata[NESTED][0], seen)
        elif not text:
            found.append(f"{where}: `{cls.__name__}.{f.name}` has no description (add a comment on its line or "
                         f"directly above it)")
    return found


class ConfigTree:
    """The stages' config classes and conf/, composed: every stage config and every published recipe."""

    def __init__(self, conf: Path):
        from hydra import compose
        from omegaconf import OmegaConf

        self.recipes = [f"recipes/{name}" for name in recipe_names(conf)]
        self.headers = {name: header_of(conf / f"{name}.yaml") for name in [*STAGES, *self.recipes]}
        self.classes = {stage: config_class(stage) for stage in STAGES}
        self.composed: dict[str, dict] = {}
        with hydra_conf(conf):
            for name in [*STAGES, *self.recipes]:
                self.composed[name] = OmegaConf.to_container(compose(config_name=name), resolve=False)

    def rows(self, stage: str) -> list[Row]:
        return _class_rows(self.classes[stage], _flatten(self.composed[stage]))

    def problems(self) -> list[str]:
        found = [f"conf/{stage}.yaml: no header comment introducing the stage"
                 for stage in STAGES if not self.headers[stage]]
        seen: set[type] = set()
        for cls in self.classes.values():
            found += undescribed_fields(cls, seen)
        return found


def _yaml_value(value: Any) -> str:
    """A value as it would be written in YAML flow style (and on the command line)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_yaml_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_yaml_value(v) for v in value) + "]"
    if isinstance(value, str):
        # Quote only what YAML would read as something else ("", "1", "null", "a: b", ...).
        try:
            plain = yaml.safe_load(value) == value
        except yaml.YAMLError:
            plain = False
        return value if plain and value.strip() == value else json.dumps(value)
    if isinstance(value, float) and abs(value) >= 1e6 and value.is_integer():
        # repr writes 5.3e7 as 53000000.0: the shortest exponent form that reads back the same instead
        return next(text for digits in range(17) if float(text := f"{value:.{digits}e}") == value)
    return repr(value)


def _prose(text: str) -> str:
    """Markdown text from a comment: characters that would become markup are escaped outside `code`."""
    pieces = text.split("`")
    for i in range(0, len(pieces), 2):
        pieces[i] = pieces[i].replace("\\", "\\\\").replace("*", "\\*").replace("<", "\\<")
    return "`".join(pieces)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _value_cell(value: Any) -> str:
    return f"`{_cell(_yaml_value(value))}`"


def _header_markdown(header: list[str]) -> list[str]:
    """Header comment lines -> paragraphs; indented lines (example commands) -> code blocks."""
    out: list[str] = []
    paragraph: list[str] = []
    code: list[str] = []

    def flush() -> None:
        if paragraph:
            out.extend([_prose(" ".join(paragraph)), ""])
            paragraph.clear()
        if code:
            indent = min(len(line) - len(line.lstrip()) for line in code)
            out.extend(["```", *(line[indent:] for line in code), "```", ""])
            code.clear()

    for line in header:
        is_code = line.startswith("  ") and line.strip()
        if (is_code and paragraph) or (not is_code and code) or not line.strip():
            flush()
        if is_code:
            code.append(line.rstrip())
        elif line.strip():
            paragraph.append(line.strip())
    flush()
    return out


def _anchor(stage: str) -> str:
    return f"minitron-{stage}"


PREAMBLE = f"""# Configuration reference

Generated by `{REGENERATE}` from the stages' config classes: every key, its default and its
description (the comment on its field) are written once, in the class (`PruneConfig` in
`nemo_minitron/pruning/stage.py`, ...); edit them there, not on this page (`--check` fails when the
page is stale or a key has no description). The Python API (`mt.PruneConfig()`, ...) and the
command line share these defaults.

Each `minitron <stage>` composes `conf/<stage>.yaml` with Hydra: the class's defaults, then the file,
then the command line; the tables show the composed result, each key as its dotted path. Set any key
on the command line as `key=value` (`train.steps=200`, `corpus.user_paths=[/data/a,/data/b]`);
`minitron <stage> --cfg job` prints the resolved config. A path left `null` that the stage needs
(`checkpoint`, `output_dir`, ...) stops it with `missing required key: set KEY=...`. In the
`pipeline` and `search` configs a block named after a stage (`prune`, `distill`, ...) holds that
stage's config with the values that hold there (the main job's, the search's); its keys mean what
they mean in that stage."""


def render(tree: ConfigTree) -> str:
    lines = [PREAMBLE, "", "Stages: " + " · ".join(f"[{stage}](#{_anchor(stage)})" for stage in STAGES)
             + " · [published recipes](#published-recipes)", ""]
    for stage in STAGES:
        lines += [f"## minitron {stage}", "", *_header_markdown(tree.headers[stage])]
        lines += ["| key | default | description |", "| --- | --- | --- |"]
        for row in tree.rows(stage):
            if row.is_group and not row.description:
                continue
            value = "" if row.is_group else _value_cell(row.value)
            lines.append(f"| `{row.key}` | {value} | {_cell(_prose(row.description))} |")
        lines.append("")
    lines += ["## Published recipes", "",
              "`minitron pipeline --config-name recipes/<name>` (on Slurm: `launchers/pipeline.sh --config-name "
              "recipes/<name>`) composes `conf/pipeline.yaml` and then the recipe. Each table lists the keys "
              "the recipe sets to something other than the pipeline's default.", ""]
    pipeline = _flatten(tree.composed["pipeline"])
    for recipe in tree.recipes:
        lines += [f"### {recipe}", "", *_header_markdown(tree.headers[recipe])]
        lines += ["| key | value | default |", "| --- | --- | --- |"]
        for key, value in _flatten(tree.composed[recipe]).items():
            if (isinstance(value, dict) and value) or _yaml_value(pipeline.get(key)) == _yaml_value(value):
                continue
            lines.append(f"| `{key}` | {_value_cell(value)} | {_value_cell(pipeline.get(key))} |")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def build(conf: Path) -> Reference:
    # The typed configs live in modules that import megatron, which warns that TE/apex are missing.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tree = ConfigTree(conf)
        return Reference(render(tree), tree.problems())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=REGENERATE, description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 if the file is stale or a key lacks a description")
    parser.add_argument("--conf-dir", type=Path, default=None, help="config directory (default: the package's conf/)")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="the reference to write or check")
    args = parser.parse_args(argv)
    reference = build(args.conf_dir or conf_dir())
    failed = bool(reference.problems)
    for problem in reference.problems:
        print(f"error: {problem}", file=sys.stderr)
    if args.check:
        current = args.output.read_text() if args.output.is_file() else ""
        if current != reference.markdown:
            failed = True
            print(f"error: {args.output} is stale: regenerate it with `{REGENERATE}`", file=sys.stderr)
            sys.stderr.writelines(difflib.unified_diff(
                current.splitlines(keepends=True), reference.markdown.splitlines(keepends=True),
                f"{args.output} (committed)", f"{args.output} (generated)"))
    else:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(reference.markdown)
        print(f"wrote {args.output}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
