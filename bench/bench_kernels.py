"""Time gsopt's attention kernels against the PyTorch paths they replace.

    python bench/bench_kernels.py --out bench/results/kernels-h100-bf16.md
    TRITON_INTERPRET=1 python bench/bench_kernels.py --smoke   # CPU: checks the harness only

Every number is a `triton.testing.do_bench` median (or `do_bench_cudagraph` with
--cuda-graph, closer to a captured decode step, where launch overhead is gone). Bandwidth
is the bytes each attention must move at least (q, the valid K/V, the output; for the
conformer also the rel_pos table) over the median time, for every implementation alike, and
is also quoted as a fraction of this card's measured device-to-device copy bandwidth, the
memory-bandwidth floor. The issue's targets are checked at the end. The markdown goes to
--out and stdout; the same rows go to a .json beside it.

--smoke runs tiny shapes through Triton's interpreter on a machine without CUDA, so the
whole harness (every candidate, the error check, the targets, the report) is exercised
before a GPU is lent; its times are interpreter times and mean nothing.
"""

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.testing
from torch.nn.attention import SDPBackend, sdpa_kernel

from gsopt.results import environment, write_atomic

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SDPA_BACKENDS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}
# Largest absolute error a kernel may show against the fp32 reference (unit-size inputs).
TOLERANCE = {torch.bfloat16: 3e-2, torch.float16: 1e-2, torch.float32: 1e-4}
OURS = "gsopt"  # every gsopt row's implementation name starts with this
TRANSFORMERS_MATH = "transformers: bias + sdpa math"


@dataclass(frozen=True)
class Shapes:
    """Decode: the decoder's query/kv heads and head size. Conformer: one utterance's blocks."""

    heads: int
    kv_heads: int
    head_dim: int
    batches: tuple[int, ...]
    lengths: tuple[int, ...]
    blocks: int
    block_heads: int
    context: int
    block_dim: int


# 3.3-8b decode (32 query heads over 8 kv heads of 128) and 30 s of audio in the conformer
# (8 blocks of 200 frames, the last one half full; 8 heads of 128).
ISSUE_SHAPES = Shapes(32, 8, 128, (1, 8, 64), (128, 256, 512, 1024), 8, 8, 200, 128)
# Small enough for the interpreter, with the same features: GQA 4, non-power-of-two cache
# lengths and block size, a partial last block.
SMOKE_SHAPES = Shapes(8, 2, 16, (1, 2), (40, 100), 3, 2, 20, 16)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, help="markdown file to write (a .json lands beside it)")
    p.add_argument("--dtype", choices=DTYPES, help="default bf16; fp32 for a CPU smoke run")
    p.add_argument("--batches", type=int, nargs="+", help="decode batch sizes (default 1 8 64)")
    p.add_argument("--lengths", type=int, nargs="+", help="decode cache lengths (128..1024)")
    p.add_argument("--cuda-graph", action="store_true", help="time replays of a captured graph")
    p.add_argument("--rep", type=int, default=100, help="do_bench repetition time in ms")
    p.add_argument("--smoke", action="store_true", help="tiny shapes; CPU interpreter if no CUDA")
    return p.parse_args(argv)


class Clock:
    """Median milliseconds of a call: do_bench on CUDA, a few perf_counter calls in a smoke run."""

    def __init__(self, device: str, cuda_graph: bool, rep: int) -> None:
        self.device, self.cuda_graph, self.rep = device, cuda_graph, rep

    @property
    def method(self) -> str:
        if self.device != "cuda":
            return "perf_counter median of 3 interpreted calls (NOT kernel speed)"
        return "do_bench_cudagraph median" if self.cuda_graph else "do_bench median"

    def median_ms(self, fn: Callable[[], object]) -> float:
        if self.device == "cuda":
            if self.cuda_graph:
                return triton.testing.do_bench_cudagraph(fn, rep=self.rep, return_mode="median")
            return triton.testing.do_bench(fn, rep=self.rep, return_mode="median")
        times = []
        for _ in range(3):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return 1e3 * statistics.median(times)

    def copy_gbps(self) -> float:
        """Copy GB/s (read + write), the practical ceiling for these memory-bound kernels."""
        size = 1 << (28 if self.device == "cuda" else 24)
        src = torch.empty(size, dtype=torch.uint8, device=self.device)
        dst = torch.empty_like(src)
        return 2 * src.numel() / self.median_ms(lambda: dst.copy_(src)) / 1e6


def measure(
    case: str,
    candidates: dict[str, tuple[Callable[[], torch.Tensor], SDPBackend | None]],
    ref: torch.Tensor,
    nbytes: int,
    clock: Clock,
) -> list[dict]:
    """Check each candidate against the fp32 reference, then time it; failures become rows."""
    rows = []
    for name, (fn, backend) in candidates.items():
        row = {"case": case, "impl": name, "bytes": nbytes}
        try:
            with sdpa_kernel(backend) if backend is not None else contextlib.nullcontext():
                row["max_err"] = (fn().float() - ref.float()).abs().max().item()
                row["ms"] = clock.median_ms(fn)
            row["gbps"] = nbytes / row["ms"] / 1e6
        except Exception as err:  # a backend refusing this shape or GQA, a kernel out of resources
            row["error"] = str(err).strip().splitlines()[0].split(". ")[0][:120]
        rows.append(row)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return rows


