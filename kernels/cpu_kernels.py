"""gsopt's CPU kernels (`cpu_kernels.cpp`), built on first use: int4 on torchao's packed layout,
and a bf16 row on BF16 dot products.

- `int4_int8_linear`, any number of rows: torchao's CPU int4 kernel converts every weight to
  float before it multiplies, so a batch-1 decode step reads int4 weights at about 27 GB/s on
  a 2-core AVX-512 EPYC, where the memory gives 45, and a prefill runs at the float rate.
  This op quantizes each row to int8 per weight group, as llama.cpp's q4 x q8 product does,
  and multiplies on VNNI: one row reads 41 GB/s there; 172 rows on a 2-core Xeon make 650-790
  GOP/s, where the bf16 unpacking below made 170-230. That makes it lossy beyond the int4
  weights; `[quantize] activations = "int8"` asks for it.
- `int4_linear`, a prefill's rows kept in float: the torchao kernel is compute-bound at about
  340 GFLOP/s for any row count, oneDNN's bf16 GEMM runs at 700-900 on the EPYC. This op
  unpacks the weight to bf16 a cache-sized slice of columns at a time (16 elements/ns, where
  inductor's code for the same unpacking, `gsopt.engine.cpu_int4.dequantize`, makes 3) and
  multiplies each slice.
- `gemv`, one fp32 or bf16 row (a compiled decode step's linears, `gsopt.engine.cpu_linear`):
  inductor's reduction converts every bf16 weight to fp32 before it multiplies, near 38 GB/s
  on the EPYC, and reads fp32 weights at 14-22 GB/s on the Xeon where MKL reads 24-26; this
  reads row after row at the memory's rate, bf16 on `vdpbf16ps`.

No maintained library does the int4 products on this layout (torchao's DA8W4 kernel ships
only in builds with its C++ extension, and takes its own layout), so these are small kernels,
torch custom ops beside plain-torch references: `reference` below, `cpu_int4.dequantize`, and
for `gemv` any float64 product. They need AVX512-BW, -VBMI and -VNNI (`gemv`'s bf16 rows also
AVX512-BF16) and a C++ compiler (the one inductor uses); elsewhere `unavailable()` says why,
and the torchao kernel, the torch unpacking and inductor's reduction serve instead.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from gsopt.runtime import cpu_features

REQUIRED = ("avx512bw", "avx512vbmi", "avx512_vnni")
FLAGS = ["-O3", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vbmi", "-mavx512vnni"]


@functools.cache
def unavailable() -> str | None:
    """Why the op cannot run here, or None once it is built and registered."""
    missing = [flag for flag in REQUIRED if flag not in cpu_features()]
    if missing:
        return f"this CPU lacks {', '.join(missing)}"
    from torch.utils import cpp_extension

    source = Path(__file__).with_suffix(".cpp")
    try:
        cpp_extension.load(
            name="gsopt_cpu_kernels",
            sources=[str(source)],
            extra_cflags=FLAGS,
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
            verbose=False,
        )
    except Exception as e:  # no compiler, or one without these flags
        return f"building {source.name} failed ({type(e).__name__})"

    @torch.library.register_fake("gsopt_cpu::int4_int8_linear")
    def _(x, packed, scale_and_zero, group_size, rows):
        return x.new_empty((x.shape[0], rows))

    @torch.library.register_fake("gsopt_cpu::gemv")
    def _(x, weight):
        return x.new_empty((*x.shape[:-1], weight.shape[0]))

    @torch.library.register_fake("gsopt_cpu::int4_linear")
    def _(x, packed, scale_and_zero, group_size, rows):
        return x.new_empty((x.shape[0], rows))

    return None


def has_gemv(dtype: torch.dtype) -> bool:
    """Whether `gsopt_cpu::gemv` takes rows of `dtype` here: fp32 where the kernels built,
    bf16 also needs BF16 dot products."""
    if dtype not in (torch.float32, torch.bfloat16) or unavailable() is not None:
        return False
    return dtype == torch.float32 or "avx512_bf16" in cpu_features()


def int4_int8_linear(weight, x: torch.Tensor) -> torch.Tensor:
    """[M, K] times torchao's `Int4OpaqueTensor` [N, K] (A16W4), x quantized to int8 per row
    and weight group: [M, N] in x's dtype."""
    return torch.ops.gsopt_cpu.int4_int8_linear(
        x, weight.qdata, weight.scale_and_zero, weight.block_size[-1], weight.shape[0]
    )


def int4_linear(weight, x: torch.Tensor) -> torch.Tensor:
    """[M, K] times torchao's `Int4OpaqueTensor` [N, K] in bf16: [M, N] in x's dtype, the
    weight unpacked a cache-sized slice of columns at a time."""
    return torch.ops.gsopt_cpu.int4_linear(
        x, weight.qdata, weight.scale_and_zero, weight.block_size[-1], weight.shape[0]
    )


def reference(
    x: torch.Tensor, values: torch.Tensor, scale_and_zero: torch.Tensor, group: int
) -> torch.Tensor:
    """`int4_int8_linear` in float64: x [M, K], `values` [N, K] (0..15), `scale_and_zero`
    [K / group, N, 2], each row quantized to int8 per group (round half to even, as the op)."""
    rows, cols = values.shape
    x = x.double().view(x.shape[0], cols // group, group)
    amax = x.abs().amax(-1, keepdim=True)
    a = torch.where(amax > 0, amax.float() / 127, 1.0).double()  # the op's float32 scale
    xq = torch.round(x.float() / a.float()).double().clamp(-127, 127)  # the op divides in fp32
    q = values.double().view(rows, cols // group, group)
    dot = torch.einsum("ngk,mgk->mgn", q - 8, xq)  # [M, groups, N]
    scale, zero = scale_and_zero.double().unbind(-1)  # [groups, N]
    return (scale * a * dot + zero * x.sum(-1, keepdim=True)).sum(1)
