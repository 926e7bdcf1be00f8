"""The stages of Granite Speech as small tensor callables, and the pipeline that drives them.

audio -> frontend -> encoder -> projector -> prefill -> decode loop. Each stage takes and
returns tensors only, so a recipe can compile, capture or time it on its own without reaching
into the model. `Stages.eager(model)` is the baseline; `gsopt.recipe.apply` swaps in
optimised versions of the same functions.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from gsopt.encoder import encoder_frame_mask
from gsopt.frontend import SAMPLE_RATE, LogMelFrontend
from gsopt.generate import decode_one_token_static, generate, prefill_static
from gsopt.lora import set_lora_enabled
from gsopt.timing import StageTimer, stage

STAGES = ("frontend", "encoder", "projector", "prefill", "decode")
# Audio lengths (seconds) that compiled audio stages are specialised for: every clip is
# padded up to the next rung, so 1-60 s of audio compiles at most five shapes per batch size.
AUDIO_LADDER_S = (4, 8, 16, 32, 64)


def bucket_seconds(seconds: float, ladder: tuple[int, ...] = AUDIO_LADDER_S) -> int:
    """The smallest rung that holds the clip; past the ladder, a multiple of the last rung."""
    for rung in ladder:
        if seconds <= rung:
            return rung
    return -(-int(math.ceil(seconds)) // ladder[-1]) * ladder[-1]


def encode(model, features: torch.Tensor, frame_mask: torch.Tensor) -> torch.Tensor:
    """Encoder stage; padded frames are zeroed here so the projector sees a lone clip's zeros."""
    hidden = model.encoder(features, frame_mask)
    return hidden * frame_mask.unsqueeze(-1).to(hidden.dtype)


def project(model, hidden: torch.Tensor) -> torch.Tensor:
    return model.projector(hidden)


@dataclass
class Stages:
    """One callable per stage, and how the pipeline feeds them: `kv_cache` and
    `decode_attention` say which decoder path prefill/decode belong to; `prefill_bucket` and
    `audio_buckets` pad shapes so compiled stages see few of them; `check_every` is how often
    the decode loop syncs to look for end-of-text."""

    frontend: Callable
    encoder: Callable
    projector: Callable
    prefill: Callable
    decode: Callable
    kv_cache: str = "static"
    decode_attention: str = "sdpa"
    notes: list[str] = field(default_factory=list)
    labels: dict[str, str] = field(default_factory=dict)
    check_every: int = 8
    prefill_bucket: int = 1
    audio_buckets: bool = False

    @classmethod
    def eager(cls, model, kv_cache: str = "static", decode_attention: str = "sdpa") -> Stages:
        frontend = LogMelFrontend().to(model.decoder.head.weight.device)
        return cls(
            frontend=frontend,
            encoder=functools.partial(encode, model),
            projector=functools.partial(project, model),
            prefill=prefill_static,
            decode=decode_one_token_static,
            kv_cache=kv_cache,
            decode_attention=decode_attention,
        )


def prompt_for(audio_tokens: int, template: list[int], audio_token_id: int) -> torch.Tensor:
    """Expand the single audio placeholder of a tokenised prompt to the clip's token count."""
    at = template.index(audio_token_id)
    return torch.tensor(template[:at] + [audio_token_id] * audio_tokens + template[at + 1 :])


class Pipeline:
    """Drives the stages. Returns greedy tokens [B, max_new_tokens] per call."""

    def __init__(self, model, stages: Stages | None = None):
        self.model = model
        self.stages = stages or Stages.eager(model)
        self.device = model.decoder.head.weight.device

    def batch(self, waveforms: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        lengths = torch.tensor([len(w) for w in waveforms])
        width = int(lengths.max())
        if self.stages.audio_buckets:  # real lengths still mask every stage: results are unchanged
            width = bucket_seconds(width / SAMPLE_RATE) * SAMPLE_RATE
        padded = torch.zeros(len(waveforms), width)
        for row, wave in enumerate(waveforms):
            padded[row, : len(wave)] = wave
        return padded.to(self.device), lengths.to(self.device)

    @torch.no_grad()
    def __call__(
        self,
        waveforms: list[torch.Tensor],
        template: list[int],
        max_new_tokens: int,
        eos_id: int | None = None,
        timer: StageTimer | None = None,
    ) -> torch.Tensor:
        model, stages = self.model, self.stages
        if model.lora_mode == "live":  # every pipeline input carries audio
            set_lora_enabled(model, True)
        dtype = model.projector.query.dtype
        waves, lengths = self.batch(waveforms)
        with stage(timer, "frontend"):
            features, frames = stages.frontend(waves, lengths)
        with stage(timer, "encoder"):
            frame_mask = encoder_frame_mask(frames, features.shape[1])
            hidden = stages.encoder(features.to(dtype), frame_mask)
        with stage(timer, "projector"):
            audio = stages.projector(hidden)
        prompts = [
            prompt_for(model.config.audio_tokens(len(w)), template, model.config.audio_token_id)
            for w in waveforms
        ]
        return generate(
            model,
            prompts,
            audio,
            max_new_tokens,
            kv_cache=stages.kv_cache,
            eos_id=eos_id,
            check_every=stages.check_every,
            prefill_bucket=stages.prefill_bucket,
            decode_attention=stages.decode_attention,
            decode_step=stages.decode,
            prefill=stages.prefill,
            timer=timer,
        )
