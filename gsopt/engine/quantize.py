"""Weight-only quantized stages through torchao: fewer bytes per decode step.

At batch 1 a decode step reads every decoder weight once, so its time is bytes over
bandwidth, and int8 weights are a quarter of fp32's bytes. The recipe's `[quantize]` table
picks the format; torchao's `quantize_(module, config, filter_fn)` does the work, with
`set_inductor_config=False` so that quantizing one model does not retune inductor for every
other compile in the process.

Which kernel runs matters more than the format (measured on a 2-core AVX-512 EPYC, one
[8192, 1024] weight, one row):
- int8 with float32 activations: torchao computes `x @ qdata.t().to(float32) * scale`,
  which eagerly writes the whole weight out in float32 on every call (0.5 GB/s of int8).
  Compiled with `gsopt.engine.cpu_gemv`'s pass, the conversion is fused into the product's
  reduction: 23-25 GB/s. So on a CPU the int8 stages keep the model's dtype.
- int8 with bf16 activations: inductor rewrites it to `_weight_int8pack_mm`, 11-14 GB/s on
  the CPU; on CUDA this is the path (`compute_dtype = "bfloat16"`).
- int4 on a CPU: torchao's prototype `Int4OpaqueTensor` calls
  `_weight_int4pack_mm_for_cpu`, 13.5 GB/s with bf16 activations and a trap with float32
  ones (0.6 GB/s), so the int4 recipe computes in bf16 there. With int8 activations gsopt's
  VNNI kernel takes every product; without, a prefill's many rows dequantize to bf16 and run
  oneDNN's GEMM (`gsopt.engine.cpu_int4`).
Any quantization makes a recipe lossy: its reports give token agreement, KL divergence and
logit error instead of demanding identical tokens.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from gsopt.errors import GsoptError
from gsopt.results import write_atomic
from gsopt.runtime import DTYPES

WEIGHTS = ("int8", "int4", "float8")
# What quantized weights multiply: float activations (weight-only), or activations quantized
# to int8 where int8 products are faster: int8 weights per row, one row or a prefill's
# (`gsopt.engine.cpu_int8`); int4 weights per group, any rows (`gsopt.engine.cpu_int4`).
ACTIVATIONS = ("float", "int8")
GROUP_SIZES = (32, 64, 128)
QUANTIZABLE_STAGES = ("decoder", "encoder", "projector")


@dataclass(frozen=True)
class Quantization:
    """The `[quantize]` table. `group_size` is int4's; `lm_head` quantizes the head too
    (untying it from the embedding table, which stays as it is); `saved` names a file that
    holds the quantized weights: written the first time, loaded (not recomputed) after."""

    weights: str = "int8"
    group_size: int = 128
    lm_head: bool = False
    stages: tuple[str, ...] = ("decoder",)
    compute_dtype: str | None = None
    activations: str = "float"
    saved: str = ""


def torchao_config(q: Quantization, device: torch.device):
    """The torchao config for this device, or a one-line reason why it cannot run here."""
    from torchao.quantization import (
        Float8WeightOnlyConfig,
        Int4WeightOnlyConfig,
        Int8WeightOnlyConfig,
    )

    if q.weights == "int8":
        return Int8WeightOnlyConfig(set_inductor_config=False)
    if q.weights == "int4":
        if device.type == "cpu":
            from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig

            return PrototypeInt4WeightOnlyConfig(group_size=q.group_size, set_inductor_config=False)
        if device.type != "cuda":
            raise GsoptError(
                f"weights = 'int4' runs on CUDA (tinygemm) or the CPU, not {device.type}"
            )
        return Int4WeightOnlyConfig(
            group_size=q.group_size,
            int4_packing_format="tile_packed_to_4d",
            set_inductor_config=False,
        )
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9):
        raise GsoptError(
            "weights = 'float8' needs a CUDA GPU of compute capability 8.9 or higher (H100, "
            "H200, L4, RTX 40xx); use weights = 'int8' here"
        )
    return Float8WeightOnlyConfig(set_inductor_config=False)


def _targets(model, q: Quantization) -> dict[str, nn.Module]:
    return {stage: getattr(model, stage) for stage in q.stages}


def _filter(q: Quantization):
    def keep(module: nn.Module, fqn: str) -> bool:
        if not isinstance(module, nn.Linear) or is_quantized(module.weight):
            return False
        return q.lm_head or fqn != "head"

    return keep


def check(model, q: Quantization, device: torch.device) -> None:
    """Refuse, in one line, what torchao would refuse or silently skip."""
    if q.weights == "int4":
        _check_int4_shapes(model, q, device)
    if q.activations == "int8" and (q.weights not in ("int8", "int4") or device.type != "cpu"):
        raise GsoptError(
            f"[quantize] activations = 'int8' takes weights = 'int8' or 'int4' on a CPU (VNNI, "
            f"AMX), not {q.weights} on {device.type}; put it in a [cpu.quantize] table"
        )
    torchao_config(q, device)


# torchao's CPU int4 packing (`_convert_weight_to_int4pack_for_cpu`) takes whole blocks of
# 16 output rows; Granite's vocabularies (49160, 100352) are not all such.
CPU_INT4_ROWS = 16


def fit_group_size(model, q: Quantization) -> tuple[Quantization, str | None]:
    """int4's group size fitted to the model: the largest allowed size, up to the one asked
    for, that divides the width of every layer it quantizes (a small model's 64-wide layers
    take 64 where a recipe asks for 128), and a note saying so when it differs."""
    if q.weights != "int4":
        return q, None
    keep = _filter(q)
    widths = {
        sub.in_features
        for module in _targets(model, q).values()
        for name, sub in module.named_modules()
        if keep(sub, name)
    }
    fitting = [g for g in GROUP_SIZES if g <= q.group_size and all(w % g == 0 for w in widths)]
    if not fitting or fitting[-1] == q.group_size:
        return q, None  # `check` names the layer a size cannot divide
    size = fitting[-1]
    note = (
        f"quantize: group_size {q.group_size} does not divide every width "
        f"({', '.join(map(str, sorted(widths)))}); ran group_size {size}"
    )
    return dataclasses.replace(q, group_size=size), note


def _check_int4_shapes(model, q: Quantization, device: torch.device) -> None:
    keep = _filter(q)
    for stage, module in _targets(model, q).items():
        for name, sub in module.named_modules():
            if not keep(sub, name):
                continue
            if sub.in_features % q.group_size:
                sizes = [str(g) for g in GROUP_SIZES if sub.in_features % g == 0]
                fix = f"choose one of {', '.join(sizes)}" if sizes else "use weights = 'int8'"
                raise GsoptError(
                    f"[quantize] group_size = {q.group_size} does not divide the width "
                    f"{sub.in_features} of {stage}.{name}; {fix}"
                )
            if device.type == "cpu" and sub.out_features % CPU_INT4_ROWS and name != "head":
                fix = "use weights = 'int8'"
                raise GsoptError(
                    f"[quantize] weights = 'int4' on the CPU packs rows in blocks of "
                    f"{CPU_INT4_ROWS}; {stage}.{name} has {sub.out_features}: {fix}"
                )


def quantize_model(model, q: Quantization) -> None:
    """Cast the quantized stages to `compute_dtype` (if set) and quantize their linears (the lm head
    only with `lm_head`): from the file `saved` names when it exists, else with torchao
    (writing that file)."""
    from torchao.quantization import quantize_

    device = next(model.parameters()).device
    check(model, q, device)
    if q.compute_dtype is not None:
        for module in _targets(model, q).values():
            module.to(DTYPES[q.compute_dtype])
    if q.lm_head and "decoder" in q.stages:
        head = model.decoder.head
        head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)
        rows = -head.out_features % CPU_INT4_ROWS
        if q.weights == "int4" and device.type == "cpu" and rows:
            model.decoder.head = PaddedHead(head, rows)
    if q.saved and Path(q.saved).is_file():
        load_quantized(model, q, Path(q.saved))
    else:
        config = torchao_config(q, device)
        for module in _targets(model, q).values():
            quantize_(module, config, filter_fn=_filter(q))
        if q.saved:
            save_quantized(model, q, Path(q.saved))
    if q.weights == "int4" and device.type == "cpu":
        from gsopt.engine.cpu_int4 import cpu_int4_linears_

        for module in _targets(model, q).values():
            cpu_int4_linears_(module, int8_rows=q.activations == "int8")
    elif q.activations == "int8":
        from gsopt.engine.cpu_int8 import int8_activations_

        for module in _targets(model, q).values():
            int8_activations_(module)


class PaddedHead(nn.Module):
    """An lm head with zero rows appended to a whole block of torchao's CPU int4 layout (16
    rows; Granite's 49160-token vocabulary is not), its logits cut back to the vocabulary:
    the head quantizes with the rest instead of staying bf16, 4x the bytes a step reads."""

    def __init__(self, head: nn.Linear, rows: int):
        super().__init__()
        self.out_features = head.out_features
        weight = head.weight.detach()
        padded = nn.Linear(head.in_features, head.out_features + rows, bias=head.bias is not None)
        padded.to(weight.device, weight.dtype).requires_grad_(False)
        padded.weight.copy_(torch.cat([weight, weight.new_zeros(rows, weight.shape[1])]))
        if head.bias is not None:
            padded.bias.copy_(torch.cat([head.bias.detach(), head.bias.new_zeros(rows)]))
        self.linear = padded

    @property
    def weight(self) -> torch.Tensor:
        return self.linear.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)[..., : self.out_features]


def _state(model, q: Quantization) -> dict[str, torch.Tensor]:
    return {
        f"{stage}.{name}": tensor
        for stage, module in _targets(model, q).items()
        for name, tensor in module.state_dict().items()
    }


def save_quantized(model, q: Quantization, path: Path) -> None:
    """The quantized stages' state (torchao's tensor subclasses serialize with torch.save),
    written atomically."""
    saved = {"weights": q.weights, "group_size": q.group_size, "state": _state(model, q)}
    write_atomic(path, lambda f: torch.save(saved, f))


def load_quantized(model, q: Quantization, path: Path) -> None:
    try:
        # torchao registers its tensor subclasses as safe globals: no arbitrary pickles.
        saved = torch.load(path, map_location="cpu", weights_only=True)
        state, weights = saved["state"], saved["weights"]
    except Exception as e:  # a torn or foreign file, or one holding more than tensors
        raise GsoptError(f"{path}: not a gsopt quantized state ({type(e).__name__})") from None
    if weights != q.weights:
        raise GsoptError(f"{path}: holds {weights} weights, the recipe asks for {q.weights}")
    expected = _state(model, q)
    if state.keys() != expected.keys():
        raise GsoptError(
            f"{path}: its weights are for another model ({len(state)} tensors, this one has "
            f"{len(expected)}); delete it to quantize afresh"
        )
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise GsoptError(
                f"{path}: {key} has shape {tuple(tensor.shape)}, this model's is "
                f"{tuple(expected[key].shape)}; delete the file to quantize afresh"
            )
    device = next(model.parameters()).device
    for stage, module in _targets(model, q).items():
        prefix = f"{stage}."
        mine = {k[len(prefix) :]: v.to(device) for k, v in state.items() if k.startswith(prefix)}
        module.load_state_dict(mine, assign=True)


def stored_bytes(tensor: torch.Tensor) -> int:
    """Bytes a tensor occupies: a torchao subclass's inner tensors (quantized data, scales,
    zero points), a plain tensor's elements."""
    if hasattr(tensor, "__tensor_flatten__") and type(tensor) is not torch.Tensor:
        names, _ = tensor.__tensor_flatten__()
        return sum(stored_bytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()


def is_quantized(tensor: torch.Tensor) -> bool:
    return hasattr(tensor, "__tensor_flatten__") and type(tensor) not in (
        torch.Tensor,
        nn.Parameter,
    )
