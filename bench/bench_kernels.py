"""Time gsopt's attention kernels against the PyTorch paths they replace (CUDA only).

    python bench/bench_kernels.py --out bench/results/kernels-h100.md

Every number is a `triton.testing.do_bench` median (or `do_bench_cudagraph` with
--cuda-graph, closer to a captured decode step, where launch overhead is gone). Bandwidth
is the bytes each attention must move at least (q, the valid K/V, the output; for the
conformer also the rel_pos table) over the median time, for every implementation alike, and
is also quoted as a fraction of this card's measured device-to-device copy bandwidth.
The markdown table goes to --out and stdout; the same rows go to a .json beside it.
"""

import argparse
import contextlib
import json
import platform
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.testing
from torch.nn.attention import SDPBackend, sdpa_kernel

from gsopt.kernels.conformer_attention import conformer_attention, conformer_attention_ref
from gsopt.kernels.decode_attention import decode_attention, decode_attention_ref

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
SDPA_BACKENDS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, help="markdown file to write (a .json lands beside it)")
    p.add_argument("--dtype", choices=DTYPES, default="bf16")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--lengths", type=int, nargs="+", default=[128, 256, 512, 1024])
    p.add_argument("--cuda-graph", action="store_true", help="time replays of a captured graph")
    p.add_argument("--rep", type=int, default=100, help="do_bench repetition time in ms")
    return p.parse_args(argv)


def median_ms(fn: Callable[[], object], args: argparse.Namespace) -> float:
    if args.cuda_graph:
        return triton.testing.do_bench_cudagraph(fn, rep=args.rep, return_mode="median")
    return triton.testing.do_bench(fn, rep=args.rep, return_mode="median")


def copy_bandwidth(args: argparse.Namespace) -> float:
    """Device-to-device copy GB/s (read + write), the practical ceiling for these kernels."""
    src = torch.empty(1 << 28, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() / median_ms(lambda: dst.copy_(src), args) / 1e6


def measure(
    case: str,
    candidates: dict[str, tuple[Callable[[], torch.Tensor], SDPBackend | None]],
    ref: torch.Tensor,
    nbytes: int,
    args: argparse.Namespace,
) -> list[dict]:
    """Check each candidate against the fp32 reference, then time it; failures become rows."""
    rows = []
    for name, (fn, backend) in candidates.items():
        row = {"case": case, "impl": name, "bytes": nbytes}
        try:
            with sdpa_kernel(backend) if backend is not None else contextlib.nullcontext():
                row["max_err"] = (fn().float() - ref.float()).abs().max().item()
                row["ms"] = median_ms(fn, args)
            row["gbps"] = nbytes / row["ms"] / 1e6
        except RuntimeError as err:  # e.g. a backend that does not take this shape or GQA
            row["error"] = str(err).strip().splitlines()[0][:100]
        rows.append(row)
        torch.cuda.empty_cache()
    return rows


def bench_decode(args: argparse.Namespace, dtype: torch.dtype) -> list[dict]:
    """One query token against a full cache of each length: the 3.3-8b decoder's heads."""
    heads, kv_heads, dim = 32, 8, 128
    group, scale = heads // kv_heads, dim**-0.5
    compiled_ref = torch.compile(decode_attention_ref, dynamic=False)
    rows = []
    for batch in args.batches:
        for length in args.lengths:
            q = torch.randn(batch, heads, 1, dim, device="cuda", dtype=dtype)
            k, v = torch.randn(2, batch, kv_heads, length, dim, device="cuda", dtype=dtype)
            lengths = torch.full((batch,), length, device="cuda", dtype=torch.int32)
            nbytes = (2 * batch * kv_heads * length * dim + 2 * batch * heads * dim) * q.itemsize

            def expanded(q=q, k=k, v=v):
                kx, vx = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
                return F.scaled_dot_product_attention(q, kx, vx, scale=scale)

            def gqa(q=q, k=k, v=v):
                return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True)

            candidates = {
                "gsopt decode_attention": (
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
            rows += measure(case, candidates, ref, nbytes, args)
    return rows


def bench_conformer(args: argparse.Namespace, dtype: torch.dtype) -> list[dict]:
    """30 s of audio: 8 blocks of 200 frames (the last one half full), 8 heads of 128."""
    blocks, heads, context, dim = 8, 8, 200, 128
    scale = dim**-0.5
    q, k, v = torch.randn(3, blocks, heads, context, dim, device="cuda", dtype=dtype)
    rel_pos = torch.randn(2 * context + 1, dim, device="cuda", dtype=dtype)
    valid_len = torch.tensor([context] * (blocks - 1) + [context // 2], device="cuda").int()
    pos = torch.arange(context, device="cuda")
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
    compiled_ref = torch.compile(conformer_attention_ref)
    candidates = {
        "gsopt conformer_attention": (
            lambda: conformer_attention(q, k, v, rel_pos, valid_len, scale),
            None,
        ),
        "torch.compile(reference)": (
            lambda: compiled_ref(q, k, v, rel_pos, valid_len, scale),
            None,
        ),
        "transformers: bias + sdpa math": (biased_sdpa, SDPBackend.MATH),
        "bias + sdpa efficient": (biased_sdpa, SDPBackend.EFFICIENT_ATTENTION),
        "sdpa efficient, bias precomputed": (
            lambda: biased_sdpa(fixed_bias),
            SDPBackend.EFFICIENT_ATTENTION,
        ),
    }
    nbytes = (4 * q.numel() + rel_pos.numel()) * q.itemsize
    ref = conformer_attention_ref(q, k, v, rel_pos, valid_len, scale)
    return measure(f"conformer N={blocks} C={context}", candidates, ref, nbytes, args)


def git_commit() -> str:
    def git(*cmd: str) -> str:
        return subprocess.run(["git", *cmd], capture_output=True, text=True).stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    return commit + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def markdown(meta: dict, rows: list[dict]) -> str:
    lines = [
        "# gsopt attention kernels",
        "",
        *(f"- {key}: {value}" for key, value in meta.items()),
        "",
        "| case | implementation | median µs | GB/s | % of copy | gsopt speed-up | max err |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    ours = {r["case"]: r.get("ms") for r in rows if r["impl"].startswith("gsopt")}
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['case']} | {r['impl']} | n/a: {r['error']} | | | | |")
            continue
        speedup = f"{r['ms'] / ours[r['case']]:.2f}x" if ours.get(r["case"]) else ""
        lines.append(
            f"| {r['case']} | {r['impl']} | {r['ms'] * 1e3:.1f} | {r['gbps']:.0f} "
            f"| {100 * r['gbps'] / meta['copy GB/s']:.0f}% | {speedup} | {r['max_err']:.1e} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_kernels: needs a CUDA device (torch.cuda.is_available() is False)")
    dtype = DTYPES[args.dtype]
    # One specialised compile per decode shape; past the default limit of 8 dynamo would
    # silently fall back to eager and the "compiled" rows would lie.
    torch._dynamo.config.recompile_limit = 64
    meta = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "commit": git_commit(),
        "dtype": args.dtype,
        "timing": "do_bench_cudagraph median" if args.cuda_graph else "do_bench median",
        "copy GB/s": round(copy_bandwidth(args)),
    }
    rows = bench_decode(args, dtype) + bench_conformer(args, dtype)
    report = markdown(meta, rows)
    print(report)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report)
        args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
