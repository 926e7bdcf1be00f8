"""int4 on x86 CPUs: prefills at the bf16 GEMM rate, one-row products on VNNI.

torchao's CPU int4 linear (`Int4OpaqueTensor`) calls `_weight_int4pack_mm_for_cpu`, which
dequantizes inside its inner loop: compute-bound at about 340 GFLOP/s for any row count on a
2-core AVX-512 EPYC, where oneDNN's bf16 GEMM runs at 700-900. Over many rows it is cheaper
to unpack the weight to bf16 and call the GEMM: on a [7168, 1024] weight over 172 rows, 3.6-3.9
ms against the kernel's 6.9-7.5; over 64 rows 2.1 against 2.8, while at 16 rows the kernel
wins (0.7 against 1.2). gsopt's C++ op (`gsopt.kernels.cpu_kernels.int4_linear`) unpacks a slice
of columns at a time; `dequantize` below is the same unpacking in torch, the fallback where
the op cannot be built and its reference in the tests.

The weight is read from torchao's own packed layout, so nothing is stored twice. That layout
is the kernel's (`_convert_weight_to_int4pack_for_cpu`), which depends on the CPU's vector
width: on AVX-512, blocks of 64 output rows, each k's 32 bytes holding rows d and d + 32
(low, high nibble) then d + 16 and d + 48, and a short last block as row pairs. Each layer's
unpacking is checked when it is wrapped (packing the unpacked values again must give the
stored bytes); a CPU whose layout differs keeps the kernel for every row count.

With `[quantize] activations = "int8"`, every product runs gsopt's VNNI kernel on the same
bytes instead (`gsopt.kernels.cpu_kernels.int4_int8_linear`), its rows quantized to int8 per
group: one row reads 41 GB/s of int4 weights against the torchao kernel's 27 (2 threads), and
a prefill's 172 rows multiply at 650-790 GOP/s on a 2-core Xeon, 3-4x the bf16 unpacking.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gsopt.kernels.cpu_kernels import int4_int8_linear, int4_linear, unavailable

# Rows from which dequantizing and a bf16 GEMM beat the int4 kernel (see above).
DEQUANTIZE_ROWS = 48
BLOCK = 64  # output rows per block of the AVX-512 layout


def unpack_int4(packed: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """The [rows, cols] values (0-15, uint8) packed by `_convert_weight_to_int4pack_for_cpu`
    on an AVX-512 CPU."""
    full = rows // BLOCK * BLOCK
    flat = packed.reshape(-1)
    body = flat[: full * cols // 2].view(rows // BLOCK, cols, 2, BLOCK // 4)
    low, high = body & 15, body >> 4
    values = torch.stack([low[:, :, 0], low[:, :, 1], high[:, :, 0], high[:, :, 1]], 2)
    values = values.reshape(rows // BLOCK, cols, BLOCK).transpose(1, 2).reshape(full, cols)
    if rows == full:
        return values
    tail = flat[full * cols // 2 :].view(cols, (rows - full) // 2)
    pairs = torch.stack([tail & 15, tail >> 4], -1).reshape(cols, rows - full).t()
    return torch.cat([values, pairs])


def layout_matches(weight) -> bool:
    """Whether `unpack_int4` reads this weight's packed bytes back (this CPU's layout)."""
    rows, cols = weight.shape
    values = unpack_int4(weight.qdata, rows, cols).to(torch.int32)
    repacked = torch.ops.aten._convert_weight_to_int4pack_for_cpu(values, 1)
    return torch.equal(repacked, weight.qdata)


def dequantize(weight) -> torch.Tensor:
    """The int4 weight in bf16 [N, K], as the kernel computes it: (q - 8) * scale + zero per
    group of K."""
    rows, cols = weight.shape
    group = weight.block_size[-1]
    values = unpack_int4(weight.qdata, rows, cols).view(rows, cols // group, group).float()
    scale, zero = weight.scale_and_zero.float().unbind(-1)  # each [K / group, N]
    out = (values - 8) * scale.t()[:, :, None] + zero.t()[:, :, None]
    return out.to(torch.bfloat16).view(rows, cols)


class CpuInt4Linear(nn.Module):
    """A torchao CPU int4 linear whose products, with `int8_rows`, run gsopt's VNNI kernel on
    int8 rows; without, products over `DEQUANTIZE_ROWS` rows or more run on the weight
    unpacked to bf16 for that call (a prefill's), and fewer keep the int4 kernel. The weight
    stays the torchao tensor: saved, loaded and counted as before."""

    def __init__(self, linear: nn.Linear, int8_rows: bool):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.int8_rows = int8_rows
        self.unpack_in_cpp = unavailable() is None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if self.int8_rows:
            out = int4_int8_linear(self.weight, x.reshape(rows, -1))
        elif rows < DEQUANTIZE_ROWS:
            return F.linear(x, self.weight, self.bias)
        elif self.unpack_in_cpp:
            out = int4_linear(self.weight, x.reshape(-1, x.shape[-1]))
        else:
            return F.linear(x, dequantize(self.weight).to(x.dtype), self.bias)
        out = out.view(*x.shape[:-1], -1)
        return out if self.bias is None else out + self.bias


def cpu_int4_linears_(module: nn.Module, int8_rows: bool) -> int:
    """Wrap every torchao CPU int4 linear below `module` whose packed layout this CPU's
    unpacking reads back; returns how many (0 where the layout is another CPU's). Products go
    to the VNNI kernel where `int8_rows` asks and it builds here."""
    from torchao.prototype.quantization.int4.int4_opaque_tensor import Int4OpaqueTensor

    int8_rows = int8_rows and unavailable() is None
    count = 0
    for name, child in module.named_children():
        if isinstance(child, nn.Linear) and isinstance(child.weight, Int4OpaqueTensor):
            if child.weight.act_mapping_type is None and layout_matches(child.weight):
                setattr(module, name, CpuInt4Linear(child, int8_rows))
                count += 1
        else:
            count += cpu_int4_linears_(child, int8_rows)
    return count
