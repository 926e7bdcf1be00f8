"""The audio LoRA on the decoder's q/v projections, live or merged into FMS's fused qkv weight.

Granite Speech ships a LoRA (q_proj and v_proj of every layer) that is meant to be active only
when the input holds audio. FMS fuses q, k and v into one weight and permutes q's rows into
its RoPE layout, so the adapter is stored the same way: one `lora_a` [2r, D] (q's A over v's
A) and one block `lora_b` [q+k+v rows, 2r] whose q block went through the same permutation.
Then `live` is one extra low-rank product and `merged` is `W += scale * lora_b @ lora_a`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Literal

import torch
import torch.nn.functional as F
from fms.models.granite import _hf_to_fms_rope
from torch import nn

from gsopt.errors import GsoptError
from gsopt.model.config import GraniteSpeechConfig

LoraMode = Literal["live", "merged", "none"]
LORA_MODES = ("live", "merged", "none")
_PEFT_KEY = re.compile(r"layers\.(\d+)\.self_attn\.([qv])_proj\.lora_([AB])(?:\.default)?\.weight$")


class LoRAQKVLinear(nn.Linear):
    """FMS's fused qkv Linear plus a switchable low-rank delta (same `weight` key as before)."""

    def __init__(self, base: nn.Linear, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float):
        super().__init__(
            base.in_features, base.out_features, bias=base.bias is not None, device="meta"
        )
        self.weight = base.weight
        self.bias = base.bias
        self.lora_a = nn.Parameter(lora_a, requires_grad=False)
        self.lora_b = nn.Parameter(lora_b, requires_grad=False)
        self.scale = scale
        self.enabled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        if self.enabled:
            out = out + F.linear(F.linear(x, self.lora_a), self.lora_b) * self.scale
        return out

    def merged(self) -> nn.Linear:
        """A plain Linear with the delta folded in (for speech-only serving)."""
        linear = nn.Linear(
            self.in_features, self.out_features, bias=self.bias is not None, device="meta"
        )
        delta = (self.lora_b.float() @ self.lora_a.float()) * self.scale
        linear.weight = nn.Parameter(
            (self.weight.float() + delta).to(self.weight.dtype), requires_grad=False
        )
        linear.bias = self.bias
        return linear


