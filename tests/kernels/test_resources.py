"""The kernels' launch settings compile for Hopper without register spills (no GPU needed:
Triton compiles ahead of time, cuobjdump reads the binary's resource use)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import triton

HOPPER_SHARED_PER_BLOCK = 227 * 1024


def nvidia_tools() -> bool:
    """ptxas and cuobjdump ship inside x86-64 Linux triton wheels."""
    try:
        return Path(triton.knobs.nvidia.cuobjdump.path).exists()
    except (AttributeError, RuntimeError):  # an older triton, or none of NVIDIA's tools
        return False


@pytest.mark.skipif(not nvidia_tools(), reason="this triton has no NVIDIA backend tools")
def test_default_launches_fit_hopper_without_spills():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-m", "gsopt.kernels.resources", "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    rows = {r["kernel"]: r for r in json.loads(result.stdout)}
    assert set(rows) == {"decode", "conformer"}
    for r in rows.values():
        assert r["spill_bytes"] == 0, r
        assert 0 < r["registers"] <= 255 and 0 < r["shared_bytes"] <= HOPPER_SHARED_PER_BLOCK, r
    # The full-size shapes, not the tiny ones: 3.3-8b decode and a 200-frame conformer block.
    assert rows["decode"]["HEAD_DIM"] == rows["conformer"]["HEAD_DIM"] == 128
    assert rows["decode"]["GROUP"] == 4 and rows["conformer"]["CONTEXT"] == 200
