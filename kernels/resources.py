"""Registers, spills and shared memory of gsopt's kernels, compiled for Hopper without a GPU.

    python -m gsopt.kernels.resources            # the launch settings the kernels use
    python -m gsopt.kernels.resources --sweep    # the settings they could use instead

Triton compiles ahead of time for any target its bundled ptxas knows, and cuobjdump reads the
resource use out of the binary. A launch setting that spills registers (local memory in a
loop) or needs more shared memory than an SM has is caught here, before a GPU is lent;
which of the clean settings is fastest still takes a GPU to tell.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

HOPPER = GPUTarget("cuda", 90, 32)
# Shapes the kernels serve at full size: 3.3-8b decode (32 query heads over 8 kv heads of
# 128, a 1024-token cache, batch 1) and one 200-frame conformer block (8 heads of 128).
DECODE = {"batch": 1, "heads": 32, "kv_heads": 8, "max_len": 1024, "dim": 128}
CONFORMER = {"heads": 8, "context": 200, "dim": 128}
BF16 = torch.bfloat16
H100_SMS = 132  # the split count depends on how many programs fill the card


@dataclass(frozen=True)
class Resources:
    registers: int  # per thread
    spill_bytes: int  # per-thread stack: registers that did not fit
    shared_bytes: int  # per program


def compiled_resources(
    kernel: triton.runtime.JITFunction,
    pointer_types: dict[str, str],
    launch: dict,
    num_stages: int = 3,
    target: GPUTarget = HOPPER,
) -> Resources:
    """Compile `kernel` for `target` with `launch`'s constexprs and num_warps.

    Arguments that are neither constexprs nor in `pointer_types` ("*bf16", "*i32", "fp32")
    are 32-bit integers (sizes and strides), which is what the kernels take there.
    """
    constexprs = {k: v for k, v in launch.items() if k != "num_warps"}
    signature = {
        name: "constexpr" if name in constexprs else pointer_types.get(name, "i32")
        for name in kernel.arg_names
    }
    indexed = {(kernel.arg_names.index(k),): v for k, v in constexprs.items()}
    compiled = triton.compile(
        ASTSource(kernel, signature, indexed),
        target=target,
        options={"num_warps": launch["num_warps"], "num_stages": num_stages},
    )
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        dump = subprocess.run(
            [triton.knobs.nvidia.cuobjdump.path, "--dump-resource-usage", str(cubin)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    usage = dict(re.findall(r"(REG|STACK):(\d+)", dump))
    return Resources(int(usage["REG"]), int(usage["STACK"]), compiled.metadata.shared)


def decode_resources(launch: dict, dtype: torch.dtype = BF16) -> Resources:
    from gsopt.kernels.decode_attention import _decode_split_kernel

    elem = _element(dtype)
    types = {"Q": elem, "K": elem, "V": elem, "Lengths": "*i32"}
    types |= {"OutPart": "*fp32", "LsePart": "*fp32"}  # the per-split partial results
    return compiled_resources(_decode_split_kernel, types, launch)


def conformer_resources(launch: dict, dtype: torch.dtype = BF16) -> Resources:
    from gsopt.kernels.conformer_attention import _conformer_attention_kernel

    elem = _element(dtype)
    types = {"Q": elem, "K": elem, "V": elem, "RelPos": elem, "ValidLen": "*i32", "Out": elem}
    return compiled_resources(_conformer_attention_kernel, types, launch)


def _element(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32"}[dtype]


def default_launches() -> dict[str, dict]:
    """The settings the kernels pick at full size on an H100."""
    from gsopt.kernels.conformer_attention import conformer_launch
    from gsopt.kernels.decode_attention import split_launch

    decode = split_launch(**DECODE, dtype=BF16, num_splits=None, num_sms=H100_SMS)
    return {"decode": decode, "conformer": conformer_launch(**CONFORMER, dtype=BF16)}


def row(kernel: str, launch: dict) -> dict:
    resources = {"decode": decode_resources, "conformer": conformer_resources}[kernel](launch)
    return {"kernel": kernel, **launch, **asdict(resources)}


def sweep() -> list[dict]:
    """Tile sizes and warp counts around the defaults."""
    launches = default_launches()
    rows = [
        row("decode", launches["decode"] | {"BLOCK_N": block_n, "num_warps": warps})
        for block_n in (32, 64, 128)
        for warps in (2, 4, 8)
    ]
    for block in (32, 64):
        for warps in (4, 8):
            tiles = {"BLOCK_M": block, "BLOCK_N": block, "BLOCK_W": 2 * block}
            rows.append(row("conformer", launches["conformer"] | tiles | {"num_warps": warps}))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sweep", action="store_true", help="other tile sizes and warp counts too")
    p.add_argument("--json", action="store_true", help="print JSON rows instead of a table")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("resources: unset TRITON_INTERPRET; interpreted kernels do not compile")
    if args.sweep:
        rows = sweep()
    else:
        rows = [row(kernel, launch) for kernel, launch in default_launches().items()]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print("| kernel | tiles | warps | registers | spill bytes | shared bytes |")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        tiles = f"{r.get('BLOCK_G', r.get('BLOCK_M'))} x {r['BLOCK_N']}"
        print(
            f"| {r['kernel']} | {tiles} | {r['num_warps']} | {r['registers']} "
            f"| {r['spill_bytes']} | {r['shared_bytes']} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
