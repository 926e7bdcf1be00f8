"""Granite Speech 5.0 (encoder-only CTC): frontend -> encoder -> greedy CTC decode -> text.

There is no projector, prefill or decode stage; a recipe's settings for those (and for the
KV cache, the LoRA, speculation, a quantized decoder) are reported as notes, not applied.
What does apply: the frontend's and encoder's compile specs, audio buckets, the encoder's
attention implementation (the Triton kernel serves its 128-frame blocks), the dtype, oneDNN
linears and quantizing the encoder.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from gsopt.audio.frontend import LogMelDeltaFrontend
from gsopt.engine.pipeline import block_seconds, pad_waveforms
from gsopt.engine.timing import StageTimer, stage
from gsopt.model.encoder import encoder_frame_mask
from gsopt.model.granite_speech5 import ctc_greedy_decode

CTC_STAGES = ("frontend", "encoder")


@dataclass
class CTCStages:
    frontend: Callable
    encoder: Callable  # (features, frame_mask) -> CTC logits
    notes: list[str] = field(default_factory=list)
    labels: dict[str, str] = field(default_factory=dict)
    changed: set[str] = field(default_factory=set)
    audio_buckets: bool = False

    @classmethod
    def eager(cls, model) -> CTCStages:
        device = next(model.parameters()).device
        return cls(frontend=LogMelDeltaFrontend().to(device), encoder=model)


class CTCPipeline:
    """Drives the stages. Returns each row's CTC labels, padded with -1, [B, longest]."""

    def __init__(self, model, stages: CTCStages | None = None, tokenizer=None):
        self.model = model
        self.stages = stages or CTCStages.eager(model)
        self.device = next(model.parameters()).device
        self.tokenizer = tokenizer

    @torch.no_grad()
    def __call__(
        self,
        waveforms: list[torch.Tensor],
        template=None,
        max_new_tokens: int | None = None,
        *,
        stop_at_eos: bool = False,
        timer: StageTimer | None = None,
        record: dict[str, tuple] | None = None,
    ) -> torch.Tensor:
        """The speech LLM pipeline's call signature; `template`, `max_new_tokens` and
        `stop_at_eos` do not apply to a CTC model and are ignored."""
        block = block_seconds(self.model) if self.stages.audio_buckets else None
        waves, lengths = (t.to(self.device) for t in pad_waveforms(waveforms, block))
        with stage(timer, "frontend"):
            if record is not None:
                record.setdefault("frontend", (waves, lengths))
            features, frames = self.stages.frontend(waves, lengths)
        with stage(timer, "encoder"):
            mask = encoder_frame_mask(frames, features.shape[1])
            if record is not None:
                record.setdefault("encoder", (features, mask))
            logits = self.stages.encoder(features, mask)
            labels = ctc_greedy_decode(
                logits, self.model.output_lengths(frames), self.model.config.blank_id
            )
        longest = max(1, max(map(len, labels)))
        return torch.tensor([row + [-1] * (longest - len(row)) for row in labels])

    def text(self, labels: list[int]) -> str:
        """CTC labels to text. The 5.0 tokenizer groups repeated ids when it decodes; CTC has
        already collapsed them (a repeat across a blank is two labels), so it must not."""
        try:
            text = self.tokenizer.decode(labels, skip_special_tokens=True, group_tokens=False)
        except TypeError:
            text = self.tokenizer.decode(labels, skip_special_tokens=True)
        return text.strip()


def apply_ctc(model, recipe, settings: dict, notes: list[str], transforms) -> CTCStages:
    """`gsopt.recipe.build.apply` for a CTC model: the transforms that apply (already filtered),
    the frontend's and encoder's stage specs, and a note for everything else."""
    from gsopt.recipe.build import STAGES, StageRecipe, _wrap, describe

    default = StageRecipe()
    for name in STAGES:
        if name not in CTC_STAGES and dataclasses.replace(
            settings[name], attention="auto"
        ) != dataclasses.replace(default, attention="auto"):
            notes.append(f"{name}: Granite Speech 5.0 (CTC) has no {name} stage; ignored")
    for key, ignored in (
        ("kv_cache", recipe.kv_cache == "static"),
        ("lora", recipe.lora == "merged"),
        ("speculate", recipe.speculate is not None),
    ):
        if ignored:
            notes.append(f"{key}: Granite Speech 5.0 (CTC) has no decoder; ignored")
    changed: set[str] = {s for s in CTC_STAGES if settings[s].backend != "eager"}
    if recipe.audio_buckets:
        changed.update(CTC_STAGES)
    for transform in transforms:
        if transform.changes(model):
            changed.add("encoder")
        transform(model)
    stages = CTCStages.eager(model)
    stages.notes, stages.changed, stages.audio_buckets = notes, changed, recipe.audio_buckets
    stages.labels = {s: describe(settings[s]) for s in CTC_STAGES}
    for s in CTC_STAGES:
        setattr(stages, s, _wrap(getattr(stages, s), settings[s]))
    return stages
