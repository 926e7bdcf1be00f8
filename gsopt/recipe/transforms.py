"""What a recipe does to the model itself, before its stages are built (torchao-style).

Each transform is a small object that changes the model in place, names the stages whose
computation it changes, and says whether it would change a given model, so callers know
when to work on a copy (`changes_model`). `model_transforms` lists them in the order they
run; a new kind is a class here and one line there.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Protocol

import torch

from gsopt.engine import attention
from gsopt.engine.cpu_linear import has_plain_linears, pack_linears_
from gsopt.engine.quantize import Quantization, quantize_model
from gsopt.model.encoder import ShawBlockAttention, set_block_attention
from gsopt.model.family import family_of
from gsopt.model.lora import merge_audio_lora_
from gsopt.recipe.settings import Recipe
from gsopt.runtime import DTYPES


class Transform(Protocol):
    stages: tuple[str, ...]  # the stages whose computation it changes

    def changes(self, model: torch.nn.Module) -> bool:
        """Whether applying this would change `model` (weights or modules): then a caller
        that still needs the original must give `apply` a copy."""

    def __call__(self, model: torch.nn.Module) -> None: ...


@dataclass(frozen=True)
class CastDtype:
    """The model to `dtype`, except its encoder and projector where `audio_dtype` names
    theirs (each tensor cast once: an fp32 encoder is not rounded through bf16)."""

    dtype: str | None
    audio_dtype: str | None = None
    stages = ("frontend", "encoder", "projector", "prefill", "decode")

    def _audio(self, model) -> list[torch.nn.Module]:
        if self.audio_dtype is None:
            return []
        return [part for name in ("encoder", "projector") if (part := getattr(model, name, None))]

    def changes(self, model) -> bool:
        audio = self._audio(model)
        # the rest of the model's dtype read off its decoder
        rest = getattr(model, "decoder", model) if audio else model
        wanted = [(rest, self.dtype)] + [(part, self.audio_dtype) for part in audio]
        return any(d is not None and model_dtype(m) != DTYPES[d] for m, d in wanted)

    def __call__(self, model) -> None:
        audio = self._audio(model)
        if self.dtype is not None:
            _cast_except(model, DTYPES[self.dtype], {id(part) for part in audio})
        for part in audio:
            part.to(DTYPES[self.audio_dtype])


def _cast_except(module: torch.nn.Module, dtype: torch.dtype, skip: set[int]) -> None:
    """`module.to(dtype)` leaving the submodules in `skip` as they are."""
    if id(module) in skip:
        return
    if not any(id(m) in skip for m in module.modules()):
        module.to(dtype)
        return
    module._apply(lambda t: t.to(dtype) if t.is_floating_point() else t, recurse=False)
    for child in module.children():
        _cast_except(child, dtype, skip)


@dataclass(frozen=True)
class MergeLoRA:
    """Fold the live audio LoRA into the fused qkv weights (speech-only serving)."""

    stages = ("prefill", "decode")

    def changes(self, model) -> bool:
        return getattr(model, "lora_mode", "none") == "live"

    def __call__(self, model) -> None:
        merge_audio_lora_(model)


@dataclass(frozen=True)
class EncoderAttention:
    """Every conformer block attention onto one implementation (`gsopt.engine.attention`)."""

    impl: attention.Attention
    stages = ("encoder",)

    def changes(self, model) -> bool:
        fn = self.impl.load()
        return any(
            m.block_attention is not fn
            for m in model.encoder.modules()
            if isinstance(m, ShawBlockAttention)
        )

    def __call__(self, model) -> None:
        set_block_attention(model.encoder, self.impl.load())


@dataclass(frozen=True)
class PackLinears:
    """Every plain nn.Linear onto oneDNN with its weight prepacked (a CPU setting). With a
    compiled decode step the decoder keeps its plain weights too, for the one-row products
    that step computes as inductor reductions."""

    keep_plain_decoder: bool = False
    stages = ("encoder", "projector", "prefill", "decode")

    def changes(self, model) -> bool:
        return has_plain_linears(model)

    def __call__(self, model) -> None:
        if family_of(model).decoder:
            pack_linears_(model.decoder, self.keep_plain_decoder)
        pack_linears_(model)


@dataclass(frozen=True)
class Quantize:
    """torchao weight-only quantization of the model parts the [quantize] table names."""

    settings: Quantization

    @property
    def stages(self) -> tuple[str, ...]:
        touched = {"decoder": ("prefill", "decode"), "encoder": ("encoder",)}
        return tuple(s for q in self.settings.stages for s in touched.get(q, (q,)))

    def changes(self, model) -> bool:
        return True

    def __call__(self, model) -> None:
        quantize_model(model, self.settings)


def model_transforms(
    recipe: Recipe, model: torch.nn.Module, encoder_attention: attention.Attention | None = None
) -> list[Transform]:
    """The recipe's changes to this model, in the order they run: only those its family
    has parts for (a CTC model has no LoRA to merge and no decoder to quantize).
    `encoder_attention` is the implementation resolved for this device, if the recipe names
    one."""
    family = family_of(model)
    device = next(model.parameters()).device
    transforms: list[Transform] = []
    if recipe.dtype is not None or recipe.audio_dtype is not None:
        transforms.append(CastDtype(recipe.dtype, recipe.audio_dtype))
    if recipe.lora == "merged" and family.decoder:
        transforms.append(MergeLoRA())
    quantize = recipe.quantize
    if quantize is not None:
        parts = tuple(s for s in quantize.stages if s in family.parts)
        if parts:
            transforms.append(Quantize(dataclasses.replace(quantize, stages=parts)))
    if recipe.linear == "onednn" and device.type == "cpu":
        transforms.append(PackLinears(keep_plain_decoder=recipe.decode.backend == "compile"))
    if encoder_attention is not None:
        transforms.append(EncoderAttention(encoder_attention))
    return transforms


def model_dtype(model: torch.nn.Module) -> torch.dtype:
    """The model's floating-point dtype (its first floating parameter's)."""
    return next(p.dtype for p in model.parameters() if p.is_floating_point())


def changes_model(model: torch.nn.Module, recipe: Recipe) -> bool:
    """Whether applying `recipe` would change `model`: then a caller that keeps using the
    original gives `apply` a copy."""
    device = next(model.parameters()).device
    recipe = recipe.for_device(device.type)
    name = recipe.encoder.attention
    impl = None
    if name != attention.AUTO:
        impl = attention.resolve("encoder", name, device, [])
    return any(t.changes(model) for t in model_transforms(recipe, model, impl))
