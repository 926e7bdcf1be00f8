"""The repository's shape: what imports what, from where.

The top-level `kernels/` and `recipes/` folders ship as `gsopt.kernels` and `gsopt.recipes`
(through the links in gsopt/). Neither may be importable under its bare name: from the
repository root, where `python -m` and pytest put it on sys.path, a top-level `kernels`
package would shadow Hugging Face's `kernels`, which transformers imports.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_from_root(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False
    )


def test_top_level_kernels_folder_never_shadows_transformers_kernels():
    code = """
import importlib.metadata, importlib.util, sys
from pathlib import Path
import transformers.modeling_utils
import gsopt.kernels.decode_attention, gsopt.recipes
root = Path.cwd().resolve()
print("gsopt.kernels", Path(gsopt.kernels.decode_attention.__file__).resolve())
try:
    importlib.metadata.distribution("kernels")
    installed = True
except importlib.metadata.PackageNotFoundError:
    installed = False
spec = importlib.util.find_spec("kernels")
origin = Path(spec.origin).resolve() if spec is not None and spec.origin else None
print("installed", installed)
print("origin", origin)
print("search", [str(Path(p).resolve()) for p in (spec.submodule_search_locations or [])]
      if spec is not None and installed else [])
"""
    done = run_from_root(code)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = dict(line.split(" ", 1) for line in done.stdout.splitlines())
    assert lines["gsopt.kernels"] == str(ROOT / "kernels" / "decode_attention.py")
    if lines["installed"] == "True":  # transformers' dependency: it must be the one found
        assert lines["origin"] != "None"
        assert not Path(lines["origin"]).is_relative_to(ROOT / "kernels"), lines["origin"]
        assert str(ROOT / "kernels") not in lines["search"]
    else:  # then nothing of gsopt's may answer to the name with code of its own
        assert lines["origin"] == "None"


def test_top_level_folders_are_not_packages():
    """Only gsopt's own folder holds an __init__.py at the top: any other would be a
    top-level package named after the folder whenever the root is on sys.path."""
    packages = sorted(p.parent.name for p in ROOT.glob("*/__init__.py"))
    assert packages == ["gsopt"]


def _imports(path: Path, module: str) -> set[str]:
    """Every gsopt module `path` imports, at any depth of its code (a lazy import inside a
    function still ties the two modules together)."""
    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return {name for name in found if name.split(".")[0] == "gsopt"}


def module_graph() -> dict[str, set[str]]:
    modules = {}
    for path in sorted((ROOT / "gsopt").rglob("*.py")):
        relative = path.relative_to(ROOT).with_suffix("")
        parts = relative.parts[:-1] if relative.name == "__init__" else relative.parts
        modules[".".join(parts)] = path
    return {
        name: {other for other in _imports(path, name) if other in modules and other != name}
        for name, path in modules.items()
    }


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_no_import_cycles():
    graph = module_graph()
    assert len(graph) > 40  # the whole package was read
    assert cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


# Each layer may import only the layers below it (a package's __init__ belongs to it).
LAYERS = ["audio", "model", "engine", "recipe", "measure", "transcription", "commands"]
SHARED = {"gsopt", "gsopt.errors", "gsopt.results", "gsopt.runtime", "gsopt.kernels"}


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else None


def test_layers_import_only_the_layers_below():
    order = {layer: i for i, layer in enumerate(LAYERS)}
    wrong = []
    for module, imports in module_graph().items():
        mine = _layer(module)
        for other in imports:
            theirs = _layer(other)
            if mine is None or theirs is None or other in SHARED:
                continue
            if order[theirs] > order[mine]:
                wrong.append(f"{module} -> {other}")
    assert wrong == []


def test_report_imports_no_torch(tmp_path):
    results = ROOT / "bench" / "results" / "cpu-tiny-3s-n32.json"
    code = f"""
import sys
from gsopt.cli import main
assert main(["report", {str(results)!r}, "--out", {str(tmp_path)!r}]) == 0
print("torch" in sys.modules, "gsopt.model" in sys.modules)
"""
    done = run_from_root(code)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-2:] == ["False", "False"]
    assert (tmp_path / "report.md").exists()
