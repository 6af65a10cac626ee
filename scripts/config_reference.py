"""`python scripts/config_reference.py [--check]`: write docs/configuration.md from nemo_minitron/conf/.

Each stage's config is composed through Hydra as `minitron <stage>` composes it, so the reference
lists the keys and defaults a user really gets (the `_base` keys included). A key's description is
the YAML comment on its line, or the comment block directly above it; a key in a block named after
another stage (the pipeline's `prune`, `distill`, ...: overrides of that stage's config) falls back
to that stage's description of the key. Each stage's YAML is cross-checked against the typed config
its stage function takes (`PruneConfig` for prune, ...): a field the YAML lacks is undocumented, a
YAML key the dataclass lacks would be refused at run time. A key without a description, such a
mismatch, or (with --check) a stale docs/configuration.md makes the command exit 1, so the reference
cannot silently rot.
"""

from __future__ import annotations

import argparse
import bisect
import dataclasses
import difflib
import itertools
import json
import posixpath
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from nemo_minitron.cli.compose import NESTED_STAGES, conf_dir, recipe_names
from nemo_minitron.cli.stages import STAGES

DEFAULT_OUTPUT = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"
REGENERATE = "python scripts/config_reference.py"
REQUIRED = "???"  # OmegaConf's mark of a mandatory value


@dataclass(frozen=True)
class ConfFile:
    """What one YAML file of conf/ says: its header comment, its keys with their descriptions."""

    header: list[str]             # the leading comment block, "# " stripped, Hydra directives dropped
    descriptions: dict[str, str]  # dotted key -> its comment ("" when it has none), in file order
    defaults: list[str]           # config names composed before this file, as Hydra resolves them


@dataclass(frozen=True)
class Row:
    key: str          # dotted path
    value: Any        # the composed default (REQUIRED when mandatory)
    is_group: bool    # a mapping of further keys rather than a value
    description: str


@dataclass(frozen=True)
class Reference:
    markdown: str
    problems: list[str]


Span = tuple[tuple[int, int], tuple[int, int]]  # (line, column) of a scalar's start and end in its file


def _comment_start(line: str, line_no: int, scalar_spans: list[Span]) -> int | None:
    """Column of the '#' that opens a comment on this line: one at the line start or after a blank,
    outside every scalar (a quoted value may contain " #")."""
    for col, char in enumerate(line):
        if char == "#" and (col == 0 or line[col - 1] in " \t"):
            if not any(start <= (line_no, col) < end for start, end in scalar_spans):
                return col
    return None


def _parse_nodes(root: yaml.Node) -> tuple[list[tuple[str, yaml.Node]], list[Span]]:
    """(dotted key, key node) of every mapping key outside sequences, and the span of every scalar."""
    keys: list[tuple[str, yaml.Node]] = []
    spans: list[Span] = []

    def walk(node: yaml.Node, prefix: str | None) -> None:
        if isinstance(node, yaml.ScalarNode):
            spans.append(((node.start_mark.line, node.start_mark.column), (node.end_mark.line, node.end_mark.column)))
        elif isinstance(node, yaml.SequenceNode):
            for item in node.value:
                walk(item, None)
        elif isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                walk(key_node, None)
                dotted = None
                if prefix is not None:
                    dotted = f"{prefix}.{key_node.value}" if prefix else str(key_node.value)
                    keys.append((dotted, key_node))
                walk(value_node, dotted)

    walk(root, "")
    return keys, spans


