"""Layer rule: a lower layer never imports a higher one (checked statically, with ``ast``)."""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# The layer table, lowest first: (layer name, top-level packages in it), one folder each, so the
# layers are what a listing of the repository shows. A module may import stdlib, third-party
# packages, any lower layer and its own layer, except that in a layer listed in ISOLATED_LAYERS it
# may import only its own package (streams must not import learner, etc.).
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("kernel", ("memento",)),  # config, schemas, encoder, qnet, softq, checkpoint, kafka_io, ...
    ("memory_store", ("memory_store",)),
    ("components", ("streams", "learner", "serving")),
    ("top", ("evaluation", "harness", "cli")),  # memento eval and the simulator; benches, brokers, processes; the CLI, demo
]
ISOLATED_LAYERS = {"components"}
PACKAGES = tuple(package for _, packages in LAYERS for package in packages)

# Imports under ``if TYPE_CHECKING:`` are exempt: they never execute, so they create no runtime
# dependency (and are the usual way to name a type without an import cycle).  Their ``else:`` branch
# is checked like any other code.  Imports inside functions are NOT exempt: they execute when called.
EXEMPT_TYPE_CHECKING = True

# Upward imports that exist today, each with the reason it is tolerated.  Keep this short: a new
# upward import fails the test, and an entry whose import has gone fails test_allow_list_is_not_stale.
ALLOWED: dict[tuple[str, str], str] = {}

_LAYER_INDEX = {name: i for i, (name, _) in enumerate(LAYERS)}


def layer_of(module: str) -> tuple[str, str] | None:
    """(layer, matched prefix) of a first-party module, or None for stdlib / third-party."""
    best: tuple[str, str] | None = None
    for layer, prefixes in LAYERS:
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > len(best[1])):
                best = (layer, prefix)
    return best


def forbidden(importer: str, imported: str) -> str | None:
    """Why ``importer`` may not import ``imported``, or None when the layer rule allows it."""
    src, dst = layer_of(importer), layer_of(imported)
    if src is None or dst is None:
        return None
    src_i, dst_i = _LAYER_INDEX[src[0]], _LAYER_INDEX[dst[0]]
    if dst_i > src_i:
        return f"layer {src[0]!r} imports higher layer {dst[0]!r}"
    if dst_i == src_i and src[0] in ISOLATED_LAYERS and importer.split(".")[0] != imported.split(".")[0]:
        return f"{importer.split('.')[0]!r} imports sibling {imported.split('.')[0]!r} in layer {src[0]!r}"
    return None


@dataclass(frozen=True)
class Violation:
    line: int
    imported: str
    why: str


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _resolve_from(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    if node.level == 0:
        return node.module or ""
    parts = module.split(".") if is_package else module.split(".")[:-1]
    if node.level - 1 > len(parts):
        raise ValueError(f"line {node.lineno}: relative import beyond top-level package in {module}")
    base = parts[: len(parts) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(source: str, module: str, is_package: bool = False,
               known_modules: frozenset[str] = frozenset()) -> list[tuple[int, str]]:
    """(line, absolute module) for every executable import in ``source``, at any depth."""
    out: list[tuple[int, str]] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and EXEMPT_TYPE_CHECKING and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            out.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _resolve_from(node, module, is_package)
            for alias in node.names:
                # ``from pkg import sub`` imports the module pkg.sub when there is one
                sub = f"{base}.{alias.name}" if base else alias.name
                out.append((node.lineno, sub if sub in known_modules or not base else base))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(source))
    return out


def check_source(source: str, module: str, is_package: bool = False,
                 known_modules: frozenset[str] = frozenset()) -> list[Violation]:
    """Every import in ``source`` (the text of ``module``) that breaks the layer rule."""
    found = []
    for line, imported in dict.fromkeys(imports_of(source, module, is_package, known_modules)):  # dedupe
        why = forbidden(module, imported)
        if why is not None:
            found.append(Violation(line, imported, why))
    return found


def _module_name(path: Path) -> tuple[str, bool]:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    is_package = parts[-1] == "__init__"
    return ".".join(parts[:-1] if is_package else parts), is_package


SOURCE_FILES = sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py") if "__pycache__" not in p.parts)
KNOWN_MODULES = frozenset(_module_name(p)[0] for p in SOURCE_FILES)


def _violations(path: Path) -> list[Violation]:
    module, is_package = _module_name(path)
    return check_source(path.read_text(encoding="utf-8"), module, is_package, KNOWN_MODULES)


@pytest.mark.parametrize("path", SOURCE_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_upward_imports(path: Path):
    module, _ = _module_name(path)
    bad = [v for v in _violations(path) if (module, v.imported) not in ALLOWED]
    assert not bad, "layer rule broken:\n" + "\n".join(
        f"  {path.relative_to(ROOT)}:{v.line}: `{v.imported}` ({v.why})" for v in bad)


def test_sources_found():
    assert len(SOURCE_FILES) > 20
    assert LAYERS[0][1], "no kernel module found"


def test_allow_list_is_not_stale():
    present = {(_module_name(p)[0], v.imported) for p in SOURCE_FILES for v in _violations(p)}
    stale = sorted(set(ALLOWED) - present)
    assert not stale, f"allow-listed imports no longer exist; remove them from ALLOWED: {stale}"


def test_checker_catches_kernel_importing_learner():
    source = "import numpy\nfrom memento.schemas import Case\n\ndef f():\n    from learner.trainer import SoftQLearner\n"
    assert check_source(source, "memento.qnet") == [
        Violation(5, "learner.trainer", "layer 'kernel' imports higher layer 'components'")]
    assert check_source("import learner.trainer\n", "memento.qnet")[0].imported == "learner.trainer"


def test_checker_resolves_relative_siblings_and_type_checking():
    # relative imports resolve to the module they name (a submodule when there is one)
    assert imports_of("from .. import cli\n", "streams.sub.app", known_modules=frozenset({"streams.cli"})) == [
        (1, "streams.cli")]
    assert imports_of("from . import x\n", "memento", is_package=True) == [(1, "memento")]
    with pytest.raises(ValueError):
        imports_of("from ... import x\n", "memento.schemas")
    # the kernel reaching the top layer, absolute
    assert [v.imported for v in check_source("from evaluation.runner import x\n", "memento.schemas")] == [
        "evaluation.runner"]
    # sibling components may not import each other; a package may import itself
    assert [v.imported for v in check_source("import serving.policy\n", "learner.trainer")] == ["serving.policy"]
    assert check_source("from .storage import ReplayBatch\n", "learner.trainer") == []
    assert check_source("from cli.main import main\n", "cli.demo") == []
    # TYPE_CHECKING-only imports are exempt; their else branch is not
    guarded = ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import learner.trainer\n"
               "else:\n    import evaluation.replay\n")
    assert [v.imported for v in check_source(guarded, "memento.qnet")] == ["evaluation.replay"]
