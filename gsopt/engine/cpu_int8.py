"""Int8 activations times int8 weights on x86 CPUs: a prefill's and an encoder's GEMMs on the
int8 dot-product units (VNNI's `vpdpbusd`, AMX), where weight-only int8 converts every weight
to float first.

Each row of activations is quantized on the fly (symmetric, per row) and multiplied by the
per-channel int8 weights with `torch._int_mm`, which runs on oneDNN. VNNI multiplies unsigned
by signed bytes, so without AMX the rows are shifted by 128 to uint8 and the shift is taken
back out with each output channel's weight sum. torchao's dynamic-activation linear does the
same but sums the weights on every call, a second full read of them; here the sums are
computed once.

Rows per product, measured on a 2-core AVX-512 EPYC (VNNI, no AMX), 176 MB of [4096, 1024]
int8 weights: one row runs oneDNN's int8 GEMV at the memory rate (48 GB/s, 3.8 ms), where the
weight-only step converts every weight to float first (28 GB/s in the compiled decode step);
2 to 8 rows fall to a GEMM kernel at 16 GB/s, so a batched decode step's rows stay weight-only
(`gsopt.engine.cpu_gemv` fuses their conversion into the product's reduction); more rows are
compute-bound, and int8 products win again.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gsopt.engine.cpu_gemv import MAX_ROWS
from gsopt.runtime import cpu_features


def unsigned_activations() -> bool:
    """Whether products take uint8 activations: VNNI without AMX multiplies u8 by s8 (AMX
    and CPUs with neither take s8 by s8)."""
    features = cpu_features()
    vnni = "avx512_vnni" in features or "avx_vnni" in features
    return vnni and "amx_int8" not in features


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric int8 (as float values in [-127, 127]) and each row's scale."""
    x = x.float()
    scale = x.abs().amax(-1, keepdim=True).clamp(min=1e-12) / 127
    return torch.round(x / scale).clamp(-127, 127), scale


def takes_int8_rows(rows: int) -> bool:
    """Whether a product over `rows` rows quantizes them (see the module's measurements)."""
    return rows == 1 or rows > MAX_ROWS


class DynamicInt8Linear(nn.Module):
    """A torchao int8 weight-only linear whose products over one row or more than `MAX_ROWS`
    rows quantize their activations to int8 too. The weight stays the torchao tensor (saved,
    loaded and counted as before); the int8 data, scales and weight sums are views and
    buffers derived from it, not saved."""

    def __init__(self, linear: nn.Linear, unsigned: bool):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        qdata, scale = linear.weight.qdata, linear.weight.scale.float().flatten()
        self.register_buffer("qdata", qdata, persistent=False)
        self.register_buffer("weight_scale", scale, persistent=False)
        self.unsigned = unsigned
        sums = qdata.sum(-1, dtype=torch.int32) * 128 if unsigned else None
        self.register_buffer("shift", sums, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        if not takes_int8_rows(rows.shape[0]):
            return F.linear(x, self.weight, self.bias)
        values, scale = quantize_rows(rows)
        if self.unsigned:
            product = torch._int_mm((values + 128).to(torch.uint8), self.qdata.t()) - self.shift
        else:
            product = torch._int_mm(values.to(torch.int8), self.qdata.t())
        out = product.float() * scale * self.weight_scale
        if self.bias is not None:
            out = out + self.bias.float()
        return out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)


def int8_activations_(module: nn.Module) -> int:
    """Replace every torchao int8 linear below `module` by a `DynamicInt8Linear`; returns
    how many."""
    from torchao.quantization import Int8Tensor

    unsigned = unsigned_activations()
    count = 0
    for name, child in module.named_children():
        if isinstance(child, nn.Linear) and isinstance(child.weight, Int8Tensor):
            setattr(module, name, DynamicInt8Linear(child, unsigned))
            count += 1
        else:
            count += int8_activations_(child)
    return count
