"""Time gsopt's CPU kernels (`kernels/cpu_kernels.cpp`) against the library paths they replace.

    python bench/cpu_kernels.py --out bench/results/cpu-kernels-xeon.md

- int4 (torchao's `Int4OpaqueTensor`, groups of 128) on decoder-shaped weights: gsopt's
  `int4_int8_linear` (rows quantized to int8, VNNI) against torchao's kernel
  (`_weight_int4pack_mm_for_cpu`, bf16 rows) and gsopt's bf16 unpacking (`int4_linear`) with
  oneDNN's GEMM, at 1 to 172 rows (a decode step to a 10 s prompt).
- One row (`gemv`, fp32 and bf16) against eager `F.linear` (MKL / oneDNN) and inductor's
  compiled reduction, over a stack of weights larger than the L3 a step reads from memory.

Rounds are interleaved (every path once per round; medians of the rounds): absolute times on
a shared host drift by a quarter, ratios within one run do not. Needs the kernels built
(AVX512-BW, -VBMI, -VNNI and a compiler); where they are not, it says why and exits 2.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from gsopt.kernels import cpu_kernels
from gsopt.results import environment, write_atomic

INT4_SHAPES = [(7168, 1024), (1024, 3584), (49216, 1024)]  # gate+up, down, padded lm head
ROWS = [1, 2, 4, 8, 64, 172]
GEMV_SHAPE, GEMV_BYTES = (7168, 1024), 1 << 30


def interleaved(paths: dict[str, Callable], args: tuple, rounds: int) -> dict[str, float]:
    """Median seconds per call of each path on `args`, every path once per round after a
    warm-up."""
    for call in paths.values():
        call(*args)
    times = {name: [] for name in paths}
    for _ in range(rounds):
        for name, call in paths.items():
            start = time.perf_counter()
            call(*args)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def torchao_int4(weight, x: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x, weight.qdata, 128, weight.scale_and_zero)


def each(product: Callable) -> Callable:
    """One row times every weight of a stack, with `product`."""
    return lambda x, weights: [product(x, w) for w in weights]


def int4_rows(rounds: int) -> list[dict]:
    from torchao.prototype.quantization.int4.int4_opaque_tensor import Int4OpaqueTensor

    results = []
    for n, k in INT4_SHAPES:
        weight = Int4OpaqueTensor.from_hp(torch.randn(n, k).bfloat16(), [1, 128])
        for rows in ROWS:
            x = torch.randn(rows, k).bfloat16()
            paths = {
                "gsopt int4_int8_linear": cpu_kernels.int4_int8_linear,
                "torchao kernel": torchao_int4,
            }
            if rows >= 48:
                paths["gsopt bf16 unpacking"] = cpu_kernels.int4_linear
            for name, seconds in interleaved(paths, (weight, x), rounds).items():
                results.append(
                    {
                        "weight": f"{n}x{k}",
                        "rows": rows,
                        "path": name,
                        "ms": seconds * 1e3,
                        "int4_GBps": n * k / 2 / seconds / 1e9,
                        "GOPps": 2 * rows * n * k / seconds / 1e9,
                    }
                )
    return results


def gemv_rows(rounds: int) -> list[dict]:
    compiled = torch.compile(lambda x, w: F.linear(x, w))
    results = []
    for dtype in (torch.float32, torch.bfloat16):
        if not cpu_kernels.has_gemv(dtype):
            continue
        one = GEMV_SHAPE[0] * GEMV_SHAPE[1] * dtype.itemsize
        weights = [torch.randn(GEMV_SHAPE).to(dtype) for _ in range(GEMV_BYTES // one)]
        x = torch.randn(1, GEMV_SHAPE[1]).to(dtype)
        paths = {
            "eager F.linear": each(F.linear),
            "inductor reduction": each(compiled),
            "gsopt gemv": each(torch.ops.gsopt_cpu.gemv),
        }
        for name, seconds in interleaved(paths, (x, weights), rounds).items():
            results.append(
                {
                    "dtype": str(dtype).removeprefix("torch."),
                    "path": name,
                    "GBps": one * len(weights) / seconds / 1e9,
                }
            )
    return results


def markdown(env: dict[str, str], int4: list[dict], gemv: list[dict]) -> str:
    lines = [
        "# gsopt's CPU kernels",
        "",
        f"{env['device']}; torch {env['torch']}; commit {env['commit']}; {env['date']}.",
        "",
        "| int4 weight | rows | path | ms | int4 GB/s | GOP/s |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['weight']} | {r['rows']} | {r['path']} | {r['ms']:.3f} | {r['int4_GBps']:.1f} "
        f"| {r['GOPps']:.0f} |"
        for r in int4
    ]
    lines += ["", "| dtype | one row, 1 GiB of weights | GB/s |", "|---|---|---|"]
    lines += [f"| {r['dtype']} | {r['path']} | {r['GBps']:.1f} |" for r in gemv]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="markdown to write (a .json lands beside it)")
    parser.add_argument("--rounds", type=int, default=9, help="timed rounds per point")
    args = parser.parse_args(argv)
    if why := cpu_kernels.unavailable():
        print(f"bench/cpu_kernels.py: gsopt's CPU kernels do not run here: {why}", file=sys.stderr)
        return 2
    int4 = int4_rows(args.rounds)
    print(f"int4: {len(int4)} points", file=sys.stderr)
    gemv = gemv_rows(args.rounds)
    env = environment(torch.device("cpu"))
    text = markdown(env, int4, gemv)
    print(text)
    if args.out:
        write_atomic(args.out, text)
        payload = {"environment": env, "int4": int4, "gemv": gemv}
        write_atomic(args.out.with_suffix(".json"), json.dumps(payload, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