def bench_decode(shapes: Shapes, dtype: torch.dtype, clock: Clock) -> list[dict]:
    """One query token against a full cache of each length."""
    device = clock.device
    from gsopt.kernels.decode_attention import decode_attention, decode_attention_ref

    heads, kv_heads, dim = shapes.heads, shapes.kv_heads, shapes.head_dim
    group, scale = heads // kv_heads, dim**-0.5
    compiled_ref = torch.compile(decode_attention_ref, dynamic=False, backend=compile_backend())
    rows = []
    for batch in shapes.batches:
        for length in shapes.lengths:
            q = torch.randn(batch, heads, 1, dim, device=device, dtype=dtype)
            k, v = torch.randn(2, batch, kv_heads, length, dim, device=device, dtype=dtype)
            lengths = torch.full((batch,), length, device=device, dtype=torch.int32)
            nbytes = (2 * batch * kv_heads * length * dim + 2 * batch * heads * dim) * q.itemsize

            def expanded(q=q, k=k, v=v):
                kx, vx = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
                return F.scaled_dot_product_attention(q, kx, vx, scale=scale)

            def gqa(q=q, k=k, v=v):
                return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True)

            candidates = {
                f"{OURS} decode_attention": (
                    lambda q=q, k=k, v=v, n=lengths: decode_attention(q, k, v, n, scale),
                    None,
                ),
                "torch.compile(reference)": (
                    lambda q=q, k=k, v=v, n=lengths: compiled_ref(q, k, v, n, scale),
                    None,
                ),
            }
            for name, backend in SDPA_BACKENDS.items():
                candidates[f"sdpa {name}, enable_gqa"] = (gqa, backend)
                candidates[f"sdpa {name}, K/V expanded"] = (expanded, backend)
            ref = decode_attention_ref(q, k, v, lengths, scale)
            case = f"decode B={batch} L={length}"
            rows += measure(case, candidates, ref, nbytes, clock)
    return rows


