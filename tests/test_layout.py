"""The library stands alone: it imports without torch, and never imports project code."""

import ast
import subprocess
import sys

from tests.conftest import ROOT

PROJECT_CODE = ("experiments", "benchmarks", "tests", "launch")


def test_every_library_module_imports_with_torch_absent():
    # torch and transformers are test extras: a plain `pip install .` has neither.
    code = ("import sys\n"
            "sys.modules['torch'] = None; sys.modules['transformers'] = None\n"
            "import importlib, pkgutil, flaxpals\n"
            "names = [m.name for m in pkgutil.walk_packages(flaxpals.__path__, 'flaxpals.')\n"
            "         if not m.name.endswith('__main__')]\n"
            "for name in names:\n"
            "    importlib.import_module(name)\n"
            "print(len(names))\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert int(result.stdout.split()[-1]) >= 30  # every module was reached


def test_the_library_never_imports_project_code():
    offenders = []
    for path in sorted((ROOT / "flaxpals").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path.relative_to(ROOT)}: {n}" for n in names
                          if n.split(".")[0] in PROJECT_CODE + ("torch", "transformers")]
    assert offenders == []


def _project_imports(folder: str) -> dict[str, set[str]]:
    """module -> the experiments/benchmarks modules it imports (at the top or in a function)."""
    out = {}
    for path in sorted((ROOT / folder).glob("*.py")):
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                found.add(node.module)
                found |= {f"{node.module}.{a.name}" for a in node.names}
        out[f"{folder}.{path.stem}"] = {n for n in found
                                        if n.split(".")[0] in ("experiments", "benchmarks")}
    return out


def test_benchmarks_and_experiments_import_each_other_in_one_direction():
    """benchmarks/ never imports experiments/, and no module there imports itself through
    others: each module's dependencies are below it."""
    graph = _project_imports("experiments") | _project_imports("benchmarks")
    assert [(m, n) for m, names in graph.items() if m.startswith("benchmarks")
            for n in names if n.startswith("experiments")] == []
    done, cycles = set(), []

    def visit(module, path):
        for n in sorted(graph.get(module, ())):
            if n in path:
                cycles.append(path[path.index(n):] + [n])
            elif n in graph and n not in done:
                visit(n, path + [n])
        done.add(module)

    for module in graph:
        visit(module, [module])
    assert cycles == []
