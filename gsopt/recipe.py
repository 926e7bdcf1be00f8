"""Recipes: declarative per-stage settings, applied to a loaded model (torchao-style).

A recipe is data: a TOML file parsed into frozen dataclasses, unknown keys and values refused
with the allowed ones listed. `apply(model, recipe)` transforms the model in place where the
recipe says so (dtype, merged LoRA, encoder attention) and returns the `Stages` to run, each
eager, compiled or captured. CUDA-only settings fall back to their nearest portable form on
a machine without CUDA, and every fallback is written into `Stages.notes`.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from gsopt.encoder import set_block_attention
from gsopt.errors import GsoptError
from gsopt.lora import merge_audio_lora_
from gsopt.pipeline import STAGES, Stages
from gsopt.runtime import DTYPES

BACKENDS = ("eager", "compile")
MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
ATTENTIONS = ("sdpa", "math", "triton")
KV_CACHES = ("dynamic", "static")
LORAS = ("live", "merged")
# Which stages take which stage-specific knob.
STAGE_KNOBS = {"attention": ("encoder", "decode"), "cudagraph": ("decode",)}


@dataclass(frozen=True)
class StageRecipe:
    backend: str = "eager"
    mode: str = "default"
    fullgraph: bool = True
    dynamic: bool | None = None
    cudagraph: bool = False
    attention: str = "sdpa"


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str = ""
    kv_cache: str = "dynamic"
    lora: str = "live"
    dtype: str | None = None
    prefill_bucket: int = 64
    audio_buckets: bool = False
    check_every: int = 8
    frontend: StageRecipe = field(default_factory=StageRecipe)
    encoder: StageRecipe = field(default_factory=StageRecipe)
    projector: StageRecipe = field(default_factory=StageRecipe)
    prefill: StageRecipe = field(default_factory=StageRecipe)
    decode: StageRecipe = field(default_factory=StageRecipe)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_ALLOWED_VALUES = {
    "backend": BACKENDS,
    "mode": MODES,
    "attention": ATTENTIONS,
    "kv_cache": KV_CACHES,
    "lora": LORAS,
    "dtype": tuple(DTYPES),
}


def _check_value(where: str, key: str, value: Any, default: Any) -> None:
    allowed = _ALLOWED_VALUES.get(key)
    if allowed is not None and value not in allowed:
        raise GsoptError(f"{where}: {key} = {value!r} is not one of {', '.join(allowed)}")
    expected = (bool, type(None)) if key == "dynamic" else type(default)
    if allowed is None and default is not None and not isinstance(value, expected):
        raise GsoptError(f"{where}: {key} = {value!r} must be a {type(default).__name__}")


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
        _check_value(f"{where} [{stage}]", key, value, getattr(defaults, key))
    return StageRecipe(**table)


def parse_recipe(data: dict[str, Any], where: str) -> Recipe:
    top = [f.name for f in dataclasses.fields(Recipe) if f.name not in STAGES]
    for key in data:
        if key not in top and key not in STAGES:
            raise GsoptError(
                f"{where}: unknown key {key!r}; allowed: {', '.join(top + list(STAGES))}"
            )
    defaults = Recipe(name="")
    fields = {}
    for key, value in data.items():
        if key in STAGES:
            fields[key] = _stage(where, key, value)
        else:
            _check_value(where, key, value, getattr(defaults, key))
            fields[key] = value
    fields.setdefault("name", Path(where).stem)
    return Recipe(**fields)


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


def _portable(stage: str, settings: StageRecipe, cuda: bool, notes: list[str]) -> StageRecipe:
    """The nearest form of a stage's settings that this machine can run."""
    if cuda:
        return settings
    changes: dict[str, Any] = {}
    if settings.cudagraph:
        changes.update(cudagraph=False, backend="compile")
        notes.append(f"{stage}: cudagraph needs CUDA; ran a compiled static-shape step instead")
    if settings.mode in ("reduce-overhead", "max-autotune"):
        changes["mode"] = (
            "default" if settings.mode == "reduce-overhead" else ("max-autotune-no-cudagraphs")
        )
        notes.append(
            f"{stage}: mode {settings.mode} uses CUDA graphs; ran mode {changes['mode']} instead"
        )
    if settings.attention == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
        changes["attention"] = "sdpa"
        notes.append(f"{stage}: triton attention needs CUDA (or TRITON_INTERPRET=1); ran sdpa")
    return dataclasses.replace(settings, **changes)


def _wrap(stage: str, fn, settings: StageRecipe):
    if settings.backend == "eager":
        return fn
    kwargs: dict[str, Any] = dict(fullgraph=settings.fullgraph, dynamic=settings.dynamic)
    if settings.mode != "default":
        kwargs["mode"] = settings.mode
    return CompiledStage(fn, **kwargs)


def describe(settings: StageRecipe) -> str:
    """A short label of what actually runs for a stage, for reports."""
    parts = [settings.backend if settings.mode == "default" else f"compile/{settings.mode}"]
    if settings.backend == "eager":
        parts = ["eager"]
    if settings.cudagraph:
        parts.append("cudagraph")
    if settings.attention != "sdpa":
        parts.append(f"{settings.attention} attention")
    return " + ".join(parts)


def changes_model(model: torch.nn.Module, recipe: Recipe) -> bool:
    """Whether `apply` would transform the model itself (not only wrap its stages): then a
    caller that still needs the original must give `apply` a copy."""
    dtype = model.projector.query.dtype
    return (
        (recipe.dtype is not None and DTYPES[recipe.dtype] != dtype)
        or (recipe.lora == "merged" and model.lora_mode == "live")
        or recipe.encoder.attention != "sdpa"
    )


def apply(model: torch.nn.Module, recipe: Recipe) -> Stages:
    """Transform `model` as the recipe says and return its stages (eager, compiled or captured)."""
    cuda = model.decoder.head.weight.device.type == "cuda"
    notes: list[str] = []
    settings = {s: _portable(s, getattr(recipe, s), cuda, notes) for s in STAGES}
    if recipe.dtype is not None:
        model.to(DTYPES[recipe.dtype])
    if recipe.lora == "merged" and model.lora_mode == "live":
        merge_audio_lora_(model)
    set_block_attention(model.encoder, _encoder_attention(settings["encoder"].attention))
    uses_static = recipe.kv_cache == "static"
    for stage in ("prefill", "decode"):
        if not uses_static and settings[stage].backend != "eager":
            raise GsoptError(
                f'recipe {recipe.name}: compiling {stage} needs kv_cache = "static" (the '
                "dynamic cache changes shape every step)"
            )
    stages = Stages.eager(model, recipe.kv_cache, settings["decode"].attention)
    stages.notes = notes
    stages.labels = {stage: describe(settings[stage]) for stage in STAGES}
    stages.check_every = recipe.check_every
    # Padding the prompt only helps a compiled prefill (fewer shapes); eager would just pay
    # for it. The cache length is bucketed either way, so decode shapes stay bounded.
    stages.prefill_bucket = recipe.prefill_bucket if settings["prefill"].backend != "eager" else 1
    stages.audio_buckets = recipe.audio_buckets
    for stage in STAGES:
        setattr(stages, stage, _wrap(stage, getattr(stages, stage), settings[stage]))
    if settings["decode"].cudagraph:
        from gsopt.cudagraph import CUDAGraphDecode

        stages.decode = CUDAGraphDecode(stages.decode)
    return stages


def _encoder_attention(name: str):
    if name != "triton":
        return name
    from gsopt.kernels.conformer_attention import conformer_attention

    return conformer_attention
