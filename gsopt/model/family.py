"""Model families: what each kind of Granite Speech model is, in one registry.

A family names its config and model classes, its FMS architecture, the config.json
`model_type`s it reads, its named variants and the stages its pipeline runs. Code above the
model layer asks `family_of(model or config)` rather than testing attributes or classes, so
a new family is an entry here (registered by its model file, as FMS's `register_model` is),
not a branch in every command.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from gsopt.errors import GsoptError

# The speech LLM's stages, in the order data flows through them.
SPEECH_LLM_STAGES = ("frontend", "encoder", "projector", "prefill", "decode")


@dataclass(frozen=True)
class Family:
    """`decoder`: the model has a prompt and a text decoder (prefill, decode steps, KV cache,
    LoRA, speculation); without one it reads labels off the encoder (CTC). `parts`: its
    top-level modules that stage-scoped settings (quantization) can address."""

    name: str
    config: type
    model: type
    architecture: str
    model_types: tuple[str, ...]
    variants: Mapping[str, Any]
    stages: tuple[str, ...]
    decoder: bool
    parts: tuple[str, ...]


FAMILIES: dict[str, Family] = {}


def register_family(family: Family) -> None:
    FAMILIES[family.name] = family


def family_of(model_or_config: Any) -> Family:
    """The family of a model (or of its config)."""
    config = getattr(model_or_config, "config", model_or_config)
    for family in FAMILIES.values():
        if isinstance(config, family.config):
            return family
    raise TypeError(f"{type(model_or_config).__name__} belongs to no Granite Speech family")


def variant_family(name: str) -> Family | None:
    """The family that has a variant of this name, or None."""
    return next((f for f in FAMILIES.values() if name in f.variants), None)


def variant_names() -> list[str]:
    return [name for family in FAMILIES.values() for name in family.variants]


def is_variant(source: Any) -> bool:
    return variant_family(str(source)) is not None


def get_variant(name: str) -> Any:
    family = variant_family(name)
    if family is None:
        raise GsoptError(f"unknown variant {name!r}: choose one of {', '.join(variant_names())}")
    return family.variants[name]