def parse_peft_adapter(
    state_dict: Mapping[str, torch.Tensor],
) -> dict[int, dict[str, torch.Tensor]]:
    """Group a peft adapter's tensors by layer: {layer: {"qA", "qB", "vA", "vB"}}."""
    layers: dict[int, dict[str, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        match = _PEFT_KEY.search(key)
        if match is None:
            raise GsoptError(f"adapter_model.safetensors: unexpected key {key!r} (not a q/v LoRA)")
        layer, proj, ab = match.groups()
        layers.setdefault(int(layer), {})[proj + ab] = tensor
    return layers


def random_adapter(config: GraniteSpeechConfig, generator: torch.Generator | None = None):
    """A random adapter of the variant's published rank, for benchmarks with random weights.
    Unit-gain factors (std 1/sqrt(fan_in)), so the adapter visibly changes the output and a
    test that loses it fails."""
    dec, r = config.decoder, config.lora_rank
    q_out, v_out = dec.nheads * dec.head_dim, dec.kvheads * dec.head_dim

    def randn(rows: int, cols: int) -> torch.Tensor:
        return torch.randn(rows, cols, generator=generator) * cols**-0.5

    return {
        i: {
            "qA": randn(r, dec.emb_dim),
            "qB": randn(q_out, r),
            "vA": randn(r, dec.emb_dim),
            "vB": randn(v_out, r),
        }
        for i in range(dec.nlayers)
    }


def _fused_factors(
    parts: dict[str, torch.Tensor],
    layer: int,
    config: GraniteSpeechConfig,
    shard: tuple[int, int] = (0, 1),
) -> tuple[torch.Tensor, torch.Tensor]:
    dec = config.decoder
    q_out, kv_out = dec.nheads * dec.head_dim, dec.kvheads * dec.head_dim
    missing = {"qA", "qB", "vA", "vB"} - parts.keys()
    if missing:
        raise GsoptError(f"adapter: layer {layer} lacks {sorted(missing)} LoRA tensors")
    r = parts["qA"].shape[0]
    expected = {"qA": (r, dec.emb_dim), "vA": (r, dec.emb_dim), "qB": (q_out, r), "vB": (kv_out, r)}
    for name, shape in expected.items():
        if tuple(parts[name].shape) != shape:
            raise GsoptError(
                f"adapter: layer {layer} {name} has shape {tuple(parts[name].shape)}, "
                f"expected {shape}"
            )
    # q's rows follow FMS's RoPE permutation, exactly as the base q weight does.
    name = f"base_model.layers.{layer}.attn.in_proj.query.weight"
    q_b = _hf_to_fms_rope({name: parts["qB"]}, model_config=dec)[name]
    lora_b = parts["qB"].new_zeros(q_out + 2 * kv_out, 2 * r)
    lora_b[:q_out, :r] = q_b
    lora_b[q_out + kv_out :, r:] = parts["vB"]
    return torch.cat([parts["qA"], parts["vA"]]), _rank_rows(lora_b, q_out, kv_out, shard)


def _rank_rows(rows: torch.Tensor, q_out: int, kv_out: int, shard: tuple[int, int]):
    """The fused [q; k; v] rows that rank `shard[0]` of `shard[1]` holds under FMS's tensor
    parallelism: its contiguous slice of each of q, k and v (their head counts divide)."""
    rank, world = shard
    if world == 1:
        return rows
    q, k, v = rows.split([q_out, kv_out, kv_out])
    return torch.cat([part.chunk(world)[rank] for part in (q, k, v)])


def attach_audio_lora(
    model: nn.Module,
    adapter: dict[int, dict[str, torch.Tensor]],
    mode: LoraMode = "live",
    shard: tuple[int, int] = (0, 1),
) -> None:
    """Install the adapter on every decoder layer's fused qkv projection, live or merged;
    `shard` (rank, world size) when the decoder is tensor-parallel: each rank's adapter rows
    follow its slice of the weight."""
    if mode not in LORA_MODES:
        raise GsoptError(f"unknown lora mode {mode!r}: choose one of {', '.join(LORA_MODES)}")
    config: GraniteSpeechConfig = model.config
    layers = model.decoder.base_model.layers
    if set(adapter) != set(range(len(layers))):
        raise GsoptError(
            f"adapter: covers layers {sorted(adapter)}, the decoder has {len(layers)} layers"
        )
    if mode == "none":
        return
    for i, layer in enumerate(layers):
        base = layer.attn.in_proj.qkv_fused
        lora_a, lora_b = _fused_factors(adapter[i], i, config, shard)
        device, dtype = base.weight.device, base.weight.dtype
        wrapped = LoRAQKVLinear(
            base, lora_a.to(device, dtype), lora_b.to(device, dtype), config.lora_scale
        )
        layer.attn.in_proj.qkv_fused = wrapped.merged() if mode == "merged" else wrapped
    model.lora_mode = mode


def merge_audio_lora_(model: nn.Module) -> None:
    """Fold a live adapter into the weights in place (torchao-style: transform, don't copy)."""
    for layer in model.decoder.base_model.layers:
        proj = layer.attn.in_proj
        if isinstance(proj.qkv_fused, LoRAQKVLinear):
            proj.qkv_fused = proj.qkv_fused.merged()
    model.lora_mode = "merged"


def set_lora_enabled(model: nn.Module, enabled: bool) -> None:
    """Live mode follows transformers: the adapter is on only for inputs that carry audio."""
    for module in model.decoder.modules():
        if isinstance(module, LoRAQKVLinear):
            module.enabled = enabled
