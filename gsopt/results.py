"""Results on disk: atomic writes, strict JSON, and the environment every result names.

Nothing here imports torch at module level, so a command that only turns recorded JSON into
markdown (`gsopt report`) starts without it.
"""

from __future__ import annotations

import json
import os
import platform
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from gsopt.errors import GsoptError

if TYPE_CHECKING:
    import torch

# `gsopt bench` writes records of this schema; `gsopt report` reads nothing else.
BENCH_SCHEMA = "gsopt-bench/2"

Content = str | bytes | Callable[[IO[bytes]], None]


def write_atomic(path: Path, content: Content) -> None:
    """Never leave a half-written file: write beside it, then rename. `content` is text,
    bytes, or a function that writes into the open binary file (`torch.save`, say). The file
    gets the permissions any new file gets (the umask), not mkstemp's private 0600."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as f:
            if callable(content):
                content(f)
            else:
                f.write(content.encode() if isinstance(content, str) else content)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def to_json(data: Any) -> str:
    """Strict JSON: an undefined figure is null, never NaN."""
    return json.dumps(data, indent=2, allow_nan=False) + "\n"


def write_json(path: Path, data: Any) -> None:
    write_atomic(path, to_json(data))


def read_json(path: Path, missing: str = "no such file", what: str | None = None) -> dict[str, Any]:
    """A JSON object from a file, or a one-line error naming what is wrong with it
    (`missing`: what to say when the file is not there; `what`: what the file should be)."""
    path = Path(path)
    if path.is_dir():
        raise GsoptError(f"{path}: is a folder; expected a JSON file")
    try:
        data = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise GsoptError(f"{path}: {missing}") from None
    except UnicodeDecodeError:
        raise GsoptError(f"{path}: not UTF-8 text; expected a JSON file") from None
    except json.JSONDecodeError as e:
        raise GsoptError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(data, dict):
        kind = type(data).__name__
        raise GsoptError(
            f"{path}: not {what} (a JSON {kind})"
            if what
            else f"{path}: holds a JSON {kind}, expected an object"
        )
    return data


# Where no result belongs, whatever the file there looks like.
_SYSTEM_TREES = (Path("/proc"), Path("/sys"), Path("/dev"))


def check_output(
    path: str | Path,
    *,
    folder: bool,
    flag: str = "--out",
    inputs: Iterable[str | Path] = (),
) -> Path:
    """Where a command writes, checked before any model is loaded, as the path to write.

    The output must be a regular file (`folder`: a folder) or a missing one in a writable
    folder: a device, FIFO or socket, anything under /proc, /sys or /dev, and any of the
    command's `inputs` (the manifest, an audio file, the recipe) are refused in one line.
    A symlink is followed: results go to its target, which the link keeps naming."""
    given = Path(path)
    target = given.resolve()
    what = "a folder" if folder else "a file"
    if any(target == tree or target.is_relative_to(tree) for tree in _SYSTEM_TREES):
        raise GsoptError(f"{flag} {given}: is a system path, not {what}; name {what} of yours")
    if target.exists():
        mode = target.stat().st_mode
        if folder and not stat.S_ISDIR(mode):
            raise GsoptError(f"{flag} {given}: exists and is not a folder; name a folder")
        if not folder and stat.S_ISDIR(mode):
            raise GsoptError(f"{flag} {given}: is a folder; name the file to write")
        if not folder and not stat.S_ISREG(mode):
            raise GsoptError(
                f"{flag} {given}: is not a regular file (a device, FIFO or socket); name a file"
            )
    for source in inputs:
        if Path(source).resolve() == target:
            raise GsoptError(f"{flag} {given}: is one of the inputs; name another {what[2:]}")
    start = target if folder else target.parent
    parent = next((p for p in [start, *start.parents] if p.exists()), Path("."))
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise GsoptError(f"{flag} {given}: {parent} is not a writable folder; choose another")
    return target


def _git(*args: str) -> str:
    try:
        done = subprocess.run(
            ["git", *args],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
            check=False,
        )
        return done.stdout.strip()
    except OSError:
        return ""


def environment(device: torch.device) -> dict[str, str]:
    """What every recorded result names: device (with the CPU's vector ISA), versions,
    commit ("-dirty" when the numbers came from code that no commit holds)."""
    import fms
    import torch
    import transformers

    from gsopt.runtime import cpu_features

    commit = _git("rev-parse", "--short", "HEAD")
    if commit and _git("status", "--porcelain", "--untracked-files=no"):
        commit += "-dirty"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        isa = " ".join((torch.backends.cpu.get_cpu_capability(), *cpu_features()))
        name = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, {isa})"
    return {
        "device": name,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "ibm-fms": getattr(fms, "__version__", "unknown"),
        "commit": commit or "unknown",
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
