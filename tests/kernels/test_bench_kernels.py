"""bench/bench_kernels.py's harness on tiny shapes (--smoke), so a lent GPU's time goes to
timing, not to fixing the script. On the CPU the kernels run in Triton's interpreter."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).parents[2] / "bench" / "bench_kernels.py"


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300
    )


def test_smoke_run_checks_every_candidate_and_target(tmp_path):
    out = tmp_path / "kernels.md"
    result = run("--smoke", "--dtype", "fp32", "--out", str(out))
    assert result.returncode == 0, result.stderr
    payload = json.loads(out.with_suffix(".json").read_text())
    assert out.read_text() == result.stdout.removesuffix("\n")
    assert payload["meta"]["commit"] and payload["meta"]["device"]

    rows, shapes = payload["rows"], payload["shapes"]
    cases = {r["case"] for r in rows}
    decode_cases = {f"decode B={b} L={n}" for b in shapes["batches"] for n in shapes["lengths"]}
    assert cases == decode_cases | {f"conformer N={shapes['blocks']} C={shapes['context']}"}
    for case in cases:
        impls = {r["impl"]: r for r in rows if r["case"] == case}
        assert any(name.startswith("gsopt") and "ms" in r for name, r in impls.items())
        # The math backend runs everywhere; a backend that cannot run says why.
        assert any("math" in name and "ms" in r for name, r in impls.items())
        for r in impls.values():
            assert ("ms" in r) != ("error" in r), r
            if "ms" in r:  # every path that ran agrees with the fp32 reference
                assert r["max_err"] <= 1e-4, r
                assert r["gbps"] == r["bytes"] / r["ms"] / 1e6

    targets = {(t["case"], t["target"]): t for t in payload["targets"]}
    for case in cases:
        assert targets[(case, "max error <= 0.0001")]["met"]
        assert (case, "within 80% of the bandwidth floor") in targets
    for case in decode_cases:
        assert ((case, ">= 1.5x the best SDPA backend") in targets) == case.startswith(
            "decode B=1 "
        )
    assert any(t["target"] == ">= 2x transformers' MATH path" for t in payload["targets"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU this is the full benchmark")
def test_timing_without_cuda_is_refused_in_one_line():
    result = run()
    assert result.returncode != 0
    assert result.stderr.strip().count("\n") == 0 and "--smoke" in result.stderr