def read_conf_file(path: Path, name: str) -> ConfFile:
    """Parse `path` (config `name`, e.g. "recipes/mn_minitron_8b") with its comments.

    Comment lines between two keys belong to the key below when their '#' is not right of that
    key's column; a comment line indented further continues the comment of the line above, so a
    long trailing comment may wrap onto aligned lines. A blank line ends a comment block.
    """
    text = path.read_text()
    lines = text.splitlines()
    root = yaml.compose(text, Loader=yaml.SafeLoader)
    keys, spans = _parse_nodes(root) if root is not None else ([], [])

    leading = list(itertools.takewhile(lambda line: line.lstrip().startswith("#"), lines))
    header = [text[1:] if text.startswith(" ") else text
              for text in (line.lstrip()[1:] for line in leading) if not text.strip().startswith("@package")]

    owner_of_line: dict[int, tuple[int, str]] = {}  # line -> (column, dotted key) of its first key
    for dotted, node in keys:
        line_no, col = node.start_mark.line, node.start_mark.column
        if line_no not in owner_of_line or col < owner_of_line[line_no][0]:
            owner_of_line[line_no] = (col, dotted)
    key_lines = sorted(owner_of_line)

    parts: dict[str, list[str]] = {dotted: [] for dotted, _ in keys}
    pending: list[str] = []         # comment lines waiting for the key below them
    continued: str | None = None    # key whose trailing comment the next indented comment line continues
    for line_no in range(len(leading), len(lines)):
        line = lines[line_no]
        col = _comment_start(line, line_no, spans)
        comment = line[col + 1:].strip() if col is not None else ""
        if not line.strip():
            pending, continued = [], None
        elif col is not None and not line[:col].strip():
            following = bisect.bisect_right(key_lines, line_no)
            next_col = owner_of_line[key_lines[following]][0] if following < len(key_lines) else -1
            if continued is not None and col > next_col:
                parts[continued].append(comment)
            else:
                pending.append(comment)
                continued = None
        elif line_no in owner_of_line:
            owner = owner_of_line[line_no][1]
            parts[owner] = [*pending, *([comment] if comment else [])]
            pending, continued = [], owner if comment else None
        else:
            pending, continued = [], None

    defaults = []
    loaded = yaml.safe_load(text) or {}
    group = posixpath.dirname(name)
    for entry in loaded.get("defaults", []) if isinstance(loaded, dict) else []:
        # Mappings select options of config groups (here only Hydra's own logging), not config files.
        if isinstance(entry, str) and entry != "_self_":
            defaults.append(entry[1:] if entry.startswith("/") else posixpath.normpath(posixpath.join(group, entry)))
    return ConfFile(header, {dotted: " ".join(p for p in parts[dotted] if p) for dotted, _ in keys}, defaults)


def _flatten(tree: dict, prefix: str = "") -> list[tuple[str, Any, bool]]:
    """(dotted key, value, is_group) in order; an empty mapping is a value, not a group."""
    items = []
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            items.append((dotted, value, True))
            items.extend(_flatten(value, f"{dotted}."))
        else:
            items.append((dotted, value, False))
    return items


def stage_configs() -> dict[str, type]:
    """stage -> the typed config its stage function takes (the command table's)."""
    import importlib

    return {name: getattr(importlib.import_module(stage.module), stage.config) for name, stage in STAGES.items()}


def _typed_mismatches(stage: str, cls: type, node: dict, prefix: str = "") -> list[str]:
    """Fields of `cls` missing from the YAML `node` and YAML keys `cls` lacks (recursively; blocks
    that configure another stage are that stage's overrides and are checked there)."""
    found = []
    fields = {f.name: f for f in dataclasses.fields(cls)}
    derived = {"enabled"} if stage == "pipeline" and not prefix else set()  # from the blocks' `enabled`
    for name in sorted(set(fields) - set(node) - derived):
        found.append(f"conf/{stage}.yaml: `{prefix}{name}` is a field of {cls.__name__} but missing from the YAML")
    for name in sorted(set(node) - set(fields)):
        found.append(f"conf/{stage}.yaml: `{prefix}{name}` is not a field of {cls.__name__} (the code refuses it)")
    nested = NESTED_STAGES.get(stage, {}) if not prefix else {}
    for name, field in fields.items():
        value = node.get(name)
        if name in nested or not isinstance(value, dict):
            continue
        default = field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default
        if dataclasses.is_dataclass(default):
            found += _typed_mismatches(stage, type(default), value, f"{prefix}{name}.")
    return found


