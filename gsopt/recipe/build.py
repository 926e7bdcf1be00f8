"""From a loaded model and a recipe to a pipeline: the one road every command takes.

`apply(model, recipe)` runs the recipe's model transforms (`gsopt.recipe.transforms`) and
builds the model's stages, wrapped as each stage's settings say, with the decode plan and
what the report says, all at once. `build_pipeline` does the same on a copy when the recipe
would change a model the caller keeps using, and puts the stages in the pipeline the
model's family runs (`PIPELINES`). Settings a machine cannot run fall back to their nearest
portable form, and every fallback is written into the report's notes.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from gsopt.engine import attention
from gsopt.engine.ctc_pipeline import CTCPipeline, CTCStages
from gsopt.engine.pipeline import KV_CACHES, STAGES, DecodePlan, Pipeline, StageReport, Stages
from gsopt.engine.quantize import fit_group_size
from gsopt.errors import GsoptError
from gsopt.model.family import family_of
from gsopt.model.loader import load_draft_model
from gsopt.recipe.compile import GEMV_STAGES, describe, portable, wrap
from gsopt.recipe.settings import MACHINE_TABLES, Recipe, StageRecipe, load_recipe
from gsopt.recipe.transforms import changes_model, model_dtype, model_transforms
from gsopt.runtime import dtype_name, has_bf16_dot


def _resolved(recipe: Recipe, device: torch.device, notes: list[str]):
    """Each stage's settings as this device runs them, and the attention implementations
    that run (the encoder's only when the recipe names one)."""
    settings = {s: portable(s, getattr(recipe, s), device, notes) for s in STAGES}
    impls = {
        stage: attention.resolve(stage, settings[stage].attention, device, notes)
        for stage in attention.STAGES
    }
    if recipe.encoder.attention == attention.AUTO:
        impls["encoder"] = None  # the model keeps its own
    if recipe.linear == "onednn" and device.type == "cuda":
        notes.append("linear = 'onednn' is a CPU kernel; CUDA kept its own linears")
    if recipe.dtype == "bfloat16" and device.type == "cpu" and not has_bf16_dot():
        notes.append(
            "dtype bfloat16: this CPU has no BF16 dot products (avx512_bf16, amx_bf16), "
            "so its GEMMs convert to fp32 and gain nothing; only memory-bound steps do"
        )
    q = recipe.quantize
    if q is not None and (q.weights, q.activations, device.type) == ("int4", "int8", "cpu"):
        from gsopt.kernels.cpu_kernels import unavailable

        if why := unavailable():
            notes.append(
                f"activations = 'int8' with int4 weights: {why}, so the products keep bf16 "
                "activations (torchao's int4 kernel, a prefill's on the weight unpacked to bf16)"
            )
    return settings, impls


def _transform(model, recipe: Recipe, encoder_impl, changed: set[str], notes: list[str]) -> None:
    if recipe.quantize is not None:
        fitted, note = fit_group_size(model, recipe.quantize)
        recipe = dataclasses.replace(recipe, quantize=fitted)
        notes += [note] if note else []
    for transform in model_transforms(recipe, model, encoder_impl):
        if transform.changes(model):
            changed.update(transform.stages)
        transform(model)


def _speech_llm_stages(model, recipe: Recipe, device, notes: list[str], draft_model) -> Stages:
    settings, impls = _resolved(recipe, device, notes)
    model_stages = family_of(model).stages
    changed = {s for s in model_stages if settings[s].backend != "eager" or settings[s].cudagraph}
    if impls["decode"].name != "sdpa":
        changed.add("decode")
    cache = KV_CACHES[recipe.kv_cache]
    if cache.fixed_shapes:
        changed.update(("prefill", "decode"))
    if recipe.audio_buckets:
        changed.update(("frontend", "encoder", "projector"))
    _transform(model, recipe, impls["encoder"], changed, notes)
    plan = DecodePlan(
        cache=cache,
        # A captured step replays fixed shapes: it attends over the whole cache, masked.
        fixed_span=settings["decode"].captured,
        # Padding the prompt only helps a compiled prefill (fewer shapes); eager would pay.
        prefill_bucket=recipe.prefill_bucket if settings["prefill"].backend != "eager" else 1,
        audio_buckets=recipe.audio_buckets,
        check_every=recipe.check_every,
        max_seq_len=recipe.max_seq_len,
        speculation=recipe.speculate,
        num_beams=recipe.num_beams,
    )
    eager = Stages.eager(model, plan, attn_name=impls["decode"].load())
    cpu = device.type != "cuda"
    wrapped = {
        stage: wrap(getattr(eager, stage), settings[stage], stage in GEMV_STAGES and cpu)
        for stage in model_stages
    }
    # The decode step k tokens wide, and the beam search step: compiled as decode is.
    wrapped["verify"] = wrap(eager.verify, settings["decode"], cpu)
    wrapped["beam"] = wrap(eager.beam, settings["decode"], cpu)
    draft = {}
    if recipe.speculate is not None:
        changed.update(("prefill", "decode"))
        draft = _speculation(model, recipe, draft_model)
    labels = {
        s: describe(settings[s], impls[s].name if impls.get(s) else None) for s in model_stages
    }
    report = StageReport(labels, frozenset(changed), tuple(notes))
    return dataclasses.replace(eager, **wrapped, report=report, **draft)


def _speculation(model, recipe: Recipe, draft_model) -> dict:
    """The encoder draft's `ctc` stage, or the draft model with its own stages (the recipe's
    compile settings, without speculation)."""
    spec = recipe.speculate
    kind = spec.kind
    if kind.from_encoder:
        reason = kind.unsupported(model)
        if reason:
            raise GsoptError(f"recipe {recipe.name}: draft {kind.name!r} {reason}")
        return {"ctc": functools.partial(kind.labels, model.encoder)}
    if draft_model is None and not spec.draft_model:
        raise GsoptError(
            f"recipe {recipe.name} drafts with a model: pass --draft-model DIR|VARIANT, or set "
            "draft_model in its [speculate] table"
        )
    if draft_model is None:
        weight = model.decoder.head.weight
        draft_model = load_draft_model(
            spec.draft_model, model.config, device=weight.device, dtype=weight.dtype
        )
    plain = dataclasses.replace(recipe, speculate=None, devices={})
    return {"draft": (draft_model, apply(draft_model, plain))}


def _ctc_stages(model, recipe: Recipe, device, notes: list[str], draft_model) -> CTCStages:
    """An encoder-only CTC model: the frontend's and encoder's settings apply; a note for
    every setting it has no stage or decoder for."""
    name = "Granite Speech 5.0 (CTC)"
    model_stages = family_of(model).stages
    default = StageRecipe()
    for stage in STAGES:
        unplain = dataclasses.replace(getattr(recipe, stage), attention=attention.AUTO)
        if stage not in model_stages and unplain != default:
            notes.append(f"{stage}: {name} has no {stage} stage; ignored")
    for key, ignored in (
        ("kv_cache", KV_CACHES[recipe.kv_cache].fixed_shapes),
        ("lora", recipe.lora == "merged"),
        ("speculate", recipe.speculate is not None),
        ("num_beams", recipe.num_beams > 1),
        ("quantize", recipe.quantize is not None and "encoder" not in recipe.quantize.stages),
    ):
        if ignored:
            notes.append(f"{key}: {name} has no decoder; ignored")
    settings, impls = _resolved(recipe, device, notes)
    changed = {s for s in model_stages if settings[s].backend != "eager"}
    if recipe.audio_buckets:
        changed.update(model_stages)
    _transform(model, recipe, impls["encoder"], changed, notes)
    eager = CTCStages.eager(model)
    labels = {s: describe(settings[s]) for s in model_stages}
    return CTCStages(
        **{s: wrap(getattr(eager, s), settings[s]) for s in model_stages},
        plan=DecodePlan(audio_buckets=recipe.audio_buckets),
        report=StageReport(labels, frozenset(changed & set(model_stages)), tuple(notes)),
    )


@dataclass(frozen=True)
class PipelineKind:
    """What a model family runs: its pipeline class and the builder of its stages."""

    pipeline: type
    build: Callable


# Model family (`gsopt.model.family`) -> what runs it.
PIPELINES = {
    "speech-llm": PipelineKind(Pipeline, _speech_llm_stages),
    "ctc": PipelineKind(CTCPipeline, _ctc_stages),
}


MACHINE_KIND_NOTES = {
    "cpu-bf16": "this CPU has BF16 dot products",
    "cpu-bf16-gemm": "this CPU's bf16 GEMMs outrun its fp32 ones",
}


def apply(model: torch.nn.Module, recipe: Recipe, draft_model=None) -> Stages | CTCStages:
    """Transform `model` as the recipe says (in place) and return its stages. A recipe that
    drafts with a model takes it as `draft_model` (`gsopt.model.loader.load_draft_model`),
    unless its [speculate] table names one."""
    device = next(model.parameters()).device
    runs = recipe.for_device(device.type)
    notes = []
    table = next((t for t in MACHINE_TABLES if runs is recipe.devices.get(t)), None)
    has = dtype_name(model_dtype(model))
    if table is not None and runs.dtype is not None and runs.dtype != has:
        kind = MACHINE_KIND_NOTES[table]
        audio = runs.audio_dtype or runs.dtype
        where = "" if audio == runs.dtype else f", the encoder and projector {audio}"
        notes.append(
            f"{recipe.name}: {kind}, so its [{table}] settings run (dtype "
            f"{runs.dtype}{where}, not {has}: lossy); for {has} pick a recipe without them, "
            "e.g. compile-decoder"
        )
    return PIPELINES[family_of(model).name].build(model, runs, device, notes, draft_model)


def build_pipeline(
    model: torch.nn.Module,
    recipe: Recipe | str,
    *,
    draft_model=None,
    tokenizer=None,
    copy_if_changed: bool = True,
):
    """The pipeline that runs `recipe` (a Recipe, a built-in name or a .toml path) on
    `model`: the family's pipeline class around the recipe's stages. With
    `copy_if_changed` a recipe that would change the model (dtype, merged LoRA, kernels,
    quantization) works on a copy, so the caller's model stays as it was (one load serves
    a baseline and several recipes); without it, the model is changed in place."""
    if isinstance(recipe, str):
        recipe = load_recipe(recipe)
    if copy_if_changed and changes_model(model, recipe):
        model = copy.deepcopy(model)
    kind = PIPELINES[family_of(model).name]
    return kind.pipeline(model, apply(model, recipe, draft_model), tokenizer)
