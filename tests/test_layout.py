"""The package's shape: imports follow the layers, only the Airflow interface imports Airflow,
no import cycle, and ``import retention`` pulls in no Airflow.

Layers, lowest first; a module may import only from its own layer or a lower one:

    core        errors, failpoints, clock, identity, retry, connections, aws, localfiles
    rules       rules/: fields, models, loader, problems, YAML with line numbers
    evidence    evidence/: audit schema, signing, payloads, the chain, verification, checkpoints
    holds       legal holds and erasure requests (inputs beside the rules, kept in the audit database)
    archive     archive/: codecs, the store, manifests, restore, checks
    targets     targets/: SQL and S3 targets and their actions
    plan        plan/: the plan value, its builder, the limits
    run         run/: runner, journal, lease, settlement, status
    interfaces  interfaces/: CLI, Airflow, demo
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "plugins" / "retention"

LAYERS = ["core", "rules", "evidence", "holds", "archive", "targets", "plan", "run", "interfaces"]
CORE = {"retention", "retention.errors", "retention.failpoints", "retention.clock", "retention.identity",
        "retention.retry", "retention.connections", "retention.aws", "retention.localfiles"}
AIRFLOW_INTERFACE = "retention.interfaces.airflow"
BESIDE_HOLDS = {"retention.erasure_requests"}
"""Top-level modules of the holds layer besides retention.holds: requests that, like holds, are kept
in the audit database and read by plans and runs."""


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def layer(module: str) -> str:
    """The layer a ``retention`` module belongs to."""
    if module in CORE:
        return "core"
    if module in BESIDE_HOLDS:
        return "holds"
    head = module.split(".")[1]
    assert head in LAYERS, f"{module} is in no layer: add it to CORE or put it in a layer's package"
    return head


def _imports(path: Path) -> list[tuple[str, bool]]:
    """Every module ``path`` imports, and whether it does so at import time (module level,
    not under TYPE_CHECKING)."""
    tree = ast.parse(path.read_text())
    found: list[tuple[str, bool]] = []

    def visit(node: ast.AST, eager: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                visit(child, False)
                continue
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                visit(child, False)
                continue
            if isinstance(child, ast.Import):
                found.extend((alias.name, eager) for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                found.append((child.module, eager))
                found.extend((f"{child.module}.{alias.name}", eager) for alias in child.names)
            visit(child, eager)

    visit(tree, True)
    return found


def _own(name: str, modules: dict[str, Path]) -> str | None:
    """The package module ``name`` refers to (``retention.x.y`` may be a module or a name in one)."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def test_imports_follow_the_layers():
    modules = _modules()
    wrong = []
    for module, path in sorted(modules.items()):
        for name, _eager in _imports(path):
            if not name.startswith("retention"):
                continue
            target = _own(name, modules)
            if target is None or target == module:
                continue
            if LAYERS.index(layer(target)) > LAYERS.index(layer(module)):
                wrong.append(f"{module} ({layer(module)}) imports {target} ({layer(target)})")
    assert sorted(set(wrong)) == []


def test_only_the_airflow_interface_imports_airflow():
    modules = _modules()
    wrong = sorted(
        module for module, path in modules.items()
        if not module.startswith(AIRFLOW_INTERFACE)
        and any(name == "airflow" or name.startswith("airflow.") for name, _ in _imports(path))
    )
    assert wrong == []


def test_no_import_cycle():
    modules = _modules()
    graph = {
        module: {t for name, eager in _imports(path) if eager and name.startswith("retention")
                 and (t := _own(name, modules)) not in (None, module)}
        for module, path in modules.items()
    }
    state: dict[str, int] = {}
    cycles = []

    def walk(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            # a package's __init__ is imported on the way to its modules: not a cycle of ours
            if node.startswith(nxt + "."):
                continue
            if state.get(nxt) == 1:
                cycles.append(" → ".join(trail[trail.index(nxt):] + [nxt]) if nxt in trail else f"{node} → {nxt}")
            elif nxt not in state:
                walk(nxt, trail + [nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            walk(module, [module])
    assert cycles == []


def test_importing_the_engine_imports_no_airflow():
    code = ("import sys, retention, retention.run.runner, retention.interfaces.cli; "
            "print(sorted(m for m in sys.modules if m == 'airflow' or m.startswith('airflow.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_no_module_is_too_long():
    """Big modules are where jobs pile up: each stays within a few screens."""
    long = sorted(module for module, path in _modules().items() if len(path.read_text().splitlines()) > 450)
    assert long == []


def test_no_function_is_too_long():
    """Outside the CLI's argument parser, a function fits on a screen or two."""
    long = []
    for module, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > 80 and not (module.startswith("retention.interfaces.cli") and "parser" in node.name):
                    long.append(f"{module}.{node.name}")
    assert sorted(long) == []


def test_the_demo_finds_the_repository_it_runs_from():
    """Modules moved deeper once and the demo lost the rules; it must find them from where it is."""
    from retention.interfaces.demo import ROOT

    assert (ROOT / "retention_rules").is_dir() and (ROOT / "dags" / "retention_dags.py").is_file()
