"""Recipes: declarative settings, applied to a loaded model in two parts (torchao-style).

A recipe is data: a TOML file parsed into frozen dataclasses, unknown keys and values refused
with the allowed ones listed, numbers checked against their ranges. `apply(model, recipe)`:
1. runs the recipe's model transforms in order (`model_transforms`: dtype cast, LoRA merge,
   encoder attention), each a small object that changes the model in place and says whether
   it would change a given model (so `changes_model` follows from the list);
2. wraps each stage as its compile spec says (eager, compiled, captured) and returns the
   `Stages` to run.
CUDA-only settings fall back to their nearest portable form on a machine without CUDA, and
every fallback is written into `Stages.notes`.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Protocol

import torch

from gsopt.engine import cpu_gemv, drafts
from gsopt.engine.cpu_linear import has_plain_linears, pack_linears_
from gsopt.engine.kv_cache import ATTENTION_OPS
from gsopt.engine.pipeline import STAGES, Stages
from gsopt.engine.quantize import (
    GROUP_SIZES,
    QUANTIZABLE_STAGES,
    WEIGHTS,
    Quantization,
    quantize_model,
)
from gsopt.engine.speculate import MODES as MODES_SPECULATION
from gsopt.errors import GsoptError
from gsopt.model.encoder import BLOCK_ATTENTION, ShawBlockAttention, set_block_attention
from gsopt.model.lora import merge_audio_lora_
from gsopt.runtime import DTYPES

BACKENDS = ("eager", "compile")
MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# `auto`: sdpa for the encoder; for the decode step the Triton kernel on CUDA (it reads only
# each row's valid length, with fixed shapes), sdpa elsewhere.
ATTENTIONS = {"encoder": ("auto", "sdpa", "math", "triton"), "decode": ("auto", "sdpa", "triton")}
KV_CACHES = ("dynamic", "static")
LORAS = ("live", "merged")
# The kernel behind every plain nn.Linear on a CPU: aten's (MKL) or oneDNN with prepacked
# weights (`gsopt.engine.cpu_linear`).
LINEARS = ("aten", "onednn")
# Which stages take which stage-specific knob.
STAGE_KNOBS = {"attention": ("encoder", "decode"), "cudagraph": ("decode",)}
# Device types a recipe can hold its own settings for.
DEVICE_TYPES = ("cpu", "cuda")
# Smallest allowed value of each numeric setting (and the largest, where there is one).
MINIMUM = {
    "check_every": 1,
    "prefill_bucket": 1,
    "max_seq_len": 1,
    "k": 1,
    "ctc_threshold": 0.0,
    "confidence_threshold": 0.0,
}
MAXIMUM = {"confidence_threshold": 1.0}


@dataclass(frozen=True)
class StageRecipe:
    backend: str = "eager"
    mode: str = "default"
    fullgraph: bool = True
    dynamic: bool | None = None
    cudagraph: bool = False
    attention: str = "auto"

    @property
    def captured(self) -> bool:
        """Whether the step runs as a CUDA graph (ours, or torch.compile's own)."""
        return self.cudagraph or (
            self.backend == "compile" and self.mode in ("reduce-overhead", "max-autotune")
        )


DRAFTS = ("ctc", "ctc-bpe", "model")


@dataclass(frozen=True)
class Speculation:
    """The `[speculate]` table. `draft`: `ctc` (the grapheme CTC head, any checkpoint),
    `ctc-bpe` (granite-speech-4.1's BPE head), `model` (the draft model a command's
    --draft-model names) or a checkpoint folder; `k`: tokens per verification step; `mode`:
    `exact` (lossless) or `relaxed` (IBM's criterion, lossy)."""

    draft: str = "ctc"
    k: int = 8
    mode: str = "exact"
    ctc_threshold: float = 0.5
    confidence_threshold: float = 0.01


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str = ""
    kv_cache: str = "dynamic"
    lora: str = "live"
    dtype: str | None = None
    linear: str = "aten"
    prefill_bucket: int = 64
    audio_buckets: bool = False
    check_every: int = 8
    max_seq_len: int | None = None
    frontend: StageRecipe = field(default_factory=StageRecipe)
    encoder: StageRecipe = field(default_factory=StageRecipe)
    projector: StageRecipe = field(default_factory=StageRecipe)
    prefill: StageRecipe = field(default_factory=StageRecipe)
    decode: StageRecipe = field(default_factory=StageRecipe)
    speculate: Speculation | None = None
    quantize: Quantization | None = None
    # The whole recipe as it runs on each device type that has a [cpu] or [cuda] table.
    devices: dict[str, Recipe] = field(default_factory=dict, hash=False)

    def for_device(self, device_type: str) -> Recipe:
        """What runs on `device_type`: the recipe with that device's table applied."""
        return self.devices.get(device_type, self)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --- model transforms ------------------------------------------------------------------------


class Transform(Protocol):
    stages: tuple[str, ...]  # the stages whose computation it changes

    def changes(self, model: torch.nn.Module) -> bool:
        """Whether applying this would change `model` (weights or modules): then a caller
        that still needs the original must give `apply` a copy."""

    def __call__(self, model: torch.nn.Module) -> None: ...


@dataclass(frozen=True)
class CastDtype:
    dtype: str
    stages = STAGES

    def changes(self, model) -> bool:
        return _dtype(model) != DTYPES[self.dtype]

    def __call__(self, model) -> None:
        model.to(DTYPES[self.dtype])


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
    name: str
    stages = ("encoder",)

    def impl(self):
        if self.name == "triton":
            from gsopt.kernels.conformer_attention import conformer_attention

            return conformer_attention
        return BLOCK_ATTENTION[self.name]

    def changes(self, model) -> bool:
        impl = self.impl()
        return any(
            m.block_attention is not impl
            for m in model.encoder.modules()
            if isinstance(m, ShawBlockAttention)
        )

    def __call__(self, model) -> None:
        set_block_attention(model.encoder, self.impl())


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
        if hasattr(model, "decoder"):
            pack_linears_(model.decoder, self.keep_plain_decoder)
        pack_linears_(model)


@dataclass(frozen=True)
class Quantize:
    """torchao weight-only quantization of the stages the [quantize] table names."""

    settings: Quantization

    @property
    def stages(self) -> tuple[str, ...]:
        touched = {"decoder": ("prefill", "decode"), "encoder": ("encoder",)}
        return tuple(s for q in self.settings.stages for s in touched.get(q, (q,)))

    def changes(self, model) -> bool:
        return True

    def __call__(self, model) -> None:
        quantize_model(model, self.settings)


def model_transforms(recipe: Recipe, device: torch.device | None = None) -> list[Transform]:
    """The recipe's changes to the model, in the order they run. A new kind of transform is
    a class above and one line here."""
    transforms: list[Transform] = []
    if recipe.dtype is not None:
        transforms.append(CastDtype(recipe.dtype))
    if recipe.lora == "merged":
        transforms.append(MergeLoRA())
    if recipe.quantize is not None:
        transforms.append(Quantize(recipe.quantize))
    if recipe.linear == "onednn" and (device is None or device.type == "cpu"):
        transforms.append(PackLinears(keep_plain_decoder=recipe.decode.backend == "compile"))
    encoder = recipe.encoder.attention
    if encoder != "auto":
        if encoder == "triton" and not _triton_runs(device):
            encoder = "sdpa"
        transforms.append(EncoderAttention(encoder))
    return transforms


def lossy_reasons(recipe: Recipe, model_dtype: torch.dtype, device_type: str) -> list[str]:
    """Why a recipe's tokens may differ from eager's (empty: it is lossless, and `apply`
    demands identical greedy tokens)."""
    recipe = recipe.for_device(device_type)
    reasons = []
    if recipe.dtype is not None and DTYPES[recipe.dtype] != model_dtype:
        reasons.append(f"casts the weights to {recipe.dtype}")
    if recipe.speculate is not None and recipe.speculate.mode == "relaxed":
        reasons.append("relaxed speculation keeps CTC drafts the decoder did not confirm")
    if recipe.quantize is not None:
        q = recipe.quantize
        computing = f" (computing in {q.compute_dtype})" if q.compute_dtype else ""
        reasons.append(f"quantizes the {', '.join(q.stages)} weights to {q.weights}{computing}")
    return reasons


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _dtype(model: torch.nn.Module) -> torch.dtype:
    """The model's floating-point dtype (its first floating parameter's)."""
    return next(p.dtype for p in model.parameters() if p.is_floating_point())


def changes_model(model: torch.nn.Module, recipe: Recipe) -> bool:
    device = _device(model)
    recipe = recipe.for_device(device.type)
    return any(t.changes(model) for t in model_transforms(recipe, device))


# --- parsing ---------------------------------------------------------------------------------

_ALLOWED_VALUES = {
    "backend": BACKENDS,
    "mode": MODES,
    "kv_cache": KV_CACHES,
    "lora": LORAS,
    "dtype": tuple(DTYPES),
    "linear": LINEARS,
}


def _check_value(where: str, key: str, value: Any, default: Any, allowed=None) -> None:
    allowed = allowed or _ALLOWED_VALUES.get(key)
    if allowed is not None:
        if value not in allowed:
            raise GsoptError(f"{where}: {key} = {value!r} is not one of {', '.join(allowed)}")
        return
    expected = bool if key == "dynamic" else int if key in MINIMUM else type(default)
    if isinstance(default, float):
        expected = float
    numeric = (int, float) if expected is float else (expected,)
    if not isinstance(value, numeric) or (expected is not bool and isinstance(value, bool)):
        raise GsoptError(f"{where}: {key} = {value!r} must be a {expected.__name__}")
    if key in MINIMUM and value < MINIMUM[key]:
        raise GsoptError(f"{where}: {key} = {value} must be at least {MINIMUM[key]}")
    if key in MAXIMUM and value > MAXIMUM[key]:
        raise GsoptError(f"{where}: {key} = {value} must be at most {MAXIMUM[key]}")


def _quantization(where: str, table: Any) -> Quantization:
    if not isinstance(table, dict):
        raise GsoptError(f"{where}: [quantize] must be a table")
    defaults = Quantization()
    allowed_values = {
        "weights": WEIGHTS,
        "group_size": GROUP_SIZES,
        "compute_dtype": tuple(DTYPES),
    }
    for key, value in table.items():
        if key not in vars(defaults):
            allowed = ", ".join(vars(defaults))
            raise GsoptError(f"{where}: unknown key {key!r} in [quantize]; allowed: {allowed}")
        if key == "stages":
            if (
                not isinstance(value, list)
                or not value
                or any(v not in QUANTIZABLE_STAGES for v in value)
            ):
                raise GsoptError(
                    f"{where} [quantize]: stages = {value!r} must be a list of "
                    f"{', '.join(QUANTIZABLE_STAGES)}"
                )
            continue
        _check_value(
            f"{where} [quantize]", key, value, getattr(defaults, key), allowed_values.get(key)
        )
    if "stages" in table:
        table = {**table, "stages": tuple(table["stages"])}
    return Quantization(**table)


def _speculation(where: str, table: Any) -> Speculation:
    if not isinstance(table, dict):
        raise GsoptError(f"{where}: [speculate] must be a table")
    defaults = Speculation()
    for key, value in table.items():
        if key not in vars(defaults):
            allowed = ", ".join(vars(defaults))
            raise GsoptError(f"{where}: unknown key {key!r} in [speculate]; allowed: {allowed}")
        allowed_values = {"mode": MODES_SPECULATION}.get(key)
        _check_value(f"{where} [speculate]", key, value, getattr(defaults, key), allowed_values)
    return Speculation(**table)


def _stage(where: str, stage: str, table: Any) -> StageRecipe:
    if not isinstance(table, dict):
        raise GsoptError(f"{where}: [{stage}] must be a table")
    defaults = StageRecipe()
    allowed = [k for k in vars(defaults) if stage in STAGE_KNOBS.get(k, (stage,))]
    for key, value in table.items():
        if key not in allowed:
            raise GsoptError(
                f"{where}: unknown key {key!r} in [{stage}]; allowed: {', '.join(allowed)}"
            )
        values = ATTENTIONS[stage] if key == "attention" else None
        _check_value(f"{where} [{stage}]", key, value, getattr(defaults, key), values)
    settings = StageRecipe(**table)
    if settings.cudagraph and settings.backend == "compile" and settings.mode == "reduce-overhead":
        raise GsoptError(
            f"{where}: [{stage}] cudagraph = true with mode = 'reduce-overhead' would capture "
            "a CUDA graph inside another; choose one"
        )
    return settings


def _merged(base: dict[str, Any], table: Any, where: str) -> dict[str, Any]:
    """`base` with a device table's keys on top (stage tables merged key by key)."""
    if not isinstance(table, dict):
        raise GsoptError(f"{where} must be a table")
    merged = dict(base)
    for key, value in table.items():
        if key in DEVICE_TYPES:
            raise GsoptError(f"{where}: a device table cannot hold another ([{key}])")
        if (
            key in (*STAGES, "speculate", "quantize")
            and isinstance(value, dict)
            and isinstance(base.get(key), dict)
        ):
            value = {**base[key], **value}
        merged[key] = value
    return merged


def parse_recipe(data: dict[str, Any], where: str) -> Recipe:
    """A recipe from its TOML tables. `[cpu]` and `[cuda]` tables override any setting on
    that device type (vLLM-style presets: `best` is what measured best on each)."""
    base = {"name": Path(where).stem, **{k: v for k, v in data.items() if k not in DEVICE_TYPES}}
    devices = {
        device: _parse(_merged(base, data[device], f"{where} [{device}]"), f"{where} [{device}]")
        for device in DEVICE_TYPES
        if device in data
    }
    return dataclasses.replace(_parse(base, where), devices=devices)


def _parse(data: dict[str, Any], where: str) -> Recipe:
    tables = (*STAGES, "speculate", "quantize", "devices")
    top = [f.name for f in dataclasses.fields(Recipe) if f.name not in tables]
    allowed = top + list(STAGES) + ["speculate", "quantize", *DEVICE_TYPES]
    for key in data:
        if key not in allowed:
            raise GsoptError(f"{where}: unknown key {key!r}; allowed: {', '.join(allowed)}")
    defaults = Recipe(name="")
    fields = {}
    for key, value in data.items():
        if key in STAGES:
            fields[key] = _stage(where, key, value)
        elif key == "speculate":
            fields[key] = _speculation(where, value)
        elif key == "quantize":
            fields[key] = _quantization(where, value)
        else:
            _check_value(where, key, value, getattr(defaults, key))
            fields[key] = value
    recipe = Recipe(**fields)
    if recipe.speculate is not None and recipe.kv_cache == "dynamic":
        raise GsoptError(f'{where}: [speculate] needs kv_cache = "static" (its verify step)')
    if recipe.kv_cache == "dynamic":
        for stage in ("prefill", "decode"):
            settings = getattr(recipe, stage)
            if settings.backend != "eager" or settings.cudagraph:
                raise GsoptError(
                    f'{where}: compiling or capturing {stage} needs kv_cache = "static" (the '
                    "dynamic cache changes shape every step)"
                )
    return recipe


def builtin_recipes() -> list[str]:
    return sorted(
        p.name[:-5] for p in resources.files("gsopt.recipes").iterdir() if p.name.endswith(".toml")
    )


def load_recipe(name_or_path: str | Path) -> Recipe:
    """A built-in recipe by name, or a TOML file by path."""
    path = Path(name_or_path)
    if path.suffix == ".toml":
        if not path.is_file():
            raise GsoptError(f"{path}: recipe file not found")
        text = path.read_text()
    else:
        if str(name_or_path) not in builtin_recipes():
            raise GsoptError(
                f"unknown recipe {str(name_or_path)!r}: choose one of "
                f"{', '.join(builtin_recipes())}, or give a path to a .toml file"
            )
        text = resources.files("gsopt.recipes").joinpath(f"{name_or_path}.toml").read_text()
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise GsoptError(f"{name_or_path}: not valid TOML ({e})") from None
    return parse_recipe(data, str(name_or_path))


# --- per-stage compile specs -----------------------------------------------------------------


def _counters() -> tuple[int, int, int]:
    counters = torch._dynamo.utils.counters
    return (
        counters["stats"]["unique_graphs"],
        sum(counters["graph_break"].values()),
        counters["inductor"]["cudagraph_skips"],
    )


class CompiledStage:
    """A compiled stage that counts its own graphs, graph breaks, recompiles and CUDA-graph
    skips (inductor skips them silently, e.g. for mutated inputs)."""

    def __init__(self, fn, **compile_kwargs: Any):
        self.fn = torch.compile(fn, **compile_kwargs)
        self.graphs = self.graph_breaks = self.recompiles = self.cudagraph_skips = 0
        self.calls = 0

    def __call__(self, *args):
        before = _counters()
        out = self.fn(*args)
        new_graphs, new_breaks, new_skips = (
            after - then for after, then in zip(_counters(), before, strict=True)
        )
        if self.calls:
            self.recompiles += new_graphs
        self.graphs += new_graphs
        self.graph_breaks += new_breaks
        self.cudagraph_skips += new_skips
        self.calls += 1
        return out


def _triton_runs(device: torch.device | None) -> bool:
    """Triton kernels run natively on CUDA, and on the CPU only under the interpreter."""
    if device is not None and device.type == "cuda":
        return True
    return os.environ.get("TRITON_INTERPRET") == "1"


def _portable(stage: str, settings: StageRecipe, cuda: bool, notes: list[str]) -> StageRecipe:
    """The nearest form of a stage's settings that this machine can run."""
    changes: dict[str, Any] = {}
    if settings.attention == "auto":
        changes["attention"] = "triton" if stage == "decode" and cuda else "sdpa"
    elif settings.attention == "triton" and not _triton_runs(
        torch.device("cuda" if cuda else "cpu")
    ):
        changes["attention"] = "sdpa"
        notes.append(f"{stage}: triton attention needs CUDA (or TRITON_INTERPRET=1); ran sdpa")
    if cuda:
        return dataclasses.replace(settings, **changes)
    if settings.cudagraph:
        changes.update(cudagraph=False, backend="compile")
        notes.append(f"{stage}: cudagraph needs CUDA; ran a compiled step instead")
    if settings.mode in ("reduce-overhead", "max-autotune"):
        changes["mode"] = (
            "default" if settings.mode == "reduce-overhead" else ("max-autotune-no-cudagraphs")
        )
        notes.append(
            f"{stage}: mode {settings.mode} uses CUDA graphs; ran mode {changes['mode']} instead"
        )
    return dataclasses.replace(settings, **changes)


# Stages whose compiled CPU code computes weight-times-few-rows products (`gsopt.engine.cpu_gemv`).
GEMV_STAGES = ("prefill", "decode")


def _wrap(fn, settings: StageRecipe, cpu_gemv_products: bool = False):
    """Eager, compiled or captured, as the stage's settings say. With `cpu_gemv_products`,
    the few-row products of a stage compiled for the CPU (all of a decode or verify step's,
    the prefill's lm head over the rows it reads) become inductor reductions."""
    if settings.backend == "eager":
        return fn
    kwargs: dict[str, Any] = dict(fullgraph=settings.fullgraph, dynamic=settings.dynamic)
    options = cpu_gemv.inductor_options() if cpu_gemv_products else {}
    if settings.mode != "default" and options:
        options.update(torch._inductor.list_mode_options(settings.mode))
    elif settings.mode != "default":
        kwargs["mode"] = settings.mode
    if options:
        kwargs["options"] = options
    compiled = CompiledStage(fn, **kwargs)
    if settings.cudagraph:
        from gsopt.engine.cudagraph import CUDAGraphStep

        return CUDAGraphStep(compiled)
    return compiled


def describe(settings: StageRecipe) -> str:
    """A short label of what actually runs for a stage, for reports."""
    parts = [settings.backend if settings.mode == "default" else f"compile/{settings.mode}"]
    if settings.backend == "eager":
        parts = ["eager"]
    if settings.cudagraph:
        parts.append("cudagraph")
    if settings.attention not in ("sdpa", "auto"):
        parts.append(f"{settings.attention} attention")
    return " + ".join(parts)


def _changed_stages(recipe: Recipe, settings: dict[str, StageRecipe]) -> set[str]:
    """Stages whose computation differs from the baseline's (eager, FMS's growing cache),
    before model transforms add theirs."""
    changed = {s for s in STAGES if settings[s].backend != "eager" or settings[s].cudagraph}
    if settings["decode"].attention != "sdpa":
        changed.add("decode")
    if recipe.kv_cache == "static":
        changed.update(("prefill", "decode"))
    if recipe.audio_buckets:
        changed.update(("frontend", "encoder", "projector"))
    return changed


def apply(model: torch.nn.Module, recipe: Recipe, draft_model=None) -> Stages:
    """Transform `model` as the recipe says and return its stages (eager, compiled or
    captured). A recipe that drafts with a model takes it as `draft_model` (loaded with
    `load_draft_model`), unless its [speculate] table names a checkpoint folder. A Granite
    Speech 5.0 (CTC) model gets `CTCStages`: the settings it has stages for."""
    device = _device(model)
    cuda = device.type == "cuda"
    recipe = recipe.for_device(device.type)
    notes: list[str] = []
    settings = {s: _portable(s, getattr(recipe, s), cuda, notes) for s in STAGES}
    if recipe.linear == "onednn" and cuda:
        notes.append("linear = 'onednn' is a CPU kernel; CUDA kept its own linears")
    if not hasattr(model, "decoder"):  # Granite Speech 5.0: encoder-only CTC
        from gsopt.engine.ctc_pipeline import apply_ctc

        transforms = [
            t
            for t in model_transforms(recipe, device)
            if not isinstance(t, MergeLoRA)
            and (not isinstance(t, Quantize) or "encoder" in t.settings.stages)
        ]
        if recipe.quantize is not None and "encoder" not in recipe.quantize.stages:
            notes.append("quantize: Granite Speech 5.0 (CTC) has no decoder; ignored")
        return apply_ctc(model, recipe, settings, notes, transforms)
    changed = _changed_stages(recipe, settings)
    for transform in model_transforms(recipe, device):
        if transform.changes(model):
            changed.update(transform.stages)
        transform(model)
    stages = Stages.eager(model, recipe.kv_cache, ATTENTION_OPS[settings["decode"].attention])
    stages.notes = notes
    stages.changed = changed
    stages.labels = {stage: describe(settings[stage]) for stage in STAGES}
    stages.check_every = recipe.check_every
    stages.max_seq_len = recipe.max_seq_len
    # Padding the prompt only helps a compiled prefill (fewer shapes); eager would just pay
    # for it.
    stages.prefill_bucket = recipe.prefill_bucket if settings["prefill"].backend != "eager" else 1
    stages.audio_buckets = recipe.audio_buckets
    # A captured step replays fixed shapes: it attends over the whole cache, masked.
    stages.fixed_span = settings["decode"].captured
    for stage in STAGES:
        setattr(
            stages,
            stage,
            _wrap(getattr(stages, stage), settings[stage], stage in GEMV_STAGES and not cuda),
        )
    # The decode step, k tokens wide.
    stages.verify = _wrap(stages.verify, settings["decode"], not cuda)
    if recipe.speculate is not None:
        _speculation_stages(stages, model, recipe, draft_model)
    return stages


def _speculation_stages(stages: Stages, model, recipe: Recipe, draft_model) -> None:
    """The CTC draft stage, or the draft model with its own stages (the recipe's compile
    settings, without speculation)."""
    spec = stages.speculation = recipe.speculate
    stages.changed.update(("prefill", "decode"))
    if spec.draft in ("ctc", "ctc-bpe"):
        if spec.draft == "ctc-bpe" and getattr(model.encoder, "out_llm", None) is None:
            raise GsoptError(
                f"recipe {recipe.name}: draft 'ctc-bpe' needs the BPE CTC head: put the "
                "checkpoint's out_llm.safetensors beside its weights, or use draft = 'ctc'"
            )
        labels = drafts.bpe_labels if spec.draft == "ctc-bpe" else drafts.grapheme_labels
        stages.ctc = functools.partial(labels, model.encoder)
        return
    if draft_model is None and spec.draft == "model":
        raise GsoptError(
            f"recipe {recipe.name} drafts with a model: pass --draft-model DIR|VARIANT"
        )
    if draft_model is None:
        weight = model.decoder.head.weight
        draft_model = load_draft_model(
            spec.draft, model.config, device=weight.device, dtype=weight.dtype
        )
    plain = dataclasses.replace(recipe, speculate=None, devices={})
    stages.draft = (draft_model, apply(draft_model, plain))


def load_draft_model(source, target_config, *, device, dtype, target_source=None):
    """A draft model for a target, refused (before any weight is read) unless it reads and
    writes the same tokens: the same vocabulary, audio and end-of-text ids, and the same
    tokenizer where both are checkpoint folders."""
    from gsopt.model.checkpoint import load_config, load_model
    from gsopt.model.tokenizer import TOKENIZER_FILES, load_tokenizer

    config = load_config(source)
    if not hasattr(config, "decoder"):
        raise GsoptError(f"draft model {source}: it has no decoder to draft with")
    mine = target_config
    draft_ids = (config.decoder.src_vocab_size, config.audio_token_id, config.eos_token_id)
    target_ids = (mine.decoder.src_vocab_size, mine.audio_token_id, mine.eos_token_id)
    if draft_ids != target_ids:
        raise GsoptError(
            f"draft model {source}: its vocabulary (size, audio and end-of-text ids "
            f"{draft_ids}) differs from the target's {target_ids}; a draft must share the "
            "target's tokenizer"
        )
    folders = [s for s in (source, target_source) if s is not None and Path(s).is_dir()]
    if len(folders) == 2 and all(
        any((Path(f) / n).exists() for n in TOKENIZER_FILES) for f in folders
    ):
        vocabularies = [
            load_tokenizer(f, c).get_vocab() for f, c in zip(folders, (config, mine), strict=True)
        ]
        if vocabularies[0] != vocabularies[1]:
            raise GsoptError(f"draft model {source}: its tokenizer differs from the target's")
    return load_model(source, device=device, dtype=dtype, lora="merged")
