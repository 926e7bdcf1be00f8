"""The stages of Granite Speech as small tensor callables, and the pipeline that drives them.

audio -> frontend -> encoder -> projector -> prefill -> decode loop. Each stage takes and
returns tensors only, so a recipe can compile, capture or time it on its own without reaching
into the model. `Stages.eager(model)` is the baseline; `gsopt.recipe.build.apply` swaps in
optimised versions of the same functions.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from gsopt.audio.frontend import HOP_LENGTH, SAMPLE_RATE, LogMelFrontend
from gsopt.engine import drafts as drafts_
from gsopt.engine import fms_decode, generate
from gsopt.engine.kv_cache import SDPA
from gsopt.engine.speculate import SpeculationStats, Steps, speculative_generate
from gsopt.engine.timing import StageTimer, stage
from gsopt.model.encoder import encoder_frame_mask
from gsopt.model.tokenizer import synthetic_tokenizer

if TYPE_CHECKING:
    from gsopt.recipe.build import Speculation

STAGES = ("frontend", "encoder", "projector", "prefill", "decode")


def block_seconds(model) -> float:
    """Seconds of audio in one attention block of the first encoder layer (an encoder frame
    is 2 mel frames, 20 ms: 200 frames = 4 s published; Granite Speech 5.0's 128 = 2.56 s)."""
    config = model.config
    context = (
        config.context_size if hasattr(config, "context_size") else config.encoder.context_size
    )
    return context * 2 * HOP_LENGTH / SAMPLE_RATE


def pad_waveforms(
    waveforms: list[torch.Tensor], block: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clips zero-padded into one batch [B, S] and their lengths; with `block` (seconds), S
    rounded up to whole attention blocks (real lengths still mask every stage)."""
    lengths = torch.tensor([len(w) for w in waveforms])
    width = int(lengths.max())
    if block is not None:
        width = round(bucket_seconds(width / SAMPLE_RATE, block) * SAMPLE_RATE)
    padded = torch.zeros(len(waveforms), width)
    for row, wave in enumerate(waveforms):
        padded[row, : len(wave)] = wave
    return padded, lengths


def bucket_seconds(seconds: float, block: float) -> float:
    """Audio padded up to whole attention blocks: the encoder pads each clip to a block
    boundary anyway, so compiled audio stages see one shape per block count at no extra
    attention cost."""
    return math.ceil(seconds / block) * block


@dataclass
class Stages:
    """One callable per stage (and `verify`, the decode step k tokens wide), and how the
    pipeline feeds them: `kv_cache` says which decoder path runs; `fixed_span` that the
    decode step needs fixed shapes (it is captured); `prefill_bucket` and `audio_buckets`
    pad shapes so compiled stages see few of them; `check_every` is how often the decode
    loop syncs to look for end-of-text; `max_seq_len` sizes the static cache."""

    frontend: Callable
    encoder: Callable
    projector: Callable
    prefill: Callable
    decode: Callable
    verify: Callable
    kv_cache: str = "static"
    fixed_span: bool = False
    notes: list[str] = field(default_factory=list)
    labels: dict[str, str] = field(default_factory=dict)
    changed: set[str] = field(default_factory=set)  # stages the recipe changed vs the baseline
    check_every: int = 8
    prefill_bucket: int = 1
    audio_buckets: bool = False
    max_seq_len: int | None = None
    # Speculative decoding (a recipe's [speculate] table): the CTC draft stage, and a draft
    # model's own (model, Stages) when it drafts with one.
    speculation: Speculation | None = None
    ctc: Callable | None = None
    draft: tuple | None = None

    @classmethod
    def eager(cls, model, kv_cache: str = "static", attn_name: str = SDPA) -> Stages:
        frontend = LogMelFrontend().to(model.decoder.head.weight.device)
        return cls(
            frontend=frontend,
            encoder=model.encode,
            projector=model.projector,
            prefill=functools.partial(generate.prefill, attn_name=attn_name),
            decode=functools.partial(generate.decode_one_token, attn_name=attn_name),
            verify=functools.partial(generate.verify, attn_name=attn_name),
            kv_cache=kv_cache,
        )


def prompt_for(audio_tokens: int, template: list[int], audio_token_id: int) -> torch.Tensor:
    """Expand the single audio placeholder of a tokenised prompt to the clip's token count."""
    at = template.index(audio_token_id)
    return torch.tensor(template[:at] + [audio_token_id] * audio_tokens + template[at + 1 :])


def _recording(stages: Stages, record: dict[str, tuple]) -> Stages:
    """The same stages, each keeping the arguments of its first call in `record`."""

    def keep(name: str, fn: Callable) -> Callable:
        def call(*args):
            record.setdefault(name, args)
            return fn(*args)

        return call

    return dataclasses.replace(stages, **{s: keep(s, getattr(stages, s)) for s in STAGES})


class Pipeline:
    """Drives the stages. Returns greedy tokens [B, <= max_new_tokens] per call."""

    def __init__(self, model, stages: Stages | None = None, tokenizer=None):
        """`tokenizer` turns grapheme CTC drafts into tokens (default: the variant's
        synthetic one)."""
        self.model = model
        self.stages = stages or Stages.eager(model)
        self.device = model.decoder.head.weight.device
        self.tokenizer = tokenizer
        self.speculation_stats = SpeculationStats()

    @torch.no_grad()
    def __call__(
        self,
        waveforms: list[torch.Tensor],
        template: list[int],
        max_new_tokens: int,
        *,
        stop_at_eos: bool = False,
        timer: StageTimer | None = None,
        record: dict[str, tuple] | None = None,
        drafts: list[list[int]] | None = None,
    ) -> torch.Tensor:
        """`stop_at_eos=False` decodes exactly max_new_tokens (benchmarks); `record`, when
        given, receives each stage's first arguments (what `gsopt explain` compiles);
        `drafts`, each row's draft tokens in place of the CTC draft (a speculative recipe's
        oracle drafts, for benchmarks)."""
        confidences = None
        model = self.model
        stages = self.stages if record is None else _recording(self.stages, record)
        audio, hidden, posteriors, frame_mask, frames = self.embed_audio(waveforms, stages, timer)
        prompts = self.prompts(waveforms, template)
        common = dict(stop_at_eos=stop_at_eos, check_every=stages.check_every, timer=timer)
        if stages.kv_cache == "dynamic":
            return fms_decode.generate(model, prompts, audio, max_new_tokens, **common)
        if stages.speculation is not None:
            if drafts is None and stages.draft is None:
                with stage(timer, "ctc"):
                    drafts, confidences = self.ctc_drafts(hidden, posteriors, frame_mask, frames)
            return self.speculate(
                waveforms,
                template,
                prompts,
                audio,
                max_new_tokens,
                drafts,
                confidences,
                stop_at_eos,
                timer,
            )
        return generate.generate(
            model,
            prompts,
            audio,
            max_new_tokens,
            prefill_bucket=stages.prefill_bucket,
            max_seq_len=stages.max_seq_len,
            prefill_step=stages.prefill,
            decode_step=stages.decode,
            fixed_span=stages.fixed_span,
            **common,
        )

    def embed_audio(self, waveforms: list[torch.Tensor], stages: Stages, timer=None):
        """frontend -> encoder -> projector: the audio rows, and what CTC drafts read."""
        self.model.use_audio_lora(True)  # every pipeline input carries audio
        dtype = self.model.projector.query.dtype
        block = block_seconds(self.model) if stages.audio_buckets else None
        waves, lengths = (t.to(self.device) for t in pad_waveforms(waveforms, block))
        with stage(timer, "frontend"):
            features, frames = stages.frontend(waves, lengths)
        with stage(timer, "encoder"):
            frame_mask = encoder_frame_mask(frames, features.shape[1])
            hidden, posteriors = stages.encoder(features.to(dtype), frame_mask)
        with stage(timer, "projector"):
            audio = stages.projector(hidden)
        return audio, hidden, posteriors, frame_mask, frames

    def prompts(self, waveforms: list[torch.Tensor], template: list[int]) -> list[torch.Tensor]:
        config = self.model.config
        return [
            prompt_for(config.audio_tokens(len(w)), template, config.audio_token_id)
            for w in waveforms
        ]

    def ctc_drafts(self, hidden, posteriors, frame_mask, frames):
        """Each row's CTC draft tokens and confidence (the `ctc` stage, then the host's
        collapsing and tokenizing); an empty draft has confidence inf."""
        labels, confidence = self.stages.ctc(hidden, posteriors, frame_mask)
        if self.stages.speculation.draft == "ctc-bpe":
            tokens = drafts_.bpe_tokens(labels, frames)
        else:
            if self.tokenizer is None:
                self.tokenizer = synthetic_tokenizer(self.model.config)
            tokens = drafts_.grapheme_tokens(labels, frames, self.tokenizer)
        confidences = [
            c if t else math.inf for c, t in zip(confidence.tolist(), tokens, strict=True)
        ]
        return tokens, confidences

    def speculate(
        self,
        waveforms,
        template,
        prompts,
        audio,
        max_new_tokens,
        drafts,
        confidences,
        stop_at_eos,
        timer,
    ) -> torch.Tensor:
        stages, spec = self.stages, self.stages.speculation
        draft_model = None
        if drafts is None:  # a draft model proposes; it reads the audio with its own stages
            helper = Pipeline(*stages.draft, tokenizer=self.tokenizer)
            draft_audio = helper.embed_audio(waveforms, helper.stages)[0]
            draft_model = (
                helper.model,
                Steps(
                    helper.stages.prefill,
                    helper.stages.decode,
                    helper.stages.verify,
                    helper.stages.fixed_span,
                ),
                helper.prompts(waveforms, template),
                draft_audio,
            )
        return speculative_generate(
            self.model,
            prompts,
            audio,
            max_new_tokens,
            drafts=drafts,
            draft_model=draft_model,
            k=spec.k,
            mode=spec.mode,
            confidences=confidences or [math.inf] * len(prompts),
            ctc_threshold=spec.ctc_threshold,
            confidence_threshold=spec.confidence_threshold,
            steps=Steps(stages.prefill, stages.decode, stages.verify, stages.fixed_span),
            stop_at_eos=stop_at_eos,
            prefill_bucket=stages.prefill_bucket,
            max_seq_len=stages.max_seq_len,
            stats=self.speculation_stats,
            timer=timer,
        )
