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


# The wings, lowest first: a module imports from its own wing or a lower one only.
# config_lib (the config and its allowed values) imports nothing of flaxpals; the entry
# points (commands) sit on top. docs/architecture.md draws the same order.
WINGS = ("config_lib", "data", "workdir_format", "model", "mtl", "train", "serve")
ENTRY_POINTS = ("main", "cli", "predict", "export", "ensemble", "__init__")


def _library_imports() -> dict[str, set[str]]:
    """{module: flaxpals modules it imports anywhere in its body}, module names dotted."""
    root = ROOT / "flaxpals"
    modules = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("flaxpals"):
                deps |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules
                         else node.module for a in node.names}
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.startswith("flaxpals")}
        graph[name] = deps - {name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[str]:
    """Every import cycle a depth-first walk of `graph` meets, as "a -> b -> a"."""
    cycles, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == "open":
                cycles.append(" -> ".join(stack[stack.index(dep):] + [dep]))
            elif dep not in state and dep in graph:
                visit(dep, stack + [dep])
        state[node] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    return cycles


def _wing(module: str) -> int:
    top = module.split(".")[1] if "." in module else "__init__"
    if top in ENTRY_POINTS:
        return len(WINGS)
    assert top in WINGS, f"{module}: in no wing; add its wing to WINGS"
    return WINGS.index(top)


def test_no_module_imports_from_a_higher_wing():
    graph = _library_imports()
    upward = [f"{m} -> {d}" for m, deps in sorted(graph.items()) for d in sorted(deps)
              if d != "flaxpals" and _wing(d) > _wing(m)]
    assert upward == []


def test_config_lib_imports_no_other_flaxpals_module():
    assert _library_imports()["flaxpals.config_lib"] == set()


def test_the_library_has_no_import_cycles():
    assert _cycles(_library_imports()) == []


def test_old_import_paths_still_work():
    # Names users hold from before the wings: the entry points and the Ensemble.
    from flaxpals.ensemble import Ensemble
    from flaxpals.predict import Predictor
    from flaxpals.serve import ensemble, predictor

    assert Predictor is predictor.Predictor and Ensemble is ensemble.Ensemble


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
    assert _cycles(graph) == []
