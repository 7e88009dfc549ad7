"""Imports run one way: cli -> demo -> experiments -> inference, reporting -> training -> runs, evaluation, planning ->
losses -> networks -> data -> the foundation modules. Every import in the package is read, lazy ones inside functions
too."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "nnalign"

LAYERS: tuple[tuple[str, ...], ...] = (
    ("nnalign", "errors", "atomic", "registry", "checkpoints", "device", "modalities", "model_folders", "paths",
     "plans_check"),
    ("data",),
    ("networks",),
    ("losses",),  # may use the networks' outputs
    ("runs", "evaluation", "planning"),
    ("training",),
    ("inference", "reporting"),
    ("experiments",),
    ("demo",),  # runs the experiment grid's commands
    ("cli", "_ext"),
)
"""Lowest first. A part may import from lower layers and from itself only; the foundation modules (layer 0) from
each other too."""
LAYER = {part: level for level, parts in enumerate(LAYERS) for part in parts}


def part_of(module: str) -> str:
    """The package part a dotted module name belongs to: ``nnalign.losses.kd.pmkl`` -> ``losses``."""
    names = module.split(".")
    return names[1] if len(names) > 1 else names[0]


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every absolute nnalign import in a file, at any depth."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules = [node.module]
        elif isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        else:
            continue
        found += [(node.lineno, m) for m in modules if m == "nnalign" or m.startswith("nnalign.")]
    return found


def module_name(path: Path, package: Path = PACKAGE) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def violations(package: Path = PACKAGE) -> list[str]:
    """``file:line: source part -> target part`` for every import against the layers."""
    bad = []
    for path in sorted(package.rglob("*.py")):
        source = part_of(module_name(path, package))
        for line, module in imports_of(path):
            target = part_of(module)
            if target != source and LAYER[target] >= LAYER[source] and LAYER[source] > 0:
                bad.append(f"{path.relative_to(package.parent)}:{line}: {source} -> {target}")
    return bad


def test_every_part_of_the_package_has_a_layer():
    parts = {part_of(module_name(p)) for p in PACKAGE.rglob("*.py")}
    assert parts <= set(LAYER), sorted(parts - set(LAYER))


def test_imports_run_one_way():
    assert violations() == []


@pytest.mark.parametrize("source, imported", [
    ("networks/widget.py", "from nnalign.losses.kd import build_kd"),
    ("evaluation/widget.py", "from nnalign.reporting.collect import Results"),
    ("training/widget.py", "def f():\n    from nnalign.cli.train import main\n"),
    ("losses/widget.py", "import nnalign.runs"),
])
def test_an_import_against_the_direction_is_caught(tmp_path, source, imported):
    package = tmp_path / "nnalign"
    (package / source).parent.mkdir(parents=True)
    (package / source).write_text(imported + "\n")
    assert len(violations(package)) == 1
