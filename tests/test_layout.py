"""The repository's shape: what imports what, from where.

The top-level `kernels/` and `recipes/` folders ship as `gsopt.kernels` and `gsopt.recipes`
(through the links in gsopt/). Neither may be importable under its bare name: from the
repository root, where `python -m` and pytest put it on sys.path, a top-level `kernels`
package would shadow Hugging Face's `kernels`, which transformers imports.
"""

from __future__ import annotations

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
