"""The stages of Granite Speech as small tensor callables, and the pipeline that drives them.

audio -> frontend -> encoder -> projector -> prefill -> decode loop. Each stage takes and
returns tensors only, so a recipe can compile, capture or time it on its own without reaching
into the model. `Stages.eager(model)` is the baseline; a recipe (`gsopt.recipe.build.apply`)
builds optimised versions of the same functions, all at once: `Stages` is immutable.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from gsopt.audio.frontend import HOP_LENGTH, SAMPLE_RATE, LogMelFrontend
from gsopt.engine import beam, fms_decode, generate
from gsopt.engine.kv_cache import SDPA
from gsopt.engine.speculate import Speculation, SpeculationStats, Steps, speculative_generate
from gsopt.engine.timing import StageTimer, stage
from gsopt.model.encoder import encoder_frame_mask
from gsopt.model.family import SPEECH_LLM_STAGES
from gsopt.model.tokenizer import synthetic_tokenizer

STAGES = SPEECH_LLM_STAGES


def block_seconds(model) -> float:
    """Seconds of audio in one attention block of the first encoder layer (an encoder frame
    is 2 mel frames, 20 ms: 200 frames = 4 s published; Granite Speech 5.0's 128 = 2.56 s)."""
    return model.config.encoder_context_size * 2 * HOP_LENGTH / SAMPLE_RATE


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


@dataclass(frozen=True)
class CacheKind:
    """A decoder path. `fixed_shapes`: its steps keep their shapes, so they can be compiled
    or captured, and speculation can verify on it. `generate(model, prompts, audio,
    max_new_tokens, stages, *, stop_at_eos, timer)` decodes with the stages' steps."""

    name: str
    fixed_shapes: bool
    generate: Callable[..., torch.Tensor]
    description: str


def _fms_generate(model, prompts, audio, max_new_tokens, stages: Stages, **common):
    return fms_decode.generate(
        model, prompts, audio, max_new_tokens, check_every=stages.plan.check_every, **common
    )


def _static_generate(model, prompts, audio, max_new_tokens, stages: Stages, **common):
    plan = stages.plan
    if plan.num_beams > 1:
        return beam.beam_search(
            model,
            prompts,
            audio,
            max_new_tokens,
            plan.num_beams,
            check_every=plan.check_every,
            prefill_bucket=plan.prefill_bucket,
            max_seq_len=plan.max_seq_len,
            prefill_step=stages.prefill,
            step=stages.beam,
            **common,
        )
    return generate.generate(
        model,
        prompts,
        audio,
        max_new_tokens,
        check_every=plan.check_every,
        prefill_bucket=plan.prefill_bucket,
        max_seq_len=plan.max_seq_len,
        prefill_step=stages.prefill,
        decode_step=stages.decode,
        fixed_span=plan.fixed_span,
        **common,
    )


KV_CACHES: dict[str, CacheKind] = {
    "dynamic": CacheKind(
        "dynamic", False, _fms_generate, "FMS as shipped: the cache grows every step"
    ),
    "static": CacheKind("static", True, _static_generate, "preallocated, written in place"),
}


@dataclass(frozen=True)
class DecodePlan:
    """How the pipeline feeds the stages: which cache the decoder keeps; `fixed_span` that
    the decode step needs fixed shapes (it is captured); `prefill_bucket` and
    `audio_buckets` pad shapes so compiled stages see few of them; `check_every` how often
    the decode loop syncs to look for end-of-text; `max_seq_len` sizes the static cache;
    `speculation` the recipe's [speculate] table, if any; `num_beams` > 1 decodes by beam
    search (`gsopt.engine.beam`), and is relaxed speculation's fallback."""

    cache: CacheKind = KV_CACHES["static"]
    fixed_span: bool = False
    prefill_bucket: int = 1
    audio_buckets: bool = False
    check_every: int = 8
    max_seq_len: int | None = None
    speculation: Speculation | None = None
    num_beams: int = 1


@dataclass(frozen=True)
class StageReport:
    """What a report says of the stages: each one's label (what runs), the stages the recipe
    changed against the baseline, and every fallback taken on this machine."""

    labels: Mapping[str, str] = field(default_factory=dict)
    changed: frozenset[str] = frozenset()
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Stages:
    """One callable per stage, `verify` (the decode step k tokens wide) and `beam` (the beam
    search step); the plan that feeds them; what the report says. With speculation: `ctc`,
    the encoder draft's stage, or `draft`, a draft model with its own stages."""

    frontend: Callable
    encoder: Callable
    projector: Callable
    prefill: Callable
    decode: Callable
    verify: Callable
    beam: Callable
    plan: DecodePlan = DecodePlan()
    report: StageReport = StageReport()
    ctc: Callable | None = None
    draft: tuple[Any, Stages] | None = None

    @property
    def steps(self) -> Steps:
        """The decoder steps, as speculation calls them."""
        return Steps(self.prefill, self.decode, self.verify, self.plan.fixed_span, self.beam)

    @classmethod
    def eager(
        cls, model, plan: DecodePlan = DecodePlan(), attn_name: str = SDPA, **fields: Any
    ) -> Stages:
        frontend = LogMelFrontend().to(model.decoder.head.weight.device)
        return cls(
            frontend=frontend,
            encoder=model.encode,
            projector=model.projector,
            prefill=functools.partial(generate.prefill, attn_name=attn_name),
            decode=functools.partial(generate.decode_one_token, attn_name=attn_name),
            verify=functools.partial(generate.verify, attn_name=attn_name),
            beam=functools.partial(beam.beam_step, attn_name=attn_name),
            plan=plan,
            **fields,
        )


def baseline_stages(model) -> Stages:
    """The baseline every recipe is checked and timed against: eager stages on FMS's own
    growing cache."""
    return Stages.eager(model, DecodePlan(cache=KV_CACHES["dynamic"]))


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
        confidences: list[float] | None = None,
    ) -> torch.Tensor:
        """`stop_at_eos=False` decodes exactly max_new_tokens (benchmarks); `record`, when
        given, receives each stage's first arguments (what `gsopt explain` compiles);
        `drafts`, each row's draft tokens in place of the CTC draft, and `confidences` their
        CTC confidences (a speculative recipe's oracle drafts, for benchmarks; without them a
        relaxed recipe judges oracle drafts by the verifying forward alone)."""
        model = self.model
        stages = self.stages if record is None else _recording(self.stages, record)
        audio, hidden, posteriors, frame_mask, frames = self.embed_audio(waveforms, stages, timer)
        prompts = self.prompts(waveforms, template)
        if stages.plan.speculation is not None:
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
        return stages.plan.cache.generate(
            model, prompts, audio, max_new_tokens, stages, stop_at_eos=stop_at_eos, timer=timer
        )

    def embed_audio(self, waveforms: list[torch.Tensor], stages: Stages, timer=None):
        """frontend -> encoder -> projector: the audio rows, and what CTC drafts read."""
        self.model.use_audio_lora(True)  # every pipeline input carries audio
        dtype = self.model.projector.query.dtype
        block = block_seconds(self.model) if stages.plan.audio_buckets else None
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
        if self.tokenizer is None:
            self.tokenizer = synthetic_tokenizer(self.model.config)
        tokens = self.stages.plan.speculation.kind.tokens(labels, frames, self.tokenizer)
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
        stages, spec = self.stages, self.stages.plan.speculation
        draft_model = None
        if drafts is None:  # a draft model proposes; it reads the audio with its own stages
            helper = Pipeline(*stages.draft, tokenizer=self.tokenizer)
            draft_audio = helper.embed_audio(waveforms, helper.stages)[0]
            draft_model = (
                helper.model,
                helper.stages.steps,
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
            steps=stages.steps,
            fallback_beams=stages.plan.num_beams,
            stop_at_eos=stop_at_eos,
            prefill_bucket=stages.plan.prefill_bucket,
            max_seq_len=stages.plan.max_seq_len,
            stats=self.speculation_stats,
            timer=timer,
        )
