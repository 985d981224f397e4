"""The engine is a library: cssl_core never imports prefect, mlflow or pipelines."""

import ast
import subprocess
import sys
from pathlib import Path

import cssl_core

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {"prefect", "mlflow", "pipelines"}


def test_cssl_core_sources_do_not_import_orchestration():
    offenders = []
    for path in sorted((ROOT / "cssl_core").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] in FORBIDDEN]
    assert offenders == []


def test_importing_cssl_core_loads_no_orchestration_module():
    code = (
        "import sys, cssl_core, cssl_core.learn.trainer, cssl_core.memory.replay,"
        " cssl_core.evaluation.evaluate;"
        "print(sorted(m for m in sys.modules"
        " if m.split('.')[0] in {'prefect','mlflow','pipelines'}))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"


def test_public_names_exist():
    # cassle's __all__ once named a function that did not exist; this catches that.
    missing = [name for name in cssl_core.__all__ if not hasattr(cssl_core, name)]
    assert missing == []


def test_the_engine_stages_never_import_the_period_loop():
    """``cssl_core.period`` drives the stages (it imports ``learn.launch`` and ``learn.job``);
    nothing under the stage folders imports it back, so there is no cycle."""
    offenders = []
    for path in sorted((ROOT / "cssl_core").rglob("*.py")):
        if path.parent == ROOT / "cssl_core":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            offenders += [f"{path.name}: {n}" for n in names if n == "cssl_core.period"]
    assert offenders == []
