"""The rule of direction (README, Architecture): r4b_core is the recipe and imports nothing above
it. The KFP side (r4b_kfp: components/, pipelines/, the `r4b` entry point) calls into r4b_core,
never the other way round; an upward import, even one inside a function, fails here."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ABOVE_CORE = ("r4b_kfp", "components", "pipelines", "tests", "bench")


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import in a file, at any depth (function bodies included)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
                "import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant):
            found.append((node.lineno, str(node.args[0].value)))
    return found


def test_r4b_core_imports_nothing_above_it():
    files = sorted((REPO / "r4b_core").rglob("*.py"))
    assert len(files) > 30, "r4b_core not found where expected"
    upward = [f"{path.relative_to(REPO)}:{line}: imports {module}"
              for path in files for line, module in imported_modules(path)
              if module.split(".")[0] in ABOVE_CORE]
    assert not upward, "\n".join(upward)


def test_the_walk_sees_imports_inside_functions(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("import os\n\ndef f():\n    from r4b_kfp.pipelines.local_run import run_pipeline_locally\n"
                      "    importlib.import_module('pipelines.r4b_pipeline')\n")
    assert imported_modules(sample) == [(1, "os"), (4, "r4b_kfp.pipelines.local_run"), (5, "pipelines.r4b_pipeline")]


def test_benchmarks_import_nothing_from_tests():
    """bench/ is run on machines without the test suite's fixtures: its shared set-up is bench/common.py."""
    test_modules = {p.stem for p in (REPO / "tests").rglob("*.py")}
    files = sorted((REPO / "bench").glob("*.py"))
    bad = [f"{path.relative_to(REPO)}:{line}: imports {module}"
           for path in files for line, module in imported_modules(path)
           if module.split(".")[0] in test_modules | {"tests"}]
    bad += [f"{path.relative_to(REPO)}: puts tests/ on sys.path" for path in files
            if '"tests"' in path.read_text() and "sys.path" in path.read_text()]
    assert files and not bad, "\n".join(bad)
