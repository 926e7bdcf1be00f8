"""Linear layers on oneDNN with weights prepacked once: the x86 CPU path PyTorch's own
inductor freezing takes, for models whose weights are compile-time inputs, not constants.

Measured on a 2-core AVX-512 EPYC (fp32, 1024-wide rows): MKL's sgemv reads a 200 MB weight
at 17 GB/s and its 8-row product at 6 GB/s, oneDNN with a prepacked weight at 27 and
26 GB/s, and a 170-row prefill GEMM takes 78 ms against MKL's 124. So the decode step, the
k-token verify step, the prefill and the audio stages all gain. The product is one opaque
op (`gsopt::onednn_linear`): inductor's own lowering of oneDNN's linear expects frozen
constants and refuses a packed weight that arrives as a graph input.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gsopt.engine.quantize import is_quantized
from gsopt.kernels.cpu_kernels import has_gemv

# Rows the packed layout is tuned for: a verify step's k; it serves 1 and 170 rows as well.
ROWS_HINT = 8


@torch.library.custom_op("gsopt::onednn_linear", mutates_args=())
def onednn_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


@onednn_linear.register_fake
def _(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], packed.shape[0]))


class OneDNNLinear(nn.Module):
    """An `nn.Linear` whose `weight` is packed in oneDNN's blocked layout (same shape,
    device and dtype; not a plain strided tensor).

    With `keep_plain`, the original weight stays too, for one-row products inside compiled
    code: there gsopt's GEMV reads it at the memory's rate, or, where that kernel cannot run,
    inductor turns them into reductions (31 vs oneDNN's 27 GB/s on a 2-core EPYC), at the
    cost of holding the layer's weights twice (a tied lm head's plain weight is the embedding
    table, so it costs nothing)."""

    def __init__(self, linear: nn.Linear, keep_plain: bool = False):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), ROWS_HINT)
        self.weight = nn.Parameter(packed, requires_grad=False)
        self.bias = linear.bias
        self.plain = linear.weight if keep_plain else None
        # One row on gsopt's GEMV (gsopt.kernels.cpu_kernels.gemv) where it runs: inductor's
        # reduction reads fp32 weights at 14 GB/s on a 2-core Xeon (the kernel and MKL 24), and
        # converts each bf16 weight to fp32 first, compute-bound near 38 GB/s on an EPYC.
        self.gemv = keep_plain and has_gemv(linear.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.plain is not None and torch.compiler.is_compiling() and x.numel() == x.shape[-1]:
            if self.gemv:
                out = torch.ops.gsopt_cpu.gemv(x, self.plain)
                return out if self.bias is None else out + self.bias
            return F.linear(x, self.plain, self.bias)
        return onednn_linear(x, self.weight, self.bias)


def pack_linears_(module: nn.Module, keep_plain: bool = False) -> int:
    """Replace every plain `nn.Linear` below `module` (not subclasses such as the live
    LoRA's, nor quantized ones) by a `OneDNNLinear`; returns how many."""
    count = 0
    for name, child in list(module.named_children()):
        if type(child) is nn.Linear and not is_quantized(child.weight):
            setattr(module, name, OneDNNLinear(child, keep_plain))
            count += 1
        else:
            count += pack_linears_(child, keep_plain)
    return count


def has_plain_linears(module: nn.Module) -> bool:
    return any(type(m) is nn.Linear and not is_quantized(m.weight) for m in module.modules())
