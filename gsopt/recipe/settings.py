"""Recipe settings: a TOML file parsed into frozen dataclasses (vLLM-style presets).

Unknown keys and values are refused with the allowed ones listed, numbers are checked
against their ranges, and every name that picks an implementation (a KV cache, an attention
kernel, a draft kind, a quantized format) is checked against the registry that implements
it, so a typo is a one-line error when the recipe is read, not a failure minutes into a run.
`[cpu]` and `[cuda]` tables override any setting on that device type.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from gsopt.engine import attention
from gsopt.engine.drafts import DRAFT_KINDS
from gsopt.engine.pipeline import KV_CACHES, STAGES
from gsopt.engine.quantize import (
    ACTIVATIONS,
    GROUP_SIZES,
    QUANTIZABLE_STAGES,
    WEIGHTS,
    Quantization,
)
from gsopt.engine.speculate import MODES as SPECULATION_MODES
from gsopt.engine.speculate import Speculation
from gsopt.errors import GsoptError
from gsopt.runtime import DTYPES, bf16_gemm_outruns_fp32, has_bf16_dot

BACKENDS = ("eager", "compile")
MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
LORAS = ("live", "merged")
# The kernel behind every plain nn.Linear on a CPU: aten's (MKL) or oneDNN with prepacked
# weights (`gsopt.engine.cpu_linear`).
LINEARS = ("aten", "onednn")
# Which stages take which stage-specific knob.
STAGE_KNOBS = {"attention": attention.STAGES, "cudagraph": ("decode",)}
# Device types a recipe can hold its own settings for.
DEVICE_TYPES = ("cpu", "cuda")
# Tables for a kind of machine, applied on top of the table each names: `[cpu-bf16]` runs on a
# CPU with BF16 dot products (avx512_bf16, AMX), `[cpu-bf16-gemm]` on one whose bf16 GEMMs
# also outrun fp32 ones (measured, `gsopt.runtime.bf16_gemm_outruns_fp32`).
MACHINE_TABLES = {"cpu-bf16": "cpu", "cpu-bf16-gemm": "cpu-bf16"}
# Whether this machine is of each kind (the most specific first).
MACHINE_KINDS = {"cpu-bf16-gemm": bf16_gemm_outruns_fp32, "cpu-bf16": has_bf16_dot}
DEVICE_TABLES = (*DEVICE_TYPES, *MACHINE_TABLES)
# Smallest allowed value of each numeric setting (and the largest, where there is one).
MINIMUM = {
    "check_every": 1,
    "prefill_bucket": 1,
    "max_seq_len": 1,
    "k": 1,
    "num_beams": 1,
    "ctc_threshold": 0.0,
    "confidence_threshold": 0.0,
}
# A verification block wider than this cannot be meant: drafts of 64 tokens a step already
# cover a whole utterance.
MAXIMUM = {"confidence_threshold": 1.0, "k": 64}


@dataclass(frozen=True)
class StageRecipe:
    backend: str = "eager"
    mode: str = "default"
    fullgraph: bool = True
    dynamic: bool | None = None
    cudagraph: bool = False
    attention: str = attention.AUTO

    @property
    def captured(self) -> bool:
        """Whether the step runs as a CUDA graph (ours, or torch.compile's own)."""
        return self.cudagraph or (
            self.backend == "compile" and self.mode in ("reduce-overhead", "max-autotune")
        )


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str = ""
    kv_cache: str = "dynamic"
    lora: str = "live"
    dtype: str | None = None
    # The encoder's and projector's dtype where it differs from `dtype`: on a CPU whose BF16
    # units halve a decode step's bytes but whose bf16 GEMMs are slower than fp32 ones.
    audio_dtype: str | None = None
    linear: str = "aten"
    prefill_bucket: int = 64
    audio_buckets: bool = False
    check_every: int = 8
    max_seq_len: int | None = None
    num_beams: int = 1
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
        """What runs on `device_type`: the recipe with that device's table applied, and the
        most specific machine table this machine is of on top (`MACHINE_TABLES`)."""
        for table, is_this_kind in MACHINE_KINDS.items():
            if table in self.devices and _tables_under(table)[-1] == device_type:
                if is_this_kind():
                    return self.devices[table]
        return self.devices.get(device_type, self)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def drafts_with_model(self) -> bool:
        """Whether it speculates from a draft model, on any device type."""
        return any(
            r.speculate is not None and r.speculate.draft == "model"
            for r in (self, *self.devices.values())
        )


def lossy_reasons(recipe: Recipe, model_dtype: torch.dtype, device_type: str) -> list[str]:
    """Why a recipe's tokens may differ from eager's (empty: it is lossless, and `apply`
    demands identical greedy tokens)."""
    recipe = recipe.for_device(device_type)
    reasons = []
    audio = recipe.audio_dtype or recipe.dtype
    if recipe.dtype is not None and DTYPES[recipe.dtype] != model_dtype:
        if audio is not None and DTYPES[audio] == model_dtype:
            reasons.append(
                f"casts the decoder's weights to {recipe.dtype} (the encoder and projector "
                f"stay {audio})"
            )
        else:
            reasons.append(f"casts the weights to {recipe.dtype}")
    if audio not in (None, recipe.dtype) and DTYPES[audio] != model_dtype:
        reasons.append(f"casts the encoder and projector to {audio}")
    if recipe.speculate is not None and recipe.speculate.mode == "relaxed":
        reasons.append("relaxed speculation keeps CTC drafts the decoder did not confirm")
    if recipe.num_beams > 1:
        reasons.append(
            f"num_beams = {recipe.num_beams}: beam search, not greedy decoding (its reference "
            f"is transformers' generate(num_beams={recipe.num_beams}))"
        )
    if recipe.quantize is not None:
        q = recipe.quantize
        computing = f" (computing in {q.compute_dtype})" if q.compute_dtype else ""
        if q.activations == "int8":
            per = "weight group" if q.weights == "int4" else "row"
            computing += f" and their activations to int8 per {per}"
        reasons.append(f"quantizes the {', '.join(q.stages)} weights to {q.weights}{computing}")
    return reasons


# --- parsing ---------------------------------------------------------------------------------

_ALLOWED_VALUES = {
    "backend": BACKENDS,
    "mode": MODES,
    "kv_cache": tuple(KV_CACHES),
    "lora": LORAS,
    "dtype": tuple(DTYPES),
    "audio_dtype": tuple(DTYPES),
    "linear": LINEARS,
}


def _check_value(where: str, key: str, value: Any, default: Any, allowed=None) -> None:
    allowed = allowed or _ALLOWED_VALUES.get(key)
    if allowed is not None:
        if not isinstance(value, str | int) or isinstance(value, bool) or value not in allowed:
            choices = ", ".join(str(a) for a in allowed)
            raise GsoptError(f"{where}: {key} = {value!r} is not one of {choices}")
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


def _table(where: str, name: str, table: Any, defaults: Any) -> None:
    """A [name] table: keys among the dataclass's fields."""
    if not isinstance(table, dict):
        raise GsoptError(f"{where}: [{name}] must be a table")
    for key in table:
        if key not in vars(defaults):
            allowed = ", ".join(vars(defaults))
            raise GsoptError(f"{where}: unknown key {key!r} in [{name}]; allowed: {allowed}")


def _quantization(where: str, table: Any) -> Quantization:
    defaults = Quantization()
    _table(where, "quantize", table, defaults)
    allowed_values = {
        "weights": WEIGHTS,
        "group_size": GROUP_SIZES,
        "compute_dtype": tuple(DTYPES),
        "activations": ACTIVATIONS,
    }
    for key, value in table.items():
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
    defaults = Speculation()
    _table(where, "speculate", table, defaults)
    for key, value in table.items():
        allowed = {"mode": SPECULATION_MODES, "draft": tuple(DRAFT_KINDS)}.get(key)
        if key == "draft" and value not in DRAFT_KINDS and isinstance(value, str):
            raise GsoptError(
                f"{where} [speculate]: draft = {value!r} is not one of "
                f"{', '.join(DRAFT_KINDS)} (a draft checkpoint goes in draft_model = PATH, "
                'with draft = "model")'
            )
        _check_value(f"{where} [speculate]", key, value, getattr(defaults, key), allowed)
    settings = Speculation(**table)
    if settings.draft_model and settings.draft != "model":
        raise GsoptError(
            f'{where} [speculate]: draft_model is for draft = "model", not {settings.draft!r}'
        )
    if settings.mode == "relaxed" and settings.kind.thresholds is None:
        raise GsoptError(
            f'{where} [speculate]: mode = "relaxed" judges a CTC draft; draft = '
            f'{settings.draft!r} makes none (use draft = "ctc" or "ctc-bpe", or mode = "exact")'
        )
    return settings


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
        values = attention.names(stage) if key == "attention" else None
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
        if key in DEVICE_TABLES:
            raise GsoptError(f"{where}: a device table cannot hold another ([{key}])")
        if (
            key in (*STAGES, "speculate", "quantize")
            and isinstance(value, dict)
            and isinstance(base.get(key), dict)
        ):
            value = {**base[key], **value}
        merged[key] = value
    return merged


def _tables_under(table: str) -> list[str]:
    """The tables a machine table goes on top of, nearest first: ending in a device type."""
    chain = []
    while (table := MACHINE_TABLES.get(table)) is not None:
        chain.append(table)
    return chain


def parse_recipe(data: dict[str, Any], where: str) -> Recipe:
    """A recipe from its TOML tables. `[cpu]` and `[cuda]` tables override any setting on
    that device type (vLLM-style presets: `best` is what measured best on each)."""
    base = {"name": Path(where).stem, **{k: v for k, v in data.items() if k not in DEVICE_TABLES}}
    merged = {
        device: _merged(base, data[device], f"{where} [{device}]")
        for device in DEVICE_TYPES
        if device in data
    }
    for table in MACHINE_TABLES:
        if table in data:
            under = next((merged[t] for t in _tables_under(table) if t in merged), base)
            merged[table] = _merged(under, data[table], f"{where} [{table}]")
    devices = {table: _parse(data, f"{where} [{table}]") for table, data in merged.items()}
    return dataclasses.replace(_parse(base, where), devices=devices)


def _parse(data: dict[str, Any], where: str) -> Recipe:
    tables = (*STAGES, "speculate", "quantize", "devices")
    top = [f.name for f in dataclasses.fields(Recipe) if f.name not in tables]
    allowed = top + list(STAGES) + ["speculate", "quantize", *DEVICE_TABLES]
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
    cache = KV_CACHES[recipe.kv_cache]
    _check_beams(recipe, cache.fixed_shapes, where)
    if recipe.speculate is not None and not cache.fixed_shapes:
        raise GsoptError(f'{where}: [speculate] needs kv_cache = "static" (its verify step)')
    if not cache.fixed_shapes:
        for stage in ("prefill", "decode"):
            settings = getattr(recipe, stage)
            if settings.backend != "eager" or settings.cudagraph:
                raise GsoptError(
                    f'{where}: compiling or capturing {stage} needs kv_cache = "static" (the '
                    f"{recipe.kv_cache} cache changes shape every step)"
                )
    return recipe


def _check_beams(recipe: Recipe, fixed_shapes: bool, where: str) -> None:
    """What beam search (`gsopt.engine.beam`) cannot combine with, refused in one line."""
    beams = recipe.num_beams
    if beams == 1:
        return
    if not fixed_shapes:
        raise GsoptError(f'{where}: num_beams = {beams} needs kv_cache = "static" (its beam step)')
    if recipe.decode.captured:
        raise GsoptError(
            f"{where}: num_beams = {beams}: the beam step is compiled, never captured in a CUDA "
            "graph; drop cudagraph (and modes reduce-overhead, max-autotune) from [decode]"
        )
    if recipe.speculate is not None and recipe.speculate.mode == "exact":
        raise GsoptError(
            f"{where}: num_beams = {beams} with exact speculation, which gives greedy tokens; "
            'beams are plain decoding\'s or the fallback of mode = "relaxed"'
        )


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
        data = path.read_bytes()
    else:
        if str(name_or_path) not in builtin_recipes():
            raise GsoptError(
                f"unknown recipe {str(name_or_path)!r}: choose one of "
                f"{', '.join(builtin_recipes())}, or give a path to a .toml file"
            )
        data = resources.files("gsopt.recipes").joinpath(f"{name_or_path}.toml").read_bytes()
    try:
        parsed = tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise GsoptError(f"{name_or_path}: not UTF-8 text; a recipe is a TOML file") from None
    except tomllib.TOMLDecodeError as e:
        raise GsoptError(f"{name_or_path}: not valid TOML ({e})") from None
    return parse_recipe(parsed, str(name_or_path))