def bench_conformer(shapes: Shapes, dtype: torch.dtype, clock: Clock) -> list[dict]:
    """One utterance's conformer blocks, the last one half full."""
    device = clock.device
    from gsopt.kernels.conformer_attention import conformer_attention, conformer_attention_ref

    blocks, heads = shapes.blocks, shapes.block_heads
    context, dim = shapes.context, shapes.block_dim
    scale = dim**-0.5
    q, k, v = torch.randn(3, blocks, heads, context, dim, device=device, dtype=dtype)
    rel_pos = torch.randn(2 * context + 1, dim, device=device, dtype=dtype)
    valid_len = torch.tensor([context] * (blocks - 1) + [context // 2], device=device).int()
    pos = torch.arange(context, device=device)
    dists = pos[:, None] - pos[None, :] + context
    padded_key = (pos[None, :] >= valid_len[:, None])[:, None, None, :]  # [N, 1, 1, C]

    def bias() -> torch.Tensor:
        """The position term as transformers builds it: gather, einsum, mask."""
        pos_attn = torch.einsum("bhcd,crd->bhcr", q, rel_pos[dists]) * scale
        return pos_attn.masked_fill(padded_key, -torch.finfo(dtype).max)

    def biased_sdpa(attn_mask=None):
        attn_mask = bias() if attn_mask is None else attn_mask
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)

    fixed_bias = bias()
    compiled_ref = torch.compile(conformer_attention_ref, backend=compile_backend())
    candidates = {
        f"{OURS} conformer_attention": (
            lambda: conformer_attention(q, k, v, rel_pos, valid_len, scale),
            None,
        ),
        "torch.compile(reference)": (
            lambda: compiled_ref(q, k, v, rel_pos, valid_len, scale),
            None,
        ),
        TRANSFORMERS_MATH: (biased_sdpa, SDPBackend.MATH),
        "bias + sdpa efficient": (biased_sdpa, SDPBackend.EFFICIENT_ATTENTION),
        "sdpa efficient, bias precomputed": (
            lambda: biased_sdpa(fixed_bias),
            SDPBackend.EFFICIENT_ATTENTION,
        ),
    }
    nbytes = (4 * q.numel() + rel_pos.numel()) * q.itemsize
    ref = conformer_attention_ref(q, k, v, rel_pos, valid_len, scale)
    return measure(f"conformer N={blocks} C={context}", candidates, ref, nbytes, clock)


def compile_backend() -> str:
    """Inductor on CUDA; on the CPU the smoke run checks the harness, not C++ codegen."""
    return "inductor" if torch.cuda.is_available() else "aot_eager"


def targets(rows: list[dict], copy_gbps: float, tolerance: float) -> list[dict]:
    """The issue's targets per case, met or not, after the kernel's own error check."""
    by_case: dict[str, dict[str, dict]] = {}
    for r in rows:
        if "ms" in r:
            by_case.setdefault(r["case"], {})[r["impl"]] = r
    checks = []
    for case, impls in by_case.items():
        ours = next((r for name, r in impls.items() if name.startswith(OURS)), None)
        if ours is None:
            continue
        err = ours["max_err"]
        checks.append(
            {"case": case, "target": f"max error <= {tolerance:g}", "value": err,
             "shown": f"{err:.1e}", "met": err <= tolerance}
        )  # fmt: skip
        floor = ours["gbps"] / copy_gbps
        checks.append(
            {"case": case, "target": "within 80% of the bandwidth floor", "value": floor,
             "shown": f"{100 * floor:.0f}% of copy GB/s", "met": floor >= 0.8}
        )  # fmt: skip
        if case.startswith("decode B=1 "):
            sdpa = [r["ms"] for name, r in impls.items() if name.startswith("sdpa")]
            if sdpa:
                ratio = min(sdpa) / ours["ms"]
                checks.append(
                    {"case": case, "target": ">= 1.5x the best SDPA backend", "value": ratio,
                     "shown": f"{ratio:.2f}x", "met": ratio >= 1.5}
                )  # fmt: skip
        if TRANSFORMERS_MATH in impls:
            ratio = impls[TRANSFORMERS_MATH]["ms"] / ours["ms"]
            checks.append(
                {"case": case, "target": ">= 2x transformers' MATH path", "value": ratio,
                 "shown": f"{ratio:.2f}x", "met": ratio >= 2.0}
            )  # fmt: skip
    return checks


def markdown(meta: dict, rows: list[dict], checks: list[dict]) -> str:
    lines = [
        "# gsopt attention kernels",
        "",
        *(f"- {key}: {value}" for key, value in meta.items()),
        "",
        "| case | implementation | median µs | GB/s | % of copy | gsopt speed-up | max err |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    ours = {r["case"]: r.get("ms") for r in rows if r["impl"].startswith(OURS)}
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['case']} | {r['impl']} | n/a: {r['error']} | | | | |")
            continue
        speedup = f"{r['ms'] / ours[r['case']]:.2f}x" if ours.get(r["case"]) else ""
        lines.append(
            f"| {r['case']} | {r['impl']} | {r['ms'] * 1e3:.1f} | {r['gbps']:.0f} "
            f"| {100 * r['gbps'] / meta['copy GB/s']:.0f}% | {speedup} | {r['max_err']:.1e} |"
        )
    lines += ["", "## Targets", "", "| case | target | measured | met |", "|---|---|---:|---|"]
    lines += [
        f"| {c['case']} | {c['target']} | {c['shown']} | {'yes' if c['met'] else 'NO'} |"
        for c in checks
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        if not args.smoke:
            sys.exit(
                "bench_kernels: no CUDA device; timings need a GPU "
                "(run with --smoke to check the harness on the CPU interpreter)"
            )
        if os.environ.get("TRITON_INTERPRET") != "1":  # read when triton is imported
            sys.exit(
                "bench_kernels: --smoke on the CPU needs TRITON_INTERPRET=1 in the environment"
            )
    shapes = SMOKE_SHAPES if args.smoke else ISSUE_SHAPES
    if args.batches or args.lengths:
        shapes = Shapes(**{
            **asdict(shapes),
            "batches": tuple(args.batches or shapes.batches),
            "lengths": tuple(args.lengths or shapes.lengths),
        })  # fmt: skip
    # Triton 3.9's interpreter multiplies bf16 bit patterns, so a CPU smoke run uses fp32.
    dtype_name = args.dtype or ("bf16" if device == "cuda" else "fp32")
    dtype = DTYPES[dtype_name]
    # One specialised compile per decode shape; past the default limit of 8 dynamo would
    # silently fall back to eager and the "compiled" rows would lie.
    torch._dynamo.config.recompile_limit = 64
    clock = Clock(device, args.cuda_graph, args.rep)
    copy_gbps = clock.copy_gbps()
    meta = {
        **environment(torch.device(device)),
        "triton": triton.__version__,
        "dtype": dtype_name,
        "timing": clock.method,
        "copy GB/s": round(copy_gbps, 1),
    }
    rows = bench_decode(shapes, dtype, clock) + bench_conformer(shapes, dtype, clock)
    checks = targets(rows, copy_gbps, TOLERANCE[dtype])
    report = markdown(meta, rows, checks)
    print(report)
    if args.out:
        write_atomic(args.out, report)
        payload = {"meta": meta, "shapes": asdict(shapes), "rows": rows, "targets": checks}
        write_atomic(args.out.with_suffix(".json"), json.dumps(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
