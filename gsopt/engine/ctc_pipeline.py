"""Granite Speech 5.0 (encoder-only CTC): frontend -> encoder -> greedy CTC decode -> text.

There is no projector, prefill or decode stage; a recipe's settings for those (and for the
KV cache, the LoRA, speculation, a quantized decoder) are reported as notes, not applied.
What does apply: the frontend's and encoder's compile specs, audio buckets, the encoder's
attention implementation (the Triton kernel serves its 128-frame blocks), the dtype, oneDNN
linears and quantizing the encoder.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from gsopt.audio.frontend import LogMelDeltaFrontend
from gsopt.engine.pipeline import DecodePlan, StageReport, block_seconds, pad_waveforms
from gsopt.engine.timing import StageTimer, stage
from gsopt.model.encoder import encoder_frame_mask
from gsopt.model.granite_speech5 import ctc_greedy_decode


@dataclass(frozen=True)
class CTCStages:
    """The two stages of an encoder-only CTC model; of the plan only `audio_buckets`
    applies (there is no decoder to plan for)."""

    frontend: Callable
    encoder: Callable  # (features, frame_mask) -> CTC logits
    plan: DecodePlan = DecodePlan()
    report: StageReport = StageReport()

    @classmethod
    def eager(cls, model, **fields) -> CTCStages:
        device = next(model.parameters()).device
        return cls(frontend=LogMelDeltaFrontend().to(device), encoder=model, **fields)


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
        block = block_seconds(self.model) if self.stages.plan.audio_buckets else None
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
