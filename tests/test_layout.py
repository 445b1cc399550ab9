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
