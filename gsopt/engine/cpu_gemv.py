"""Inductor options for a CPU decode step: weight-times-few-rows products as reductions.

A decode (or k-token verify) step multiplies a handful of rows by every weight, so it runs at
the rate its products read memory. Measured on a 2-core AVX-512 EPYC:
- fp32: MKL's sgemv reads at about half the memory's rate (17 vs 34 GB/s); inductor's own
  memory-bound-mm decomposition (`decompose_mm_pass`) turns the product into a vectorised
  reduction that reads at nearly all of it.
- int8 weight-only (torchao's `Int8Tensor`, fp32 activations): torchao computes
  `x @ qdata.t().to(float32) * scale`. Eagerly, or through inductor's decomposition, which
  realizes its inputs, that converts the whole weight to fp32 on every call (8 MB of int8
  becomes a 32 MB write and read). Fused into the reduction, the conversion happens in
  registers: the kernel reads int8 at 23-25 GB/s, against 11 GB/s for `_weight_int8pack_mm`
  with bf16 activations and 1.7 GB/s with fp32 ones.
"""

from __future__ import annotations

from typing import Any

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files
from torch._inductor.pattern_matcher import (
    Arg,
    CallFunction,
    KeywordArg,
    Match,
    PatternMatcherPass,
    register_graph_pattern,
)

aten, prims = torch.ops.aten, torch.ops.prims

# A verify step's k; one decode row is the common case.
MAX_ROWS = 8

_int8_patterns = PatternMatcherPass(pass_name="gsopt_int8_gemv")


def _few_rows_int8_weight(match: Match) -> bool:
    x, weight = match.kwargs["x"].meta.get("val"), match.kwargs["weight"].meta.get("val")
    return (
        x is not None
        and weight is not None
        and x.device.type == "cpu"
        and weight.dtype == torch.int8
        and x.dtype.is_floating_point
        and x.dim() == 2
        and weight.dim() == 2
        and torch.fx.experimental.symbolic_shapes.statically_known_true(x.shape[0] <= MAX_ROWS)
    )


@register_graph_pattern(
    CallFunction(
        aten.mm.default,
        KeywordArg("x"),
        CallFunction(
            prims.convert_element_type.default,
            CallFunction(aten.permute.default, KeywordArg("weight"), [1, 0]),
            Arg(),
        ),
    ),
    pass_dict=_int8_patterns,
    extra_check=_few_rows_int8_weight,
)
def _int8_gemv(match: Match, *_dtype: Any, x: torch.fx.Node, weight: torch.fx.Node) -> None:
    def as_reduction(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return (x[:, None, :] * weight.to(x.dtype)[None, :, :]).sum(-1)

    match.replace_by_example(as_reduction, [x, weight])


class Int8WeightGemv(CustomGraphPass):
    """`x @ int8_weight.t().to(x.dtype)` over a few rows, as a reduction that converts each
    weight element in registers (a post-grad pass; hashable for inductor's cache)."""

    def __call__(self, graph: torch.fx.Graph) -> None:
        _int8_patterns.apply(graph)

    def uuid(self) -> bytes:
        return get_hash_for_files((__file__,))


def inductor_options() -> dict[str, Any]:
    """Options for a compiled CPU decode or verify step: the int8 pass above, and inductor's
    own memory-bound-mm decomposition with its row limit raised from 1 (batch 1 only) to
    MAX_ROWS and no limit on the weight's size (the module reads its limits as globals, so
    they are set there)."""
    from torch._inductor.fx_passes import decompose_mem_bound_mm as pass_

    pass_.cpu_max_first_dimension_decomposition = MAX_ROWS
    pass_.cpu_max_other_dimension_decomposition = 1 << 31
    return {
        "post_grad_custom_pre_pass": Int8WeightGemv(),
        "post_grad_fusion_options": {"decompose_mm_pass": {}},
    }