class ConfigTree:
    """conf/ parsed and composed: every stage config and every published recipe."""

    def __init__(self, conf: Path):
        from hydra import compose, initialize_config_dir
        from omegaconf import OmegaConf

        self.recipes = [f"recipes/{name}" for name in recipe_names(conf)]
        self.files: dict[str, ConfFile] = {}
        for path in sorted(conf.rglob("*.yaml")):
            name = path.relative_to(conf).with_suffix("").as_posix()
            self.files[name] = read_conf_file(path, name)
        self.composed: dict[str, dict] = {}
        with initialize_config_dir(config_dir=str(conf.resolve()), version_base="1.3"):
            for name in [*STAGES, *self.recipes]:
                self.composed[name] = OmegaConf.to_container(compose(config_name=name), resolve=False)

    def chain(self, name: str) -> list[str]:
        """The configs whose files make up config `name`, the one whose value wins first."""
        return [name, *(n for default in reversed(self.files[name].defaults) for n in self.chain(default))]

    def source(self, stage: str, key: str) -> str:
        """The file that sets `key` of `stage` (the stage's own file unless only a default sets it)."""
        name = next((n for n in self.chain(stage) if key in self.files[n].descriptions), stage)
        return f"conf/{name}.yaml"

    @staticmethod
    def stage_block(stage: str, key: str) -> tuple[str, str] | None:
        """(other stage, its key) when `key` lies in a block of `stage` named after another stage."""
        block, _, rest = key.partition(".")
        block_stage = block.replace("_", "-")
        return (block_stage, rest) if rest and block_stage in STAGES and block_stage != stage else None

    def describe(self, stage: str, key: str, is_group: bool = False) -> str:
        """The comment on `key`; a value in another stage's block falls back to that stage's comment
        on it (not a group: its comment often speaks of its own file's values, e.g. a schedule)."""
        for name in self.chain(stage):
            if self.files[name].descriptions.get(key):
                return self.files[name].descriptions[key]
        inner = self.stage_block(stage, key)
        return self.describe(*inner) if inner and not is_group else ""

    def default(self, stage: str, key: str) -> tuple[Any, str] | None:
        """(value, config) of `key` in `stage`, or in the stage whose block holds it; None if unset."""
        values = {k: v for k, v, _ in _flatten(self.composed[stage])}
        if key in values:
            return values[key], stage
        inner = self.stage_block(stage, key)
        return self.default(*inner) if inner else None

    def rows(self, stage: str) -> list[Row]:
        return [Row(key, value, is_group, self.describe(stage, key, is_group))
                for key, value, is_group in _flatten(self.composed[stage])]

    def problems(self) -> list[str]:
        found = []
        for stage in STAGES:
            if not self.files[stage].header:
                found.append(f"conf/{stage}.yaml: no header comment introducing the stage")
            for row in self.rows(stage):
                if not row.is_group and not row.description:
                    found.append(f"{self.source(stage, row.key)}: `{row.key}` has no description "
                                 f"(add a comment on its line or directly above it)")
        for stage, cls in stage_configs().items():
            found += _typed_mismatches(stage, cls, self.composed[stage])
        return list(dict.fromkeys(found))  # a `_base` key is reported once, not once per stage


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
    return "**required**" if value == REQUIRED else f"`{_cell(_yaml_value(value))}`"


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

Generated from `nemo_minitron/conf/` by `{REGENERATE}`: edit the comments in the YAML files, not this page
(`--check` fails when the page is stale, a key has no comment, or a typed config and its YAML section
disagree).

Each `minitron <stage>` composes `conf/<stage>.yaml` with Hydra after the configs in its `defaults`
list (every stage starts from `conf/_base.yaml`); the tables show the composed result, each key as its
dotted path. Set any key on the command line as `key=value` (`train.steps=200`,
`corpus.user_paths=[/data/a,/data/b]`); `minitron <stage> --cfg job` prints the resolved config.
**required** marks a key without a default (`???` in the YAML): the stage stops until it is set. In
the `pipeline` and `search` configs a block named after a stage (`prune`, `distill`, ...) holds
overrides of that stage's own config; its keys mean what they mean there."""


def render(tree: ConfigTree) -> str:
    lines = [PREAMBLE, "", "Stages: " + " · ".join(f"[{stage}](#{_anchor(stage)})" for stage in STAGES)
             + " · [published recipes](#published-recipes)", ""]
    for stage in STAGES:
        lines += [f"## minitron {stage}", "", *_header_markdown(tree.files[stage].header)]
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
              "the recipe sets to something other than the default, which is the pipeline's or, for a key the "
              "pipeline does not set, that of the stage whose block holds it.", ""]
    for recipe in tree.recipes:
        lines += [f"### {recipe}", "", *_header_markdown(tree.files[recipe].header)]
        lines += ["| key | value | default |", "| --- | --- | --- |"]
        for key, value, is_group in _flatten(tree.composed[recipe]):
            default = tree.default("pipeline", key)
            if is_group or (default is not None and _yaml_value(default[0]) == _yaml_value(value)):
                continue
            if default is None:
                default_cell = "not set"
            else:
                default_cell = _value_cell(default[0]) + ("" if default[1] == "pipeline" else f" ({default[1]})")
            lines.append(f"| `{key}` | {_value_cell(value)} | {default_cell} |")
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
