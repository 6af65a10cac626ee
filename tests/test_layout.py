"""The shape of the code base: imports run one way (no import cycles), the command
line is a thin shell over the library, and the repository refers to no document outside itself."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "nemo_minitron"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def module_imports(path: Path, modules: set[str]) -> set[str]:
    """The package modules `path` imports, at module level or inside functions (a deferred import
    is still a dependency)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from pkg import mod` depends on the module; `from pkg import name` on pkg's __init__
            submodules = [f"{node.module}.{alias.name}" for alias in node.names]
            names = [m for m in submodules if m in modules] or [node.module]
        found |= {name for name in names if name in modules}
    return found


def test_no_import_cycles():
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {name: module_imports(path, set(paths)) for name, path in paths.items()}
    cycles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if nxt == node or nxt == "nemo_minitron":  # the top-level API re-exports everything
                continue
            if state.get(nxt) == "open":
                cycles.append(" -> ".join([*stack[stack.index(nxt):], nxt]))
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert cycles == []


def test_every_command_is_a_config_class_and_a_stage_function_of_the_library():
    """The CLI is one table (cli/commands.py): each command names a config dataclass and the library
    function that takes it, and the CLI package holds no stage logic of its own."""
    import dataclasses
    import importlib
    import inspect

    from nemo_minitron.cli.commands import STAGES

    for name, stage in STAGES.items():
        module = importlib.import_module(stage.module)
        config, function = getattr(module, stage.config), getattr(module, stage.function)
        assert dataclasses.is_dataclass(config), name
        [parameter] = inspect.signature(function).parameters.values()
        assert parameter.annotation in (config, stage.config), name
    assert sorted(p.name for p in (PACKAGE / "cli").glob("*.py")) == ["__init__.py", "commands.py", "compose.py", "main.py"]


def test_no_reference_to_documents_outside_the_repository():
    outside = re.compile(r"(?<![\w/])DESIGN\.md|shared/")
    files = [p for p in ROOT.rglob("*") if p.suffix in {".py", ".md", ".yaml", ".sh", ".toml"}
             and not any(part.startswith(".") or part.endswith(".egg-info") for part in p.relative_to(ROOT).parts)]
    offending = [str(p.relative_to(ROOT)) for p in files if p != Path(__file__) and outside.search(p.read_text())]
    assert offending == []


def test_readme_and_design_list_every_stage_and_recipe():
    """The README's command table and design.md's stage table name every `minitron` stage, and both
    name every published recipe file, so a new stage or recipe cannot go undocumented."""
    from nemo_minitron.cli.compose import recipe_names
    from nemo_minitron.cli.commands import STAGES

    readme, design = (ROOT / "README.md").read_text(), (ROOT / "docs" / "design.md").read_text()
    stage_table = design.split("## 1. What the project does")[1].split("## 2.")[0]
    for name, text in (("README.md", readme), ("design.md section 1", stage_table)):
        assert [s for s in STAGES if f"`minitron {s}" not in text] == [], name
    for name, text in (("README.md", readme), ("design.md", design)):
        assert [r for r in recipe_names() if f"`{r}`" not in text] == [], name
